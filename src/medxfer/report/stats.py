"""Statistics for the report (PROTOCOL.md, "Statistics (beyond the paper)").

Three kinds of question, each answered by a function returning a dataclass whose
``to_dict()`` is JSON-safe (non-finite numbers become ``None``), for ``report/stats.json``:

- Within a dataset (:func:`compare_with_best`): every model sees the same few-shot episodes,
  so each model is compared with the best by its per-episode differences: paired t test,
  Wilcoxon signed-rank as the robust check, Holm over the k-1 comparisons. The interval is
  over episode sampling *given this test pool*; it says nothing about a new test set.
- Generalisation (:func:`bootstrap_interval`, :func:`bootstrap_intervals`): the caller's
  function re-runs the same episode seeds on a pool resampled with replacement (images or
  patients); the percentile interval of its output covers a new draw of the test pool.
- Across datasets (:func:`compare_across_datasets`): mean ranks, Friedman and Iman-Davenport,
  pairwise Wilcoxon signed-rank with Holm over all pairs, cliques for a critical-difference
  diagram, and the Nemenyi critical difference (Demšar 2006), with a plain statement when
  there are too few datasets for any pair to be significant.

:func:`paired_difference` (paired z test) is the older two-model helper, kept for callers; the
report (summary.md, tables, report.html, stats.json) uses :func:`compare_with_best`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from medxfer.errors import UsageError

log = logging.getLogger(__name__)

ArrayLike = Sequence[float] | np.ndarray

VERDICT_BEST = "best"
VERDICT_SAME = "not significantly different from the best"
VERDICT_WORSE = "worse"

EPISODE_SCOPE = ("episode sampling given this test pool (the same images re-drawn into new "
                 "episodes); not a new test set")
BOOTSTRAP_SCOPE = ("a new test pool: the pool resampled with replacement, the same episode seeds "
                   "re-run on it")

#: How zero differences enter the Wilcoxon signed-rank test by default. Episode accuracies
#: move in steps of 1/(K*Q) (1/30 for 2-way with 15 queries), so two models often score the
#: same on an episode. "zsplit" ranks the zeros with the others and splits their ranks
#: equally between the positive and the negative sum (Demšar 2006, section 3.1.3): ties
#: count as evidence of no difference and every episode stays in n. "wilcox" would drop them
#: and test only the episodes that differ, which overstates the evidence when ties are many.
DEFAULT_ZERO_METHOD = "zsplit"


class StatsInputError(UsageError):
    """The numbers given to a statistics function cannot be used as they are."""


# ----------------------------------------------------------------------------- helpers

def _json_safe(value: Any) -> Any:
    """Plain Python containers and numbers, with NaN and infinities as ``None``."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON containers and numbers, NaN and infinities as ``None``."""
    return _json_safe(value)


