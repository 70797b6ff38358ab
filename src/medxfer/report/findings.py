"""What the report states, computed once from a :class:`~medxfer.report.collect.Collection`:
the few-shot settings and pool sizes, every model against the best on shared episodes,
ranks across datasets, min-max scaled family averages, correlations with the analyses and
the transferability scores' rank agreement. Tables, figures, ``report.html`` and
``stats.json`` all read these objects, so every number appears once and agrees everywhere.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from medxfer.report.collect import FAMILIES, Collection, Value, is_analysis
from medxfer.report.stats import (
    EPISODE_SCOPE,
    VERDICT_BEST,
    VERDICT_SAME,
    VERDICT_WORSE,
    AcrossDatasets,
    DatasetComparison,
    StatsInputError,
    compare_across_datasets,
    compare_with_best,
)
from medxfer.results import Result

log = logging.getLogger(__name__)

ALPHA = 0.05
#: A few-shot pool is "barely larger" than one episode's draw when its smallest class holds
#: fewer than this many times shots + queries: the episodes then reuse almost the same images.
POOL_WARN_FACTOR = 2.0
#: Invariance metrics in the paper's order (others found in the results follow by name).
INVARIANCE_METRICS = ("rotation", "hflip", "hue", "multiview")
LPIPS_METRICS = ("lpips_alex", "lpips_squeeze", "lpips_vgg", "lpips_mean")
DIFFUSION = "attentive_diffusion"
NON_SCORES = {"ci95", "ci95_low", "ci95_high", "n", "images", "n_images", "episodes", "test_n", "seconds"}


def _is_score_name(name: str) -> bool:
    return name not in NON_SCORES and not name.endswith(("_ci95", ".ci95", "_n", "_std", "_s"))


# --------------------------------------------------------------------- few-shot settings

@dataclass(frozen=True)
class PoolFacts:
    """The episodes' settings and the pool they were drawn from, for one (table, dataset)."""

    n_way: int | None
    n_shot: int | None
    n_query: int | None
    episodes: int | None
    pool_images: int | None
    per_class: dict[str, int]  # images per class in the pool (estimated when ``exact`` is False)
    exact: bool
    test_images: int | None

    @property
    def need(self) -> int | None:
        return None if self.n_shot is None or self.n_query is None else self.n_shot + self.n_query

    @property
    def smallest(self) -> tuple[str, int] | None:
        usable = {c: n for c, n in self.per_class.items() if self.need is None or n >= self.need}
        if not usable:
            return None
        c = min(usable, key=lambda k: (usable[k], k))
        return c, usable[c]

    def settings_text(self) -> str:
        if self.n_way is None:
            return "settings not recorded"
        return f"{self.n_way}-way {self.n_shot}-shot, {self.n_query} queries, {self.episodes} episodes"

    def pool_text(self) -> str:
        if self.pool_images is None:
            return "pool not recorded"
        s = f"{self.pool_images} images"
        small = self.smallest
        if small is not None:
            s += f"; smallest class {'' if self.exact else '≈'}{small[1]}"
        return s

    @property
    def barely_larger(self) -> bool:
        small, need = self.smallest, self.need
        return small is not None and need is not None and small[1] < POOL_WARN_FACTOR * need

    def warning(self, dataset_label: str) -> str | None:
        """A plain warning when the pool is barely larger than one episode's draw per class."""
        if not self.barely_larger:
            return None
        cls, n = self.smallest  # type: ignore[misc]
        need = self.need or 0
        approx = "" if self.exact else "about "
        return (f"{dataset_label}: the few-shot pool is barely larger than shots + queries per class: class "
                f"{cls!r} has {approx}{n} images and every episode draws {need} of them ({100.0 * need / n:.0f}%). "
                f"The {self.episodes} episodes are reshuffles of nearly one set of images, so the ± interval "
                f"and the paired p values say little about the dataset beyond these images.")

    def to_dict(self) -> dict[str, Any]:
        small = self.smallest
        return {"n_way": self.n_way, "n_shot": self.n_shot, "n_query": self.n_query, "episodes": self.episodes,
                "pool_images": self.pool_images, "pool_per_class": dict(self.per_class),
                "pool_per_class_exact": self.exact, "smallest_class": small[0] if small else None,
                "smallest_class_images": small[1] if small else None, "need_per_class": self.need,
                "barely_larger": self.barely_larger, "test_images": self.test_images}


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def pool_facts(r: Result) -> PoolFacts:
    """Settings and pool of a few-shot result: classes' pool sizes from the dataset's counts
    (exact when the pool is every image or the whole train split, else estimated)."""
    p, d = r.params, r.details
    counts = r.dataset_info.counts or {}
    classes = list(r.dataset_info.class_names)
    total = {c: sum(int(split.get(c, 0)) for split in counts.values()) for c in classes} if counts else {}
    train = {c: int(counts.get("train", {}).get(c, 0)) for c in classes} if counts else {}
    pool_images = _int(d.get("pool_images"))
    pool_size = p.get("pool_size")
    pool_splits = p.get("pool_splits")
    per_class: dict[str, int] = {}
    exact = True
    if total and pool_size is None and pool_splits:
        per_class = {c: sum(int(counts.get(s, {}).get(c, 0)) for s in pool_splits) for c in classes}
    elif total and pool_size is None:
        per_class = total
    elif train and pool_size is not None and pool_size >= sum(train.values()):
        per_class = train
    elif train and pool_images:
        n_train = sum(train.values()) or 1
        per_class = {c: int(round(pool_images * n / n_train)) for c, n in train.items()}
        exact = False
    elif pool_images and classes:
        per_class = {c: pool_images // len(classes) for c in classes}
        exact = False
    test = sum(counts.get("test", {}).values()) if counts else None
    return PoolFacts(n_way=_int(p.get("n_way")), n_shot=_int(p.get("n_shot")), n_query=_int(p.get("n_query")),
                     episodes=_int(p.get("episodes")) or (len(r.episode_accuracies or []) or None),
                     pool_images=pool_images, per_class=per_class, exact=exact, test_images=test or None)


def test_images(r: Result) -> int | None:
    """Test images of a many-shot result: ``metrics["test_n"]``, else the dataset's test split."""
    n = _int(r.metrics.get("test_n"))
    if n is not None:
        return n
    split = (r.dataset_info.counts or {}).get("test")
    return sum(split.values()) if split else None


# ------------------------------------------------------------------ within a dataset

@dataclass
class FewShotPairs:
    """Every model against the best of one dataset on shared episodes (one seed)."""

    table: str
    dataset: str
    seed: int
    results: dict[str, Result]  # model -> the result compared
    comparison: DatasetComparison | None
    unpaired: list[str]  # models that saw other episodes
    reason: str | None  # why there is no comparison
    pool: PoolFacts
    episodes_sha256: str | None
    bootstrap: dict[str, Any] | None = None  # filled by the generalisation bootstrap

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"table": self.table, "dataset": self.dataset, "seed": self.seed,
                               "episodes_sha256": self.episodes_sha256, "settings": self.pool.to_dict(),
                               "unpaired_models": list(self.unpaired), "reason": self.reason,
                               "p_values_conditional_on": EPISODE_SCOPE}
        out["comparison"] = self.comparison.to_dict() if self.comparison is not None else None
        out["bootstrap"] = self.bootstrap
        return out


