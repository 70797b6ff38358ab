"""Classification metrics shared by the many-shot protocols (linear probe, finetuning).

All accuracies are percentages. AUROC is also a percentage (100 = perfect ranking), computed
from probabilities with the rank (Mann-Whitney) formula, ties counted as one half.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from medxfer.errors import UsageError

log = logging.getLogger(__name__)

HEADLINE_METRICS = ("accuracy", "mean_per_class_accuracy", "balanced_accuracy", "auroc")


def _check(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    yt = np.asarray(y_true).astype(np.int64).ravel()
    yp = np.asarray(y_pred).astype(np.int64).ravel()
    if yt.shape != yp.shape:
        raise UsageError(f"y_true and y_pred differ in length: {yt.shape[0]} vs {yp.shape[0]}")
    if yt.size == 0:
        raise UsageError("cannot compute a metric on an empty set")
    return yt, yp


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Percentage of correct predictions."""
    yt, yp = _check(y_true, y_pred)
    return float(100.0 * np.mean(yt == yp))


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> dict[int, float]:
    """Recall (percent) of every class present in ``y_true``."""
    yt, yp = _check(y_true, y_pred)
    return {int(c): float(100.0 * np.mean(yp[yt == c] == c)) for c in np.unique(yt)}


def mean_per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in ``y_true`` of their accuracy (the paper's EyePACS metric)."""
    return float(np.mean(list(per_class_accuracy(y_true, y_pred).values())))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, adjusted: bool = False) -> float:
    """Balanced accuracy (percent) as scikit-learn defines it: the mean recall over the classes
    present in ``y_true`` (so it equals :func:`mean_per_class_accuracy`); ``adjusted`` rescales
    it so chance level is 0 and perfect is 100."""
    score = mean_per_class_accuracy(y_true, y_pred)
    if adjusted:
        k = len(np.unique(np.asarray(y_true)))
        chance = 100.0 / k
        score = (score - chance) / (100.0 - chance) * 100.0 if k > 1 else 0.0
    return float(score)


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def binary_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """AUROC (percent) of ``scores`` for the positive class ``y_true == 1``; NaN when one class is absent.

    Mann-Whitney: (sum of positive ranks - P(P+1)/2) / (P * Q), midranks for ties.
    """
    yt = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if yt.shape != s.shape:
        raise UsageError(f"labels and scores differ in length: {yt.size} vs {s.size}")
    n_pos = int(yt.sum())
    n_neg = yt.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _midranks(s)
    u = ranks[yt].sum() - n_pos * (n_pos + 1) / 2.0
    return float(100.0 * u / (n_pos * n_neg))


def auroc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """AUROC (percent) from class probabilities ``proba`` (N x K).

    Binary (K = 2): the AUROC of the class-1 probability. Multi-class: the macro average of
    one-vs-rest AUROCs over the classes that have both positives and negatives in ``y_true``
    (scikit-learn's ``multi_class="ovr", average="macro"`` when every class is present).
    NaN when no class qualifies.
    """
    p = np.asarray(proba, dtype=np.float64)
    yt = np.asarray(y_true).astype(np.int64).ravel()
    if p.ndim != 2 or p.shape[0] != yt.size:
        raise UsageError(f"proba must be N x K with N={yt.size}, got {p.shape}")
    k = p.shape[1]
    if k == 2:
        return binary_auroc(yt == 1, p[:, 1])
    per_class = [binary_auroc(yt == c, p[:, c]) for c in range(k)]
    valid = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(valid)) if valid else math.nan


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, headline: str = "accuracy"
) -> tuple[dict[str, float], list[str]]:
    """Every many-shot metric from probabilities, plus ``headline`` = the named metric's value.

    Returns ``(metrics, warnings)``; an undefined AUROC (a single class in ``y_true``) is left
    out of ``metrics`` and explained in ``warnings``.
    """
    if headline not in HEADLINE_METRICS:
        raise UsageError(f"unknown headline metric {headline!r}; choose from {', '.join(HEADLINE_METRICS)}")
    p = np.asarray(proba)
    pred = p.argmax(axis=1)
    out: dict[str, float] = {
        "accuracy": accuracy(y_true, pred),
        "mean_per_class_accuracy": mean_per_class_accuracy(y_true, pred),
        "balanced_accuracy": balanced_accuracy(y_true, pred),
    }
    warnings: list[str] = []
    a = auroc(y_true, p)
    if math.isnan(a):
        warnings.append("AUROC undefined: the evaluated split has a single class")
    else:
        out["auroc"] = a
    if headline not in out:
        raise UsageError(f"headline metric {headline!r} is undefined on this split")
    out["headline"] = out[headline]
    return out, warnings


