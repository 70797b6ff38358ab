"""The generalisation interval of a few-shot comparison (``medxfer report --bootstrap N``).

The episode interval covers re-drawing episodes from the same images. This bootstrap asks
what a new test pool could give: it resamples the pool with replacement (whole patients
where every record has one and each patient's images share a class, else images, within
each class), re-runs the *same* episode seed on each resampled pool with every model's
cached features, and reports percentile intervals of each model's accuracy and of its
difference to the best (:func:`medxfer.report.stats.bootstrap_intervals`).

It needs the feature cache the results were computed from (``inputs["features:pooled"]``
under the run's cache folder) and the dataset itself (to re-read labels and splits); when
either is gone the reason is recorded instead. A drawn-twice image can land in an episode's
support and its query: stated with the interval.
"""
from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.errors import MedxferError
from medxfer.report.collect import Collection
from medxfer.report.findings import FewShotPairs
from medxfer.results import Result

log = logging.getLogger(__name__)

DUPLICATES_NOTE = ("an image drawn twice in a resampled pool can appear in one episode's support and query, "
                   "which makes resampled accuracies slightly optimistic; differences between models are less affected")


class Unavailable(Exception):
    """The bootstrap cannot run for this comparison; the message says why."""


def _cache_dir(coll: Collection, r: Result) -> Path:
    from medxfer.cache import resolve_cache_dir

    info = coll.run_info or {}
    return resolve_cache_dir(info.get("cache_dir") or r.spec.get("cache_dir"))


def _features(coll: Collection, r: Result) -> np.ndarray:
    from medxfer.cache import ResumableArray

    entry = r.inputs.get("features:pooled") or {}
    key = entry.get("key")
    if not key:
        raise Unavailable(f"the result of {r.model} records no cached features (inputs['features:pooled'])")
    folder = _cache_dir(coll, r) / "features" / key
    loaded = ResumableArray(folder, f"pooled features of {r.model} on {r.dataset}").load()
    if loaded is None:
        raise Unavailable(f"the feature cache of {r.model} on {r.dataset} is not there any more ({folder}); "
                          "re-run `medxfer run` with the same options to rebuild it")
    return np.asarray(loaded[0])


def _dataset(r: Result) -> Any:
    from medxfer.data import load_dataset

    arg = next((d for d in r.spec.get("datasets", []) if d.get("label") == r.dataset), None)
    if arg is None:
        raise Unavailable(f"the run spec of {r.cell_id} does not name dataset {r.dataset!r}")
    try:
        return load_dataset(arg["kind"], arg["root"], skip_bad=bool(r.spec.get("skip_bad", False)),
                            **dict(arg.get("options") or {}))
    except (MedxferError, OSError) as exc:
        raise Unavailable(f"cannot re-read dataset {r.dataset!r} at {arg['root']}: {exc}") from None


def _params(r: Result) -> Any:
    from medxfer.protocols.fewshot import FewShotParams

    names = {f.name for f in fields(FewShotParams)}
    values = {k: v for k, v in r.params.items() if k in names}
    if isinstance(values.get("pool_splits"), list):  # a tuple before JSON
        values["pool_splits"] = tuple(values["pool_splits"])
    return FewShotParams(**values)


def _groups(records: list[Any], pool: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray | None, str]:
    patients = [records[i].patient for i in pool]
    if any(p is None for p in patients):
        return None, "image"
    by_patient: dict[str, set[int]] = {}
    for p, y in zip(patients, labels[pool]):
        by_patient.setdefault(str(p), set()).add(int(y))
    if any(len(v) > 1 for v in by_patient.values()):
        return None, "image (some patients have images of several classes)"
    return np.asarray([str(p) for p in patients]), "patient"


#: Pools up to this many images are scored through their Gram matrix (n x n float64).
GRAM_MAX_POOL = 4000


def gram_accuracies(gram: np.ndarray, pos: np.ndarray, episodes: Any) -> np.ndarray:
    """Episode accuracies from the pool's Gram matrix ``gram`` (``pos`` maps a record index to
    its row): the squared distance of query q to prototype p_k is |q|^2 - 2 q.p_k + |p_k|^2,
    with q.p_k the mean of q.s over the support s of class k and |p_k|^2 the mean of s.s' over
    its pairs, so an episode costs a few hundred look-ups instead of a pass over the features."""
    e, k, n = episodes.support.shape
    q = episodes.query.shape[2]
    sup = pos[episodes.support.reshape(e, k * n)]
    qry = pos[episodes.query.reshape(e, k * q)]
    qp = gram[qry[:, :, None], sup[:, None, :]].reshape(e, k * q, k, n).mean(axis=3)
    pp = np.einsum("eknkm->ek", gram[sup[:, :, None], sup[:, None, :]].reshape(e, k, n, k, n)) / (n * n)
    pred = (pp[:, None, :] - 2.0 * qp).argmin(axis=2)  # |q|^2 is the same for every prototype
    truth = np.repeat(np.arange(k), q)
    return (pred == truth[None, :]).mean(axis=1)