def fewshot_pairs(coll: Collection, table: str, results: list[Result]) -> list[FewShotPairs]:
    """:class:`FewShotPairs` for every dataset of a few-shot table, with the lowest seed."""
    out = []
    for ds in coll.datasets_of(results):
        rs = [r for r in results if r.dataset == ds]
        seed = min(r.seed for r in rs)
        per_model = {r.model: r for r in sorted(rs, key=lambda r: coll.models.index(r.model)) if r.seed == seed}
        first = next(iter(per_model.values()))
        pool = pool_facts(first)
        with_eps = {m: r for m, r in per_model.items() if r.episode_accuracies}
        groups: dict[str, list[str]] = defaultdict(list)
        for m, r in with_eps.items():
            groups[str(r.details.get("episodes_sha256"))].append(m)
        if not groups:
            out.append(FewShotPairs(table, ds, seed, per_model, None, [], "no per-episode accuracies recorded",
                                    pool, None))
            continue
        best_model = max(with_eps, key=lambda m: with_eps[m].headline.value)
        sha = max(groups, key=lambda s: (len(groups[s]), best_model in groups[s]))
        members = groups[sha]
        unpaired = [m for m in per_model if m not in members]
        if len(members) < 2:
            out.append(FewShotPairs(table, ds, seed, per_model, None, unpaired,
                                    "only one model on these episodes: nothing to compare", pool, sha))
            continue
        acc = {m: np.asarray(with_eps[m].episode_accuracies, dtype=np.float64) for m in members}
        if len({len(v) for v in acc.values()}) != 1:
            out.append(FewShotPairs(table, ds, seed, per_model, None, unpaired,
                                    "models recorded different numbers of episodes", pool, sha))
            continue
        try:
            comp = compare_with_best(acc, dataset=ds, alpha=ALPHA)
        except StatsInputError as exc:  # e.g. accuracies outside [0, 1] in a hand-made result
            out.append(FewShotPairs(table, ds, seed, per_model, None, unpaired, f"cannot compare: {exc}", pool, sha))
            continue
        out.append(FewShotPairs(table, ds, seed, {m: per_model[m] for m in per_model}, comp, unpaired, None,
                                pool, sha))
    return out