class _ToDict:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``json.dumps(..., allow_nan=False)`` accepts it)."""
        return _json_safe(asdict(self))  # type: ignore[call-overload]


def _as_vector(values: ArrayLike, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise StatsInputError(f"{what}: expected a 1-D list of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise StatsInputError(f"{what}: contains NaN or infinite values")
    return x


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise StatsInputError(f"alpha must be in (0, 1), got {alpha}")


def holm_adjust(p_values: ArrayLike) -> np.ndarray:
    """Holm step-down adjusted p values, in the input order.

    With the m p values sorted ascending, p_(i) becomes max over j <= i of
    min(1, (m - j + 1) * p_(j)): monotone in the sorted order, capped at 1. A hypothesis is
    rejected at level alpha exactly when its adjusted p is <= alpha.
    """
    p = _as_vector(p_values, "p values")
    if np.any((p < 0) | (p > 1)):
        raise StatsInputError(f"p values must lie in [0, 1], got {p[(p < 0) | (p > 1)].tolist()}")
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(scaled))
    out = np.empty(m)
    out[order] = adjusted_sorted
    return out


def _wilcoxon(d: np.ndarray, zero_method: str) -> tuple[float, float]:
    """(statistic, two-sided p) of the signed-rank test on differences ``d`` (scipy), with
    all-zero differences answered directly (statistic 0, p 1) instead of scipy's NaN."""
    if not np.any(d != 0):
        return 0.0, 1.0
    res = sps.wilcoxon(d, zero_method=zero_method, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


# ------------------------------------------------------------------- within a dataset

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


@dataclass(frozen=True)
class PairedTest(_ToDict):
    """One model against the best on the same episodes; differences in accuracy points
    (model minus best, so <= 0). The best model's own row has difference 0 and NaN (``None``
    in ``to_dict``) wherever a test would go."""

    model: str
    accuracy: float  # mean episode accuracy, percent
    difference: float  # mean of (model - best), points
    ci_low: float  # t interval of the mean difference, points
    ci_high: float
    t_statistic: float
    t_p_value: float
    t_p_holm: float
    wilcoxon_statistic: float  # min(R+, R-) with zeros split
    wilcoxon_p_value: float
    wilcoxon_p_holm: float
    zero_differences: int  # episodes where both models scored the same
    verdict: str
    wilcoxon_agrees: bool  # the Holm-adjusted Wilcoxon decision is the same as the t test's


@dataclass(frozen=True)
class DatasetComparison(_ToDict):
    """Every model against the best one of a dataset, on shared episodes."""

    dataset: str
    best: str
    n_episodes: int
    alpha: float
    confidence: float
    zero_method: str
    rows: list[PairedTest]
    test: str = "paired t test on per-episode differences; Holm over the k-1 comparisons"
    robust_check: str = "Wilcoxon signed-rank on the same differences; Holm over the k-1 comparisons"
    interval_covers: str = EPISODE_SCOPE

    def row(self, model: str) -> PairedTest:
        for r in self.rows:
            if r.model == model:
                return r
        raise KeyError(model)


def _t_test(d: np.ndarray, confidence: float) -> tuple[float, float, float, float]:
    """(t, two-sided p, CI low, CI high) of the mean of ``d`` (scipy's ttest_1samp, which is
    ttest_rel on the pairs); a constant ``d`` is answered directly (no spread: p is 0 unless
    the constant is 0), where scipy would divide by zero."""
    mean = float(d.mean())
    if np.all(d == d[0]):
        return (0.0, 1.0, mean, mean) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0, mean, mean)
    res = sps.ttest_1samp(d, 0.0)
    ci = res.confidence_interval(confidence_level=confidence)
    return float(res.statistic), float(res.pvalue), float(ci.low), float(ci.high)