def metric_fn(name: str) -> Any:
    """The label-based metric ``name`` (``accuracy`` | ``mean_per_class_accuracy`` | ``balanced_accuracy``)."""
    fns = {"accuracy": accuracy, "mean_per_class_accuracy": mean_per_class_accuracy,
           "balanced_accuracy": balanced_accuracy}
    if name not in fns:
        raise UsageError(f"{name!r} cannot select hyper-parameters; choose from {', '.join(fns)}")
    return fns[name]


def headline_value(y_true: np.ndarray, proba: np.ndarray, headline: str) -> float:
    """The one metric ``headline`` (percent) from probabilities; NaN where undefined."""
    p = np.asarray(proba)
    if headline == "auroc":
        return auroc(y_true, p)
    return metric_fn(headline)(y_true, p.argmax(axis=1))


def bootstrap_interval(y_true: np.ndarray, proba: np.ndarray, headline: str, *, groups: Any = None,
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, int] | None:
    """Percentile bootstrap interval of the headline metric over test images, resampling whole
    groups (patients) with replacement where ``groups`` are given; seeded locally.

    Returns (low, high, replicates used) or None when fewer than half the replicates define the
    metric (e.g. AUROC on resamples with one class). The interval covers resampling the test
    set from the same population, with the fitted model held fixed.
    """
    y = np.asarray(y_true)
    p = np.asarray(proba)
    n = len(y)
    if n_boot < 1 or n < 2:
        return None
    if groups is None or all(g is None for g in groups):
        gid = np.arange(n)
    else:
        keys = [f"#{i}" if g is None else str(g) for i, g in enumerate(groups)]
        _, gid = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    order = np.argsort(gid, kind="stable")
    counts = np.bincount(gid)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng([seed, 0xB0075])
    values = []
    for _ in range(n_boot):
        draw = rng.integers(0, len(counts), len(counts))
        sizes = counts[draw]
        offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        rows = order[np.repeat(starts[draw], sizes) + offsets]
        values.append(headline_value(y[rows], p[rows], headline))
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < n_boot / 2:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    return float(np.percentile(v, tail)), float(np.percentile(v, 100.0 - tail)), int(len(v))


def test_report(y_true: np.ndarray, proba: np.ndarray, headline: str, *, groups: Any = None, n_boot: int = 1000,
                seed: int = 0) -> tuple[dict[str, float], float | None, dict[str, Any], list[str]]:
    """Test metrics of a many-shot protocol with their uncertainty: every metric, ``test_n``,
    and the bootstrap interval of the headline (``ci95_low``/``ci95_high``; the returned
    half-width is half the interval). Returns (metrics, half-width or None, details, warnings)."""
    metrics, warns = classification_metrics(y_true, proba, headline)
    metrics["test_n"] = float(len(y_true))
    unit = "image" if groups is None or all(g is None for g in groups) else "patient"
    interval = bootstrap_interval(y_true, proba, headline, groups=groups, n_boot=n_boot, seed=seed)
    details: dict[str, Any] = {"replicates": n_boot, "unit": unit, "level": 0.95, "seed": seed,
                               "covers": "resampling the test set with the fitted model held fixed"}
    if interval is None:
        if n_boot > 0:
            warns.append(f"no bootstrap interval for {headline}: undefined on too many resamples")
        return metrics, None, dict(details, interval=None), warns
    lo, hi, used = interval
    metrics["ci95_low"], metrics["ci95_high"] = lo, hi
    return metrics, (hi - lo) / 2.0, dict(details, interval=[lo, hi], replicates_used=used), warns