# ------------------------------------------------------------------- across datasets

@dataclass
class Across:
    """Ranks of one transfer table over its datasets, or why they were not computed."""

    table: str
    result: AcrossDatasets | None
    excluded_models: list[str]
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "excluded_models": self.excluded_models, "reason": self.reason,
                **(self.result.to_dict() if self.result is not None else {})}


def across_datasets(coll: Collection, table: str, results: list[Result]) -> Across:
    grid = coll.grid(results)
    datasets = coll.datasets_of(results)
    models = coll.models_of(results)
    complete = [m for m in models if all((m, d) in grid for d in datasets)]
    excluded = [m for m in models if m not in complete]
    if len(datasets) < 2:
        return Across(table, None, excluded, f"one dataset only ({', '.join(map(coll.dataset_label, datasets))}): "
                                             "ranks across datasets need at least two")
    if len(complete) < 2:
        return Across(table, None, excluded, "fewer than two models have results on every dataset")
    hib = results[0].headline.higher_is_better
    scores = {d: {m: grid[(m, d)].value for m in complete} for d in datasets}
    return Across(table, compare_across_datasets(scores, alpha=ALPHA, higher_is_better=hib), excluded, None)


# ---------------------------------------------------------------- scaled and grouped

def minmax_scaled(coll: Collection, results: list[Result]) -> dict[str, dict[str, float]]:
    """dataset -> model -> score min-max scaled across the models of that dataset (1 = best,
    0 = worst); a dataset where every model scores the same is left out."""
    grid = coll.grid(results)
    hib = results[0].headline.higher_is_better
    out = {}
    for d in coll.datasets_of(results):
        vals = {m: grid[(m, d)].value for m in coll.models if (m, d) in grid}
        if len(vals) < 2:
            continue
        lo, hi = min(vals.values()), max(vals.values())
        if hi == lo:
            continue
        out[d] = {m: ((v - lo) if hib else (hi - v)) / (hi - lo) for m, v in vals.items()}
    return out