def compare_with_best(
    episode_accuracies: Mapping[str, ArrayLike],
    *,
    dataset: str = "",
    alpha: float = 0.05,
    confidence: float = 0.95,
    zero_method: str = DEFAULT_ZERO_METHOD,
) -> DatasetComparison:
    """Compare each model with the best one on the same few-shot episodes.

    ``episode_accuracies`` maps model name to its per-episode accuracies (fractions in
    [0, 1], the same episodes in the same order for every model). The best model has the
    highest mean (ties: the first in the mapping's order). For every other model: the mean
    difference (model - best) in points with a ``confidence`` t interval, the paired t test
    and the Wilcoxon signed-rank test (``zero_method``, see :data:`DEFAULT_ZERO_METHOD`),
    each Holm-adjusted over the k-1 comparisons (scipy's Wilcoxon p is the normal
    approximation with continuity correction beyond 50 episodes, or with ties or zeros
    beyond 13). Verdict, from the Holm-adjusted t test: "worse" when it is <= alpha, else
    "not significantly different from the best".
    """
    _check_alpha(alpha)
    if not 0.0 < confidence < 1.0:
        raise StatsInputError(f"confidence must be in (0, 1), got {confidence}")
    if zero_method not in ("zsplit", "pratt", "wilcox"):
        raise StatsInputError(f"zero_method must be 'zsplit', 'pratt' or 'wilcox', got {zero_method!r}")
    if len(episode_accuracies) < 2:
        raise StatsInputError(f"dataset {dataset!r}: need at least two models, got {len(episode_accuracies)}")
    acc = {m: _as_vector(v, f"dataset {dataset!r}, model {m!r}") for m, v in episode_accuracies.items()}
    lengths = {m: len(v) for m, v in acc.items()}
    if len(set(lengths.values())) != 1:
        raise StatsInputError(f"dataset {dataset!r}: models saw different numbers of episodes: {lengths}")
    n = next(iter(lengths.values()))
    if n < 2:
        raise StatsInputError(f"dataset {dataset!r}: need at least two episodes, got {n}")
    for m, v in acc.items():
        if v.min() < 0.0 or v.max() > 1.0:
            raise StatsInputError(f"dataset {dataset!r}, model {m!r}: episode accuracies must be fractions "
                                  f"in [0, 1], got values in [{v.min()}, {v.max()}]")
    means = {m: float(v.mean()) for m, v in acc.items()}
    best = max(means, key=lambda m: means[m])  # max keeps the first of equal means
    others = [m for m in acc if m != best]
    raw = {}
    for m in others:
        # rounded to 12 decimals: accuracies are multiples of 1/(K*Q), so equal scores give exact
        # zeros and constant differences stay exactly constant despite float noise
        d = np.round(acc[m] - acc[best], 12)
        t, tp, lo, hi = _t_test(d, confidence)
        w, wp = _wilcoxon(d, zero_method)
        raw[m] = (d, t, tp, lo, hi, w, wp)
    t_holm = dict(zip(others, holm_adjust([raw[m][2] for m in others])))
    w_holm = dict(zip(others, holm_adjust([raw[m][6] for m in others])))
    rows = []
    for m in acc:
        if m == best:
            nan = math.nan  # no test of the best against itself (None in to_dict)
            rows.append(PairedTest(m, 100.0 * means[m], 0.0, nan, nan, nan, nan, nan, nan, nan, nan, n,
                                   VERDICT_BEST, True))
            continue
        d, t, tp, lo, hi, w, wp = raw[m]
        t_sig = t_holm[m] <= alpha
        verdict = VERDICT_WORSE if t_sig and d.mean() < 0 else VERDICT_SAME
        rows.append(PairedTest(
            model=m, accuracy=100.0 * means[m], difference=100.0 * float(d.mean()),
            ci_low=100.0 * lo, ci_high=100.0 * hi, t_statistic=t, t_p_value=tp, t_p_holm=float(t_holm[m]),
            wilcoxon_statistic=w, wilcoxon_p_value=wp, wilcoxon_p_holm=float(w_holm[m]),
            zero_differences=int(np.count_nonzero(d == 0)), verdict=verdict,
            wilcoxon_agrees=bool((w_holm[m] <= alpha) == t_sig),
        ))
    disagree = [r.model for r in rows if not r.wilcoxon_agrees]
    if disagree:
        log.info("dataset %r: the Wilcoxon check disagrees with the t test for %s", dataset, disagree)
    return DatasetComparison(dataset=dataset, best=best, n_episodes=n, alpha=alpha, confidence=confidence,
                             zero_method=zero_method, rows=rows)


# -------------------------------------------------------------- generalisation bootstrap

@dataclass(frozen=True)
class BootstrapInterval(_ToDict):
    """Percentile bootstrap interval of one statistic over resampled test pools."""

    name: str
    estimate: float  # the statistic on the original pool
    low: float
    high: float
    level: float
    std_error: float  # standard deviation of the replicates
    n_boot: int
    unit: str  # "image" or "patient": what was resampled
    n_units: int
    seed: int
    interval_covers: str = BOOTSTRAP_SCOPE


