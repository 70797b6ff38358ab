"""Paired statistics on per-episode accuracies (every model sees the same episodes)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medxfer.errors import UsageError


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (a - b) over shared episodes, in percent, with its 95% half-width and a
    two-sided p value of the paired z test (normal approximation; fine for 600 episodes)."""

    mean: float
    ci95: float
    p_value: float
    n: int


def paired_difference(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> PairedDifference:
    """Compare two models on the same episodes (fractions in [0, 1])."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise UsageError(f"paired comparison needs two equal-length episode lists, got {x.shape} and {y.shape}")
    d = x - y
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    if se == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = math.erfc(abs(mean / se) / math.sqrt(2.0))
    return PairedDifference(100.0 * mean, 100.0 * 1.96 * se, p, len(d))