def _mean_sd(values: list[float]) -> dict[str, float | int]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def family_means(coll: Collection, scaled: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """dataset -> family -> mean scaled score of that family's models."""
    out: dict[str, dict[str, float]] = {}
    for d, per in scaled.items():
        fams: dict[str, list[float]] = defaultdict(list)
        for m, v in per.items():
            fams[coll.family(m)].append(v)
        out[d] = {f: float(np.mean(v)) for f, v in sorted(fams.items(), key=lambda kv: _family_order(kv[0]))}
    return out


def by_family_and_domain(coll: Collection, values: dict[str, dict[str, float]]) -> dict[str, dict[str, dict]]:
    """family -> "in-domain"/"out-of-domain" -> mean, sd (1 sigma, over model-dataset cells), n."""
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for d, per in values.items():
        dom = "in-domain" if coll.dataset_facts[d].in_domain else "out-of-domain"
        for m, v in per.items():
            cells[coll.family(m)][dom].append(v)
    return {f: {dom: _mean_sd(v) for dom, v in sorted(cells[f].items())}
            for f in sorted(cells, key=_family_order)}


def _family_order(f: str) -> tuple[int, str]:
    return (FAMILIES.index(f) if f in FAMILIES else len(FAMILIES), f)


# --------------------------------------------------------------------- correlations

@dataclass(frozen=True)
class Correlation:
    """Pearson r of transfer score against an analysis value across the models of a dataset,
    with its two-sided p and the least-squares line y = slope * x + intercept."""

    n: int
    r: float | None
    p: float | None
    slope: float | None
    intercept: float | None
    models: list[str]
    x: list[float]
    y: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "pearson_r": self.r, "p_value": self.p, "slope": self.slope,
                "intercept": self.intercept, "models": self.models, "x": self.x, "y": self.y}


def correlation(models: list[str], x: list[float], y: list[float]) -> Correlation:
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(n, None, None, None, None, models, x, y)
    res = sps.pearsonr(x, y)
    slope, intercept = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), 1)
    return Correlation(n, float(res.statistic), float(res.pvalue), float(slope), float(intercept), models, x, y)


@dataclass
class XVariable:
    """An analysis value to correlate with transfer (attentive diffusion, an invariance, ...)."""

    slug: str
    label: str  # axis label
    title: str
    values: dict[tuple[str, str], float]  # (model, dataset) -> value; ImageNet top-1 repeats per dataset


def x_variables(coll: Collection) -> tuple[list[XVariable], list[str]]:
    """The analysis values present (and notes on those missing)."""
    out, missing = [], []
    sal = _default_variant(coll.analysis("saliency"))
    diff = coll.grid(sal, DIFFUSION) if sal else {}
    if diff:
        out.append(XVariable("attentive_diffusion", "attentive diffusion (%)", "attentive diffusion",
                             {k: v.value for k, v in diff.items()}))
    else:
        missing.append("attentive diffusion (no saliency results)")
    inv = _default_variant(coll.analysis("invariance"))
    names = invariance_metrics(inv)
    for name in names:
        g = coll.grid(inv, name)
        out.append(XVariable(f"invariance_{name}", f"{name} invariance (cosine)", f"{name} invariance",
                             {k: v.value for k, v in g.items()}))
    if not names:
        missing.append("invariance (no invariance results)")
    rec = _default_variant(coll.analysis("reconstruction"))
    lp = lpips_metrics(rec)
    if lp:
        metric = "lpips_mean" if "lpips_mean" in lp else lp[0]
        g = coll.grid(rec, metric)
        out.append(XVariable("perceptual_distance", f"perceptual distance ({metric}, lower = closer)",
                             "perceptual distance", {k: v.value for k, v in g.items()}))
    else:
        missing.append("perceptual distance (no reconstruction results)")
    top1 = {(r.model, r.dataset): float(r.model_info.imagenet_top1) for r in coll.results
            if r.model_info.imagenet_top1 is not None and not is_analysis(r.protocol)}
    if top1:
        out.append(XVariable("imagenet_top1", "ImageNet top-1 (%)", "ImageNet top-1", top1))
    else:
        missing.append("ImageNet top-1 (no model of the run states one)")
    return out, missing


def _default_variant(results: list[Result]) -> list[Result]:
    """An analysis' results without a variant when there are any, else those of its first variant."""
    plain = [r for r in results if not r.variant]
    if plain or not results:
        return plain
    first = results[0].variant
    return [r for r in results if r.variant == first]