class PoolResampler:
    """Draws bootstrap pools: ``pool`` entries with replacement, as many as there are.

    With ``groups`` (one id per pool entry, e.g. the patient), whole groups are drawn with
    replacement and all their entries kept, so the images of a patient stay together. With
    ``strata`` (e.g. the class label; constant within a group), units are drawn within each
    stratum, so every class keeps its number of units and the episodes stay drawable. An
    entry drawn twice appears twice in the pool.
    """

    def __init__(self, pool: np.ndarray | int, groups: ArrayLike | None = None,
                 strata: ArrayLike | None = None) -> None:
        base = np.arange(pool) if isinstance(pool, (int, np.integer)) else np.asarray(pool)
        if base.ndim != 1 or len(base) < 2:
            raise StatsInputError(f"bootstrap pool: need a 1-D pool of at least two entries, got shape {base.shape}")
        self.pool = base
        self._members: list[np.ndarray] | None = None
        if groups is None:
            unit_of = np.arange(len(base))
        else:
            g = np.asarray(groups)
            if g.shape != base.shape:
                raise StatsInputError(f"bootstrap groups: one id per pool entry needed, got {g.shape} "
                                      f"for {base.shape}")
            unit_of = np.unique(g, return_inverse=True)[1].reshape(-1)
            order = np.argsort(unit_of, kind="stable")
            self._members = np.split(order, np.cumsum(np.bincount(unit_of))[:-1])
        self.unit = "image" if groups is None else "patient"
        self.n_units = int(unit_of.max()) + 1
        if strata is None:
            self._strata = [np.arange(self.n_units)]
            return
        s = np.asarray(strata)
        if s.shape != base.shape:
            raise StatsInputError(f"bootstrap strata: one value per pool entry needed, got {s.shape} for {base.shape}")
        first = np.unique(unit_of, return_index=True)[1]  # the first entry of every unit
        s_unit = s[first]
        mixed = np.flatnonzero(s != s_unit[unit_of])
        if len(mixed):
            u = unit_of[mixed[0]]
            raise StatsInputError(f"bootstrap strata must be constant within a group; group "
                                  f"{np.asarray(groups)[first[u]]!r} has {sorted(set(s[unit_of == u].tolist()))}")
        self._strata = [np.flatnonzero(s_unit == v) for v in np.unique(s_unit)]

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One resampled pool (record indices), drawn with ``rng``."""
        picked = np.concatenate([rng.choice(units, size=len(units), replace=True) for units in self._strata])
        if self._members is None:
            return self.pool[picked]
        return self.pool[np.concatenate([self._members[u] for u in picked])]


def bootstrap_intervals(
    statistic: Callable[[np.ndarray], Mapping[str, float]],
    pool: np.ndarray | int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    groups: ArrayLike | None = None,
    strata: ArrayLike | None = None,
    level: float = 0.95,
) -> dict[str, BootstrapInterval]:
    """Percentile intervals of several statistics that share each resampled pool.

    ``statistic(pool_indices)`` gets the record indices of a pool (the original ``pool``
    first, then ``n_boot`` resampled ones, see :class:`PoolResampler`) and returns named
    numbers, e.g. every model's accuracy and its difference to the best, computed from
    cached features by re-running the *same* episode seeds on that pool. ``pool`` is the
    array of record indices or their count. Resampling uses ``np.random.default_rng(seed)``
    only. Note that an image drawn twice can land in an episode's support and its query;
    a statistic that must avoid it can exclude repeats of a record index. With the few-shot
    protocol's own functions, for one model::

        def accuracy(pool):
            episodes, _ = sample_episodes(labels, 2, 20, 15, 600, seed=episode_seed, pool=pool)
            return float(episode_accuracies(features, episodes).mean())
    """
    if not 0.0 < level < 1.0:
        raise StatsInputError(f"level must be in (0, 1), got {level}")
    if n_boot < 2:
        raise StatsInputError(f"n_boot must be >= 2, got {n_boot}")
    sampler = PoolResampler(pool, groups, strata)
    estimate = dict(statistic(sampler.pool.copy()))
    if not estimate:
        raise StatsInputError("bootstrap statistic returned no values")
    rng = np.random.default_rng(seed)
    reps = {k: np.empty(n_boot) for k in estimate}
    for b in range(n_boot):
        out = statistic(sampler.draw(rng))
        if set(out) != set(estimate):
            raise StatsInputError(f"bootstrap statistic returned keys {sorted(out)} on replicate {b}, "
                                  f"{sorted(estimate)} on the original pool")
        for k, v in out.items():
            reps[k][b] = float(v)
    lo_q, hi_q = (1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0
    unit, n_units = sampler.unit, sampler.n_units
    result = {}
    for k, r in reps.items():
        if not np.all(np.isfinite(r)):
            raise StatsInputError(f"bootstrap statistic {k!r} was not finite on {int(np.sum(~np.isfinite(r)))} "
                                  f"of {n_boot} replicates")
        low, high = np.quantile(r, [lo_q, hi_q])
        result[k] = BootstrapInterval(name=k, estimate=float(estimate[k]), low=float(low), high=float(high),
                                      level=level, std_error=float(r.std(ddof=1)), n_boot=n_boot, unit=unit,
                                      n_units=n_units, seed=seed)
    log.info("bootstrap: %d replicates over %d %ss (seed %d)", n_boot, n_units, unit, seed)
    return result


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    pool: np.ndarray | int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    groups: ArrayLike | None = None,
    strata: ArrayLike | None = None,
    level: float = 0.95,
    name: str = "statistic",
) -> BootstrapInterval:
    """:func:`bootstrap_intervals` for a single number."""
    return bootstrap_intervals(lambda ix: {name: statistic(ix)}, pool, n_boot=n_boot, seed=seed,
                               groups=groups, strata=strata, level=level)[name]


# ------------------------------------------------------------------ across datasets

#: Demšar (2006), Table 5(a): critical values q_alpha for the two-tailed Nemenyi test
#: (studentised range statistic for infinite degrees of freedom, divided by sqrt 2),
#: for k = 2..10 classifiers. Larger k: computed from scipy's studentised range.
NEMENYI_Q: dict[float, tuple[float, ...]] = {
    0.05: (1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164),
    0.10: (1.645, 2.052, 2.291, 2.459, 2.589, 2.693, 2.780, 2.855, 2.920),
}


def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """q_alpha of the Nemenyi test for ``k`` models (Demšar's table for k <= 10)."""
    _check_alpha(alpha)
    if k < 2:
        raise StatsInputError(f"the Nemenyi test needs at least two models, got {k}")
    if alpha in NEMENYI_Q and k <= 10:
        return NEMENYI_Q[alpha][k - 2]
    return float(sps.studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0))


