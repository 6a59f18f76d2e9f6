"""Category metrics against scikit-learn and hand-computed values on fixed inputs."""

from __future__ import annotations

import math

import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from tunewright.metrics import category_metrics, expected_calibration_error, label_cross_entropy

LABELS = ["cat", "dog", "owl"]
TARGETS = ["cat", "cat", "dog", "dog", "owl", "owl", "cat", "dog"]
PREDICTIONS = ["cat", "dog", "dog", "dog", "owl", "cat", "cat", "owl"]
CONFIDENCES = [0.9, 0.6, 0.8, 0.95, 0.7, 0.55, 0.85, 0.4]


def test_category_metrics_match_scikit_learn():
    metrics = category_metrics(PREDICTIONS, TARGETS, CONFIDENCES, LABELS)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(TARGETS, PREDICTIONS)) == pytest.approx(5 / 8)
    assert metrics["macro_f1"] == pytest.approx(f1_score(TARGETS, PREDICTIONS, average="macro"))
    precision, recall, f1, support = precision_recall_fscore_support(TARGETS, PREDICTIONS, labels=LABELS)
    for position, label in enumerate(LABELS):
        per_class = metrics["per_class"][label]
        assert per_class["precision"] == pytest.approx(precision[position])
        assert per_class["recall"] == pytest.approx(recall[position])
        assert per_class["f1"] == pytest.approx(f1[position])
        assert per_class["support"] == support[position]
    assert metrics["confusion_matrix"] == {
        "labels": LABELS,
        "matrix": confusion_matrix(TARGETS, PREDICTIONS, labels=LABELS).tolist(),
    }
    assert metrics["confusion_matrix"]["matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]


def test_hand_computed_per_class_values():
    per_class = category_metrics(PREDICTIONS, TARGETS, CONFIDENCES, LABELS)["per_class"]
    # cat: predicted 3 times (2 right), 3 true cats -> P = R = 2/3
    assert per_class["cat"]["precision"] == pytest.approx(2 / 3)
    assert per_class["cat"]["recall"] == pytest.approx(2 / 3)
    # owl: predicted twice (1 right), 2 true owls -> P = R = F1 = 1/2
    assert per_class["owl"]["f1"] == pytest.approx(0.5)


def test_expected_calibration_error_by_hand():
    # Two bins are used: [0.5, 0.6) holds 0.55 and 0.58 (1 of 2 right: |0.5 - 0.565|), and
    # [0.9, 1.0] holds 0.95 and 0.97 (both right: |1 - 0.96|); each bin weighs 1/2.
    ece = expected_calibration_error([0.55, 0.58, 0.95, 0.97], [True, False, True, True])
    assert ece == pytest.approx(0.5 * 0.065 + 0.5 * 0.04)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert expected_calibration_error([], []) == 0.0


def test_unseen_targets_count_as_errors_and_get_their_own_row():
    targets = ["cat", "dog", "emu", "emu"]
    predictions = ["cat", "dog", "dog", "cat"]
    metrics = category_metrics(predictions, targets, [0.9, 0.9, 0.9, 0.9], ["cat", "dog"])
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["confusion_matrix"]["labels"] == ["cat", "dog", "emu"]
    assert metrics["confusion_matrix"]["matrix"] == [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
    assert metrics["per_class"]["dog"]["precision"] == pytest.approx(
        0.5
    )  # one of its two predictions was an emu


def test_label_cross_entropy_skips_unseen_rows():
    log_probs = [[math.log(0.25), math.log(0.75)], [math.log(0.5), math.log(0.5)], [0.0, -50.0]]
    loss = label_cross_entropy(log_probs, [1, 0, None])
    assert loss == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2)
    assert label_cross_entropy(log_probs, [None, None, None]) is None


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 predictions, 1 targets"):
        category_metrics(["a", "b"], ["a"], [0.5, 0.5], ["a", "b"])