def invariance_metrics(results: list[Result]) -> list[str]:
    present = {k for r in results for k, v in r.metrics.items() if isinstance(v, (int, float)) and _is_score_name(k)}
    known = [m for m in INVARIANCE_METRICS if m in present]
    summaries = {r.headline.metric for r in results} if known else set()  # an average over the families
    return known + sorted(present - set(known) - summaries)


def lpips_metrics(results: list[Result]) -> list[str]:
    present = {k for r in results for k, v in r.metrics.items() if isinstance(v, (int, float))}
    return [m for m in LPIPS_METRICS if m in present]


def score_metrics(results: list[Result]) -> list[str]:
    """Transferability scores in the results (numeric metrics that are not counts or intervals)."""
    present: dict[str, None] = {}
    for r in results:
        for k, v in r.metrics.items():
            if isinstance(v, (int, float)) and _is_score_name(k):
                present.setdefault(k, None)
    return list(present)


@dataclass(frozen=True)
class RankAgreement:
    """Kendall tau between a transferability score and a measured transfer result across models."""

    score: str
    table: str
    dataset: str
    n: int
    tau: float | None
    p: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "vs": self.table, "dataset": self.dataset, "n": self.n,
                "kendall_tau": self.tau, "p_value": self.p}


def rank_agreement(coll: Collection, transfer: dict[str, list[Result]]) -> list[RankAgreement]:
    tr = _default_variant(coll.analysis("transferability"))
    out: list[RankAgreement] = []
    if not tr:
        return out
    for score in score_metrics(tr):
        sg = coll.grid(tr, score)
        for table, rs in transfer.items():
            tg = coll.grid(rs)
            for d in coll.datasets_of(tr):
                models = [m for m in coll.models if (m, d) in sg and (m, d) in tg]
                x = [sg[(m, d)].value for m in models]
                y = [tg[(m, d)].value for m in models]
                if len(models) < 3:
                    continue
                if np.ptp(x) == 0 or np.ptp(y) == 0:
                    out.append(RankAgreement(score, table, d, len(models), None, None))
                    continue
                res = sps.kendalltau(x, y)
                out.append(RankAgreement(score, table, d, len(models), float(res.statistic), float(res.pvalue)))
    return out


# ---------------------------------------------------------------------------- the answer

@dataclass(frozen=True)
class Answer:
    """The best model of one (transfer table, dataset), and what the evidence says about the others."""

    table: str
    dataset: str
    best: str
    best_value: Value
    same: list[str]  # not significantly different from the best
    worse: list[str]
    untested: list[str]  # no paired test with the best (other episodes, or a many-shot protocol)
    basis: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "dataset": self.dataset, "best": self.best, "best_value": self.best_value.value,
                "best_ci95": self.best_value.ci95, "not_significantly_different": self.same, "worse": self.worse,
                "untested": self.untested, "basis": self.basis, "warnings": self.warnings}


@dataclass
class Findings:
    """Everything the report states (see the module docstring)."""

    coll: Collection
    pairs: dict[str, list[FewShotPairs]]
    across: dict[str, Across]
    scaled: dict[str, dict[str, dict[str, float]]]
    answers: list[Answer]
    xvars: list[XVariable]
    xvars_missing: list[str]
    correlations: dict[str, dict[str, dict[str, Correlation]]]  # x slug -> table -> dataset -> r
    agreement: list[RankAgreement]
    warnings: list[str]

    def pair(self, table: str, dataset: str) -> FewShotPairs | None:
        for p in self.pairs.get(table, []):
            if p.dataset == dataset:
                return p
        return None


def _basis_fewshot(p: FewShotPairs) -> str:
    c = p.comparison
    assert c is not None
    k = len(c.rows) - 1
    return (f"paired t test on {c.n_episodes} shared episodes, Holm over {k} comparison{'s' if k > 1 else ''}, "
            f"alpha {c.alpha:g}; conditional on this pool of {p.pool.pool_images} images")