def nemenyi_cd(k: int, n_datasets: int, alpha: float = 0.05) -> float:
    """Critical difference of mean ranks, q_alpha * sqrt(k (k+1) / (6 N))."""
    if n_datasets < 1:
        raise StatsInputError(f"need at least one dataset, got {n_datasets}")
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n_datasets))


def min_wilcoxon_p(n_datasets: int) -> float:
    """Smallest two-sided p the exact Wilcoxon signed-rank test can give on ``n_datasets``
    paired values: 2 / 2^N, when every difference has the same sign (ties and zeros only
    make it larger)."""
    return min(1.0, 2.0 / 2.0 ** n_datasets)


def rank_matrix(scores: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Rank of every model on every dataset (rows: datasets, columns: models), 1 = best,
    tied models sharing the average of their ranks."""
    s = np.asarray(scores, dtype=np.float64)
    return sps.rankdata(-s if higher_is_better else s, axis=1, method="average")


@dataclass(frozen=True)
class FriedmanResult(_ToDict):
    """Friedman test of equal mean ranks, with the Iman-Davenport F form."""

    n_datasets: int
    n_models: int
    chi2: float
    df: int
    p_value: float
    iman_davenport_f: float
    f_df1: int
    f_df2: int
    f_p_value: float
    tie_corrected: bool


def friedman_from_ranks(ranks: np.ndarray, tie_corrected: bool = True) -> FriedmanResult:
    """Friedman chi2 = 12 N / (k (k+1)) * (sum_j R_j^2 - k (k+1)^2 / 4) from a rank matrix
    (datasets x models, 1 = best), divided by the tie correction 1 - sum(t^3 - t) / (N k (k^2 - 1))
    when ``tie_corrected`` (as scipy.stats.friedmanchisquare does; Demšar's formula has none),
    and F_F = (N - 1) chi2 / (N (k - 1) - chi2) on (k - 1, (k - 1)(N - 1)) degrees of freedom."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 2:
        raise StatsInputError(f"Friedman test: need a datasets x models rank matrix with at least 2 of each, "
                              f"got shape {r.shape}")
    n, k = r.shape
    if not np.allclose(r.sum(axis=1), k * (k + 1) / 2.0):
        raise StatsInputError("Friedman test: every row must hold the ranks 1..k (ties averaged)")
    mean_r = r.mean(axis=0)
    chi2 = 12.0 * n / (k * (k + 1)) * (float(np.sum(mean_r ** 2)) - k * (k + 1) ** 2 / 4.0)
    if tie_corrected:
        ties = 0.0
        for row in r:
            _, counts = np.unique(row, return_counts=True)
            ties += float(np.sum(counts ** 3 - counts))
        c = 1.0 - ties / (n * k * (k * k - 1))
        chi2 = 0.0 if c <= 0 else chi2 / c  # c = 0: every model tied on every dataset
    chi2 = max(chi2, 0.0)
    p = float(sps.chi2.sf(chi2, k - 1))
    df1, df2 = k - 1, (k - 1) * (n - 1)
    denom = n * (k - 1) - chi2
    if denom <= 0:  # the same strict order on every dataset
        f, fp = math.inf, 0.0
    else:
        f = (n - 1) * chi2 / denom
        fp = float(sps.f.sf(f, df1, df2))
    return FriedmanResult(n, k, chi2, k - 1, p, f, df1, df2, fp, tie_corrected)


@dataclass(frozen=True)
class PairwiseWilcoxon(_ToDict):
    """Wilcoxon signed-rank test of two models over the datasets."""

    model_a: str
    model_b: str
    mean_rank_a: float
    mean_rank_b: float
    wins_a: int  # datasets where a scored better than b
    ties: int
    wins_b: int
    statistic: float
    p_value: float
    p_holm: float
    significant: bool


@dataclass(frozen=True)
class AcrossDatasets(_ToDict):
    """Models compared over datasets; ``models`` sorted by mean rank (best first)."""

    models: list[str]
    datasets: list[str]
    mean_ranks: dict[str, float]
    friedman: FriedmanResult
    pairwise: list[PairwiseWilcoxon]
    cliques: list[list[str]]  # Wilcoxon-Holm: runs of adjacent models with no pair significant
    nemenyi_cd: float
    nemenyi_cliques: list[list[str]]  # runs of adjacent models whose mean ranks differ < CD
    alpha: float
    zero_method: str
    n_pairs: int
    min_p: float  # smallest two-sided p any pair can reach (exact Wilcoxon, N datasets)
    any_pair_can_be_significant: bool
    datasets_needed: int  # fewest datasets with which a pair could be significant after Holm
    statement: str
    extras: dict[str, Any] = field(default_factory=dict)

    def pair(self, a: str, b: str) -> PairwiseWilcoxon:
        for p in self.pairwise:
            if {p.model_a, p.model_b} == {a, b}:
                return p
        raise KeyError((a, b))


def rank_cliques(models: Sequence[str], different: Callable[[str, str], bool]) -> list[list[str]]:
    """Maximal runs of consecutive ``models`` (in mean-rank order) in which no two are
    ``different``: the bars of a critical-difference diagram. Runs of one model and runs
    inside a longer one are left out."""
    runs: list[tuple[int, int]] = []
    k = len(models)
    for i in range(k):
        j = i
        while j + 1 < k and not any(different(models[a], models[j + 1]) for a in range(i, j + 1)):
            j += 1
        if j > i and not any(s <= i and j <= e for s, e in runs):
            runs.append((i, j))
    return [list(models[s:e + 1]) for s, e in runs]


def _datasets_needed(n_pairs: int, alpha: float) -> int:
    n = 1
    while n_pairs * min_wilcoxon_p(n) > alpha:
        n += 1
    return n


def compare_across_datasets(
    scores: Mapping[str, Mapping[str, float]],
    *,
    alpha: float = 0.05,
    higher_is_better: bool = True,
    zero_method: str = DEFAULT_ZERO_METHOD,
    tie_corrected: bool = True,
) -> AcrossDatasets:
    """Rank models over datasets: ``scores[dataset][model]`` (every model on every dataset).

    Mean ranks (1 = best, ties averaged), Friedman and Iman-Davenport, the Wilcoxon
    signed-rank test for every pair of models over the datasets with Holm over all
    k (k-1) / 2 pairs (Benavoli et al. 2016), the cliques of a critical-difference diagram
    from those tests, and the Nemenyi critical difference (Demšar 2006) for reference. When
    the number of datasets is too small for any pair to survive Holm (N datasets give at
    best p = 2 / 2^N per pair), ``statement`` says so instead of implying an order.
    Wilcoxon p values are scipy's: exact without ties or zeros, an exhaustive sign-flip
    permutation test with them for up to 13 datasets, the normal approximation beyond.
    """
    _check_alpha(alpha)
    datasets = list(scores)
    if len(datasets) < 2:
        raise StatsInputError(f"need at least two datasets, got {len(datasets)}")
    models = list(dict.fromkeys(m for ds in datasets for m in scores[ds]))
    if len(models) < 2:
        raise StatsInputError(f"need at least two models, got {models}")
    missing = [f"{m} on {ds}" for ds in datasets for m in models if m not in scores[ds]]
    if missing:
        raise StatsInputError("every model needs a score on every dataset; missing: " + ", ".join(missing))
    mat = np.array([[float(scores[ds][m]) for m in models] for ds in datasets])
    if not np.all(np.isfinite(mat)):
        bad = [f"{models[j]} on {datasets[i]}" for i, j in zip(*np.nonzero(~np.isfinite(mat)))]
        raise StatsInputError("scores must be finite; not finite: " + ", ".join(bad))
    n, k = mat.shape
    ranks = rank_matrix(mat, higher_is_better)
    mean_r = ranks.mean(axis=0)
    fried = friedman_from_ranks(ranks, tie_corrected=tie_corrected)

    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    raw = []
    for i, j in pairs:
        d = np.round(mat[:, i] - mat[:, j], 12)  # equal differences tie exactly despite float noise
        if not higher_is_better:
            d = -d
        w, p = _wilcoxon(d, zero_method)
        raw.append((int(np.sum(d > 0)), int(np.sum(d == 0)), int(np.sum(d < 0)), w, p))
    p_holm = holm_adjust([r[4] for r in raw])
    pairwise = [
        PairwiseWilcoxon(models[i], models[j], float(mean_r[i]), float(mean_r[j]), wa, t, wb, w, p,
                         float(ph), bool(ph <= alpha))
        for (i, j), (wa, t, wb, w, p), ph in zip(pairs, raw, p_holm)
    ]
    sig = {frozenset((pw.model_a, pw.model_b)) for pw in pairwise if pw.significant}
    order = [models[i] for i in np.argsort(mean_r, kind="stable")]
    mr = {models[i]: float(mean_r[i]) for i in range(k)}
    cliques = rank_cliques(order, lambda a, b: frozenset((a, b)) in sig)
    cd = nemenyi_cd(k, n, alpha)
    nem = rank_cliques(order, lambda a, b: abs(mr[a] - mr[b]) >= cd)

    m = len(pairs)
    p_min = min_wilcoxon_p(n)
    possible = m * p_min <= alpha
    needed = _datasets_needed(m, alpha)
    statement = _across_statement(n, k, m, p_min, possible, needed, alpha, fried, pairwise, cd)
    log.info("across datasets: %s", statement)
    return AcrossDatasets(
        models=order, datasets=datasets, mean_ranks={mm: mr[mm] for mm in order}, friedman=fried,
        pairwise=pairwise, cliques=cliques, nemenyi_cd=cd, nemenyi_cliques=nem, alpha=alpha,
        zero_method=zero_method, n_pairs=m, min_p=p_min, any_pair_can_be_significant=possible,
        datasets_needed=needed, statement=statement,
        extras={"nemenyi_q": nemenyi_q(k, alpha), "higher_is_better": higher_is_better},
    )


def _across_statement(n: int, k: int, m: int, p_min: float, possible: bool, needed: int, alpha: float,
                      fried: FriedmanResult, pairwise: list[PairwiseWilcoxon], cd: float) -> str:
    if not possible:
        return (f"With {n} datasets the smallest two-sided Wilcoxon signed-rank p for a pair of models is "
                f"2/2^{n} = {p_min:.2g}; Holm over the {m} pairs of {k} models multiplies the smallest p by {m} "
                f"({m * p_min:.3g} > {alpha:g}), so no pair can be significantly different, whatever the "
                f"results. The mean ranks describe these {n} datasets and do not establish an order; "
                f"at least {needed} datasets would be needed.")
    n_sig = sum(p.significant for p in pairwise)
    verdict = "rejects" if fried.p_value <= alpha else "does not reject"
    return (f"{n} datasets, {k} models: the Friedman test {verdict} equal mean ranks "
            f"(chi2 = {fried.chi2:.3g}, p = {fried.p_value:.3g}); {n_sig} of {m} pairs differ significantly "
            f"by the Wilcoxon signed-rank test after Holm (alpha {alpha:g}). Nemenyi critical difference "
            f"of mean ranks: {cd:.3g}.")
