"""The classifier head objective, batched label scoring and the label vocabulary (tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunewright import heads
from tunewright.config import OutputFeature
from tunewright.data import IGNORE_INDEX, collate_training
from tunewright.errors import DataError, RunFolderError
from tunewright.heads import (
    ClassifierObjective,
    classifier_examples,
    classifier_log_probs,
    encode_labels,
    label_start_tokens,
    label_texts,
    label_vocabulary,
    load_head,
    load_vocabulary,
    save_category_state,
    score_labels,
    score_labels_flat,
)
from tunewright.train import target_token_count

PROMPTS = ["the film was", "a long and dull evening at the", "ok"]
LABELS = ["good", "bad", "so-so"]  # different token lengths


def random_head(objective: ClassifierObjective) -> None:
    torch.manual_seed(1)
    torch.nn.init.normal_(objective.head.weight, std=0.05)
    torch.nn.init.normal_(objective.head.bias, std=0.5)


def test_head_shapes_loss_and_padding_invariance(tiny_model, tokenizer):
    objective = ClassifierObjective(tiny_model, num_labels=3)
    random_head(objective)
    assert objective.head.weight.shape == (3, len(tokenizer))
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    examples = classifier_examples(prompt_ids, [0, 2, 1])
    batch = collate_training(examples, tokenizer.pad_token_id)
    out = objective(**batch)
    logits = objective.label_logits(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (3, 3)
    assert torch.allclose(out.loss_sum, F.cross_entropy(logits, torch.tensor([0, 2, 1]), reduction="sum"))
    assert out.count.item() == 3 and out.loss_sum.item() > 0
    assert out.correct.item() == int((logits.argmax(-1) == torch.tensor([0, 2, 1])).sum())
    # Padding never enters the average: each row alone gives the same logits as in the padded batch.
    for row, ids in enumerate(prompt_ids):
        alone = objective.label_logits(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert torch.allclose(alone[0], logits[row], atol=1e-5)


def test_head_input_is_the_mean_of_next_token_probabilities(tiny_model, tokenizer):
    objective = ClassifierObjective(tiny_model, num_labels=2)
    random_head(objective)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    probabilities = tiny_model(torch.tensor([ids])).logits.softmax(-1)[0]  # (T, V)
    expected = objective.head(probabilities.mean(0) * objective.input_scale)
    actual = objective.label_logits(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    assert torch.allclose(actual, expected, atol=1e-5)


def test_untrained_head_gives_uniform_probabilities(tiny_model, tokenizer):
    objective = ClassifierObjective(tiny_model, num_labels=4)
    log_probs = classifier_log_probs(
        objective, [tokenizer(p)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id
    )
    assert torch.allclose(log_probs.exp(), torch.full((3, 4), 0.25))


def test_head_trains_jointly_with_the_model(tiny_model, tokenizer):
    objective = ClassifierObjective(tiny_model, num_labels=2)
    names = {name for name, _ in objective.named_parameters()}
    assert {"head.weight", "head.bias"} <= names  # a submodule: Accelerate/DDP and checkpoints see it
    batch = collate_training(classifier_examples([tokenizer(p)["input_ids"] for p in PROMPTS[:2]], [0, 1]), 0)
    objective(**batch).loss_sum.backward()
    assert objective.head.weight.grad is not None and objective.head.weight.grad.abs().sum() > 0


def test_classifier_examples_count_one_target_per_sample(tokenizer):
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    examples = classifier_examples(prompt_ids, [0, 1, 2])
    assert [example.input_ids for example in examples] == prompt_ids  # the label is not in the input
    assert all(example.labels[:-1] == [IGNORE_INDEX] * (len(example.labels) - 1) for example in examples)
    assert target_token_count(examples, [0, 1, 2]) == 3


def brute_force_scores(model, prompt_ids, label_ids, normalization):
    """One unbatched forward pass per (prompt, label): the reference the batched scorer must match."""
    scores = torch.zeros(len(prompt_ids), len(label_ids))
    for row, prompt in enumerate(prompt_ids):
        for column, label in enumerate(label_ids):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + label])).logits[0]
            log_probs = logits.log_softmax(-1)
            total = sum(log_probs[len(prompt) - 1 + j, token] for j, token in enumerate(label))
            scores[row, column] = total / (len(label) if normalization == "mean" else 1)
    return scores


@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_label_scoring_matches_brute_force(tiny_model, tokenizer, normalization):
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]  # different lengths: left padding in play
    label_ids = encode_labels(tokenizer, LABELS)
    assert len({len(ids) for ids in label_ids}) > 1
    batched = score_labels(tiny_model, prompt_ids, label_ids, tokenizer.pad_token_id, normalization)
    assert batched.shape == (3, 3)
    assert torch.allclose(
        batched, brute_force_scores(tiny_model, prompt_ids, label_ids, normalization), atol=1e-4
    )


def test_flat_label_scoring_matches_brute_force(tiny_model, tokenizer):
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    label_ids = encode_labels(tokenizer, LABELS)
    flat = score_labels_flat(tiny_model, prompt_ids, label_ids, tokenizer.pad_token_id)
    assert torch.allclose(flat, brute_force_scores(tiny_model, prompt_ids, label_ids, "sum"), atol=1e-4)


def test_single_token_labels_need_only_the_prompt_pass(tiny_model, tokenizer):
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    label_ids = encode_labels(tokenizer, ["a", "b", "c", "d"])
    batched = score_labels(tiny_model, prompt_ids, label_ids, tokenizer.pad_token_id, "sum")
    assert torch.allclose(batched, brute_force_scores(tiny_model, prompt_ids, label_ids, "sum"), atol=1e-4)


@pytest.mark.parametrize("labels", [LABELS, ["a", "b", "c", "d"]])
def test_label_scoring_prefill_packs_the_prompts_with_the_padded_scores(tiny_model, tokenizer, monkeypatch, labels):
    """The prompts' pass runs packed (no padding work), and multi-token labels continue on its re-laid cache."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    label_ids = encode_labels(tokenizer, labels)
    packed_calls = []
    original = heads.packed_prefill
    monkeypatch.setattr(heads, "packed_prefill", lambda *args: packed_calls.append(1) or original(*args))
    packed = score_labels(tiny_model, prompt_ids, label_ids, tokenizer.pad_token_id, "sum")
    assert packed_calls == [1]
    monkeypatch.setattr(heads, "packed_prefill_applies", lambda model, mask: False)
    padded = score_labels(tiny_model, prompt_ids, label_ids, tokenizer.pad_token_id, "sum")
    assert packed_calls == [1]
    assert torch.allclose(packed, padded, atol=1e-5)