def answers(coll: Collection, transfer: dict[str, list[Result]], pairs: dict[str, list[FewShotPairs]]) -> list[Answer]:
    out = []
    for table, rs in transfer.items():
        grid = coll.grid(rs)
        hib = rs[0].headline.higher_is_better
        for d in coll.datasets_of(rs):
            models = [m for m in coll.models if (m, d) in grid]
            pp = next((p for p in pairs.get(table, []) if p.dataset == d), None)
            warns = []
            if pp is not None:
                w = pp.pool.warning(coll.dataset_label(d))
                if w:
                    warns.append(w)
            if pp is not None and pp.comparison is not None:
                c = pp.comparison
                same = [r.model for r in c.rows if r.verdict == VERDICT_SAME]
                worse = [r.model for r in c.rows if r.verdict == VERDICT_WORSE]
                compared = {r.model for r in c.rows}
                untested = [m for m in models if m not in compared]
                best_v = pp.results[c.best].headline
                seeds = {r.seed for r in rs if r.dataset == d}
                basis = _basis_fewshot(pp) + (f" (seed {pp.seed} of {len(seeds)})" if len(seeds) > 1 else "")
                out.append(Answer(table, d, c.best, Value(best_v.value, best_v.ci95, 1), same, worse, untested,
                                  basis, warns))
                continue
            best = (max if hib else min)(models, key=lambda m: grid[(m, d)].value)
            others = [m for m in models if m != best]
            if not others:
                basis = "one model only: nothing to compare"
            elif pp is not None:
                basis = f"no paired test: {pp.reason}"
            else:
                basis = ("no paired test: a many-shot result is one number per model on one test split; "
                         "intervals, where shown, are per model and are not a test of the difference")
            out.append(Answer(table, d, best, grid[(best, d)], [], [], others, basis, warns))
    return out


def compute(coll: Collection) -> Findings:
    """All findings of a collection."""
    transfer = coll.transfer_tables()
    pairs = {t: fewshot_pairs(coll, t, rs) for t, rs in transfer.items() if rs[0].protocol == "fewshot"}
    across = {t: across_datasets(coll, t, rs) for t, rs in transfer.items()}
    scaled = {t: minmax_scaled(coll, rs) for t, rs in transfer.items()}
    xvars, missing = x_variables(coll)
    corr: dict[str, dict[str, dict[str, Correlation]]] = {}
    for xv in xvars:
        corr[xv.slug] = {}
        for t, rs in transfer.items():
            grid = coll.grid(rs)
            corr[xv.slug][t] = {}
            for d in coll.datasets_of(rs):
                models = [m for m in coll.models if (m, d) in grid and (m, d) in xv.values]
                corr[xv.slug][t][d] = correlation(models, [xv.values[(m, d)] for m in models],
                                                  [grid[(m, d)].value for m in models])
    warnings = []
    for ps in pairs.values():
        for p in ps:
            w = p.pool.warning(coll.dataset_label(p.dataset))
            if w and w not in warnings:
                warnings.append(w)
    for rs in transfer.values():
        for d in coll.datasets_of(rs):
            flat = [r for r in rs if r.dataset == d and r.headline.ci95 == 0.0 and r.episode_accuracies]
            for r in flat:
                warnings.append(f"{coll.model_label(r.model)} on {coll.dataset_label(d)}: every episode scored "
                                f"{r.headline.value:.2f}%; the ± 0.00 is a ceiling (no spread between episodes), "
                                "not certainty about the dataset.")
    return Findings(coll=coll, pairs=pairs, across=across, scaled=scaled,
                    answers=answers(coll, transfer, pairs), xvars=xvars, xvars_missing=missing,
                    correlations=corr, agreement=rank_agreement(coll, transfer), warnings=warnings)


__all__ = ["ALPHA", "Across", "Answer", "Correlation", "FewShotPairs", "Findings", "PoolFacts", "VERDICT_BEST",
           "by_family_and_domain", "compute", "family_means", "pool_facts", "test_images"]
