from __future__ import annotations

import pytest

from tunewright.metrics import generated_token_accuracy, realign, text_metrics


def test_perfect_predictions() -> None:
    metrics = text_metrics(["2021-03-05", "hello world"], ["2021-03-05", "hello world"])
    assert metrics == pytest.approx({"exact_match": 1.0, "bleu": 100.0, "rouge_l": 1.0, "char_error_rate": 0.0})


def test_partial_predictions_against_hand_computed_values() -> None:
    metrics = text_metrics(["abcd", "x"], ["abce", "x"])
    assert metrics["exact_match"] == 0.5
    assert metrics["char_error_rate"] == pytest.approx(1 / 5)  # one substitution over 5 target characters
    assert metrics["rouge_l"] == pytest.approx(0.5)  # word level: 'abcd' != 'abce'


def test_whitespace_around_predictions_is_ignored() -> None:
    assert text_metrics([" yes\n"], ["yes"])["exact_match"] == 1.0


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        text_metrics(["a", "b"], ["a"])


def test_realign_pads_on_either_side() -> None:
    assert realign([[1, 2]], [[1, 2, 3]], pad_id=0) == ([[1, 2, 0]], [[1, 2, 3]])
    assert realign([[1, 2, 3, 4]], [[5]], pad_id=0, side="left") == ([[1, 2, 3, 4]], [[0, 0, 0, 5]])


def test_generated_token_accuracy_counts_target_positions() -> None:
    assert generated_token_accuracy([[1, 2], [7, 8, 9]], [[1, 2, 3], [7]], pad_id=0) == pytest.approx(3 / 4)