class _Scorer:
    """One model's episode accuracies: through the pool's Gram matrix when the pool is small and
    that gives exactly the protocol's accuracies on the recorded episodes, else the protocol's
    own function."""

    def __init__(self, feats: np.ndarray, pool: np.ndarray, episodes: Any) -> None:
        from medxfer.protocols.fewshot import episode_accuracies

        self.feats = feats
        self.reference = episode_accuracies(feats, episodes)
        self.gram: np.ndarray | None = None
        if len(pool) <= GRAM_MAX_POOL:
            x = np.asarray(feats[pool], dtype=np.float64)
            self.pos = np.full(int(pool.max()) + 1, -1, dtype=np.int64)
            self.pos[pool] = np.arange(len(pool))
            self.gram = x @ x.T
            if not np.array_equal(gram_accuracies(self.gram, self.pos, episodes), self.reference):
                log.info("Gram-matrix scoring differs from the protocol's on the recorded episodes; using the latter")
                self.gram = None

    def __call__(self, episodes: Any) -> np.ndarray:
        from medxfer.protocols.fewshot import episode_accuracies

        if self.gram is not None:
            return gram_accuracies(self.gram, self.pos, episodes)
        return episode_accuracies(self.feats, episodes)


def generalisation_bootstrap(coll: Collection, pairs: FewShotPairs, n_boot: int, seed: int = 0,
                             level: float = 0.95) -> dict[str, Any]:
    """Percentile intervals over resampled pools for every model of ``pairs`` (see the module
    docstring): ``{"models": {model: {"accuracy": ..., "difference": ...}}, ...}``, or
    ``{"unavailable": reason}``."""
    from medxfer.protocols.fewshot import FewShotError, draw_episodes, sample_episodes
    from medxfer.report.stats import StatsInputError, bootstrap_intervals

    comp = pairs.comparison
    if comp is None:
        return {"unavailable": pairs.reason or "no paired comparison"}
    models = [row.model for row in comp.rows]
    try:
        first = pairs.results[comp.best]
        feats = {m: _features(coll, pairs.results[m]) for m in models}
        ds = _dataset(first)
        labels = np.asarray([rec.label for rec in ds.records], dtype=np.int64)
        splits = np.asarray([rec.split for rec in ds.records])
        for m, x in feats.items():
            if x.shape[0] != len(labels):
                raise Unavailable(f"the cached features of {m} have {x.shape[0]} rows, the dataset now has "
                                  f"{len(labels)} records (skipped images or a changed dataset)")
        p = _params(first)
        ep_seed = int(first.details.get("episode_seed", first.seed))
        pool, eps, _ = draw_episodes(labels, splits, p, ep_seed, ds.info.class_names)
        if eps.digest() != pairs.episodes_sha256:
            raise Unavailable("the episodes drawn from the dataset as it is now differ from the recorded ones "
                              "(episodes_sha256): the dataset or its options changed")
        scorers = {m: _Scorer(feats[m], pool, eps) for m in models}
        for m in models:
            if abs(100.0 * float(scorers[m].reference.mean()) - pairs.results[m].headline.value) > 1e-6:
                raise Unavailable(f"the cached features of {m} do not reproduce its recorded accuracy")
    except Unavailable as exc:
        log.warning("bootstrap of %s on %s: %s", pairs.table, pairs.dataset, exc)
        return {"unavailable": str(exc)}
    groups, unit_text = _groups(ds.records, pool, labels)

    def statistic(ix: np.ndarray) -> dict[str, float]:
        e, _ = sample_episodes(labels, p.n_way, p.n_shot, p.n_query, p.episodes, ep_seed, pool=ix,
                               small_classes=p.small_classes, class_names=ds.info.class_names)
        acc = {m: 100.0 * float(scorers[m](e).mean()) for m in models}
        out = {f"{m}\0accuracy": a for m, a in acc.items()}
        out.update({f"{m}\0difference": acc[m] - acc[comp.best] for m in models if m != comp.best})
        return out

    try:
        intervals = bootstrap_intervals(statistic, pool, n_boot=n_boot, seed=seed, groups=groups,
                                        strata=labels[pool], level=level)
    except (FewShotError, StatsInputError) as exc:
        log.warning("bootstrap of %s on %s: %s", pairs.table, pairs.dataset, exc)
        return {"unavailable": f"resampled pools could not be evaluated: {exc}"}
    per_model: dict[str, dict[str, Any]] = {m: {} for m in models}
    for k, iv in intervals.items():
        m, what = k.split("\0")
        per_model[m][what] = {"estimate": iv.estimate, "low": iv.low, "high": iv.high, "std_error": iv.std_error}
    any_iv = next(iter(intervals.values()))
    log.info("bootstrap of %s on %s: %d replicates over %d %ss", pairs.table, pairs.dataset, n_boot,
             any_iv.n_units, any_iv.unit)
    return {"models": per_model, "n_boot": n_boot, "seed": seed, "level": level, "unit": any_iv.unit,
            "unit_choice": unit_text, "n_units": any_iv.n_units, "episode_seed": ep_seed,
            "interval_covers": any_iv.interval_covers, "note": DUPLICATES_NOTE}