@pytest.mark.parametrize(
    ("labels", "passes"), [(["a", "b", "c", "d", "e", "f"], 1), (LABELS, 2), (LABELS * 2, 2)]
)
def test_label_scoring_passes_do_not_grow_with_the_labels(tiny_model, tokenizer, labels, passes):
    calls = []
    handle = tiny_model.model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        score_labels(
            tiny_model,
            [tokenizer(p)["input_ids"] for p in PROMPTS],
            encode_labels(tokenizer, labels),
            tokenizer.pad_token_id,
        )
    finally:
        handle.remove()
    assert len(calls) == passes  # the prompts once, then (if needed) all continuations together


def test_vocabulary_from_training_data_is_sorted_and_distinct():
    feature = OutputFeature(name="label", type="category")
    assert label_vocabulary(feature, ["b", "a", "b", "c"], "train.csv") == ["a", "b", "c"]


def test_vocabulary_from_config_keeps_its_order_and_checks_the_data():
    feature = OutputFeature(name="label", type="category", labels=["yes", "no", "maybe"])
    assert label_vocabulary(feature, ["no", "yes"], "train.csv") == ["yes", "no", "maybe"]
    with pytest.raises(DataError, match=r"'perhaps'.*not in output_features\[0\]\.labels"):
        label_vocabulary(feature, ["no", "perhaps"], "train.csv")


def test_single_class_is_a_clear_error():
    feature = OutputFeature(name="label", type="category")
    with pytest.raises(DataError, match="column 'label' has a single class \\('spam'\\)"):
        label_vocabulary(feature, ["spam", "spam"], "train.csv")


def test_empty_labels_are_a_clear_error():
    with pytest.raises(DataError, match="column 'label' has 1 empty label.*row 1"):
        label_texts(["a", "  ", "b"], "label", "train.csv")
    assert label_texts([" a ", 1], "label", "x") == ["a", "1"]


def test_head_and_vocabulary_round_trip(tmp_path: Path, tiny_model):
    objective = ClassifierObjective(tiny_model, num_labels=3)
    random_head(objective)
    save_category_state(tmp_path, ["x", "y", "z"], objective.head)
    assert load_vocabulary(tmp_path) == ["x", "y", "z"]
    fresh = ClassifierObjective(tiny_model, num_labels=3)
    load_head(tmp_path, fresh)
    assert torch.equal(fresh.head.weight, objective.head.weight)
    with pytest.raises(RunFolderError, match="does not fit"):
        load_head(tmp_path, ClassifierObjective(tiny_model, num_labels=2))
    with pytest.raises(RunFolderError, match="without labels.json"):
        load_vocabulary(tmp_path / "missing")


def test_head_starts_as_a_reader_of_the_label_tokens(tiny_model, tokenizer):
    starts = label_start_tokens(tokenizer, ["ab", "cd"])
    assert starts == [
        sorted({tokenizer("ab")["input_ids"][0], tokenizer(" ab")["input_ids"][0]}),
        sorted({tokenizer("cd")["input_ids"][0], tokenizer(" cd")["input_ids"][0]}),
    ]
    objective = ClassifierObjective(tiny_model, num_labels=2, label_token_ids=starts)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    mean = tiny_model(torch.tensor([ids])).logits.softmax(-1)[0].mean(0)  # (V,)
    expected = torch.stack([mean[starts[0]].sum(), mean[starts[1]].sum()]) * objective.input_scale
    actual = objective.label_logits(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    assert torch.allclose(actual, expected, atol=1e-5)
