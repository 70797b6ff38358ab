"""Classification metrics against scikit-learn, including ties and missing classes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from medxfer.protocols import metrics as M

sk = pytest.importorskip("sklearn.metrics")


def test_accuracies_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 4, 300))
    assert M.accuracy(y, pred) == pytest.approx(100 * sk.accuracy_score(y, pred))
    assert M.balanced_accuracy(y, pred) == pytest.approx(100 * sk.balanced_accuracy_score(y, pred))
    assert M.balanced_accuracy(y, pred, adjusted=True) == pytest.approx(
        100 * sk.balanced_accuracy_score(y, pred, adjusted=True))
    recalls = sk.recall_score(y, pred, average=None)
    assert M.mean_per_class_accuracy(y, pred) == pytest.approx(100 * recalls.mean())


def test_mean_per_class_differs_from_accuracy_on_imbalanced_data() -> None:
    y = np.array([0] * 90 + [1] * 10)
    pred = np.zeros(100, dtype=int)  # always the majority class
    assert M.accuracy(y, pred) == pytest.approx(90.0)
    assert M.mean_per_class_accuracy(y, pred) == pytest.approx(50.0)


def test_binary_auroc_with_ties_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) * 0.5 + 0.3 * y, 1)  # coarse: many ties
    assert len(np.unique(scores)) < 20
    assert M.binary_auroc(y, scores) == pytest.approx(100 * sk.roc_auc_score(y, scores))
    proba = np.stack([1 - scores, scores], axis=1)
    assert M.auroc(y, proba) == pytest.approx(100 * sk.roc_auc_score(y, scores))


def test_auroc_extremes_and_undefined() -> None:
    assert M.binary_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(100.0)
    assert M.binary_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.0)
    assert M.binary_auroc([0, 1], [0.5, 0.5]) == pytest.approx(50.0)
    assert math.isnan(M.binary_auroc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_multiclass_ovr_macro_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 400)
    logits = rng.normal(size=(400, 5)) + 1.5 * np.eye(5)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = sk.roc_auc_score(y, proba, multi_class="ovr", average="macro")
    assert M.auroc(y, proba) == pytest.approx(100 * expected)


def test_multiclass_auroc_skips_absent_class() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)  # class 3 of 4 never occurs
    proba = rng.dirichlet(np.ones(4), size=200)
    per = [100 * sk.roc_auc_score(y == c, proba[:, c]) for c in range(3)]
    assert M.auroc(y, proba) == pytest.approx(np.mean(per))


def test_classification_metrics_headline_and_warning() -> None:
    y = np.array([0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    out, warns = M.classification_metrics(y, proba, "mean_per_class_accuracy")
    assert out["accuracy"] == pytest.approx(75.0)
    assert out["mean_per_class_accuracy"] == pytest.approx((100 + 200 / 3) / 2)
    assert out["headline"] == out["mean_per_class_accuracy"]
    assert out["auroc"] == pytest.approx(100 * sk.roc_auc_score(y, proba[:, 1]))
    assert warns == []
    out, warns = M.classification_metrics(np.array([1, 1]), proba[:2], "accuracy")
    assert "auroc" not in out and warns and "AUROC" in warns[0]
    with pytest.raises(ValueError, match="unknown headline"):
        M.classification_metrics(y, proba, "f1")


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        M.accuracy([0, 1], [0])


def test_bootstrap_interval_is_seeded_resamples_patients_and_covers_the_value() -> None:
    from medxfer.protocols.metrics import bootstrap_interval, test_report

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    proba = np.stack([1 - y, y], 1) * 0.3 + rng.random((400, 2)) * 0.7  # about 80% right
    acc = 100.0 * np.mean(proba.argmax(1) == y)
    lo, hi, used = bootstrap_interval(y, proba, "accuracy", n_boot=400, seed=3)
    assert lo < acc < hi and used == 400 and 2.0 < hi - lo < 12.0
    assert bootstrap_interval(y, proba, "accuracy", n_boot=400, seed=3) == (lo, hi, used)
    assert bootstrap_interval(y, proba, "accuracy", n_boot=400, seed=4) != (lo, hi, used)
    # twenty images per patient that share their outcome: resampling patients widens the interval
    patients = np.repeat(np.arange(20), 20)
    correct = rng.random(20) < 0.85
    pred = np.where(np.repeat(correct, 20), y, 1 - y)
    clustered = np.eye(2)[pred]
    plo, phi, _ = bootstrap_interval(y, clustered, "accuracy", groups=list(patients), n_boot=400, seed=3)
    ilo, ihi, _ = bootstrap_interval(y, clustered, "accuracy", n_boot=400, seed=3)
    assert (phi - plo) > 2 * (ihi - ilo)
    metrics, half, details, _ = test_report(y, proba, "auroc", n_boot=200, seed=0)
    assert metrics["test_n"] == 400 and half == pytest.approx((metrics["ci95_high"] - metrics["ci95_low"]) / 2)
    assert metrics["ci95_low"] < metrics["auroc"] < metrics["ci95_high"] and details["unit"] == "image"
