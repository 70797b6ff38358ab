"""Few-shot transfer with prototypical networks on cached features (paper Table 3).

K-way N-shot episodes with Q queries per class: prototypes are the mean support features,
each query goes to the nearest prototype by squared Euclidean distance on unnormalised
features; episode accuracy is the mean over the K*Q queries. The reported number is the
mean over episodes with the 95% half-width 1.96 * std / sqrt(E) (population std), in
percent.

Episodes depend only on the labels, the parameters and the seed, never on the model: every
model sees exactly the same episodes, so models can be compared pairwise. All episodes are
evaluated at once (vectorised over the cached feature matrix), in chunks that bound memory.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from medxfer.errors import UsageError
from medxfer.features import FeatureSet
from medxfer.protocols.base import (
    EvalResult,
    Headline,
    Input,
    LabelView,
    Needs,
    Params,
    Protocol,
    register_protocol,
)
from medxfer.typed import positive, setting

if TYPE_CHECKING:
    from medxfer.cell import Context

log = logging.getLogger(__name__)

Z95 = 1.96


class FewShotError(UsageError):
    """Episodes cannot be drawn as asked (e.g. a class with too few images)."""


@dataclass(frozen=True)
class Episodes:
    """Record indices of every episode: ``classes`` E x K (class ids), ``support`` E x K x N,
    ``query`` E x K x Q."""

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray

    @property
    def count(self) -> int:
        return int(self.classes.shape[0])

    def digest(self) -> str:
        """SHA-256 of the episode indices, to check that two results saw the same episodes."""
        h = hashlib.sha256()
        for a in (self.classes, self.support, self.query):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()


def select_pool(labels: np.ndarray, splits: np.ndarray | None, pool_size: int | None, seed: int,
                pool_splits: tuple[str, ...] | None = None) -> np.ndarray:
    """The record indices episodes are drawn from.

    ``pool_size=None``: every image of ``pool_splits`` (None: every image, train and test
    pooled, as the paper did for the small datasets; iChallenge-PM: its 400 training images).
    Otherwise the first ``pool_size`` images of the train split after a seeded shuffle (the
    paper: 10,001 images of the shuffled train split for the large datasets).
    """
    n = len(labels)
    if pool_size is None:
        if pool_splits is None or splits is None:
            return np.arange(n)
        return np.flatnonzero(np.isin(np.asarray(splits).astype(str), list(pool_splits)))
    train = np.arange(n) if splits is None else np.flatnonzero(np.asarray(splits) == "train")
    rng = np.random.default_rng([seed, 0x9001])
    return np.sort(rng.permutation(train)[:pool_size])


def sample_episodes(
    labels: np.ndarray,
    n_way: int,
    n_shot: int,
    n_query: int,
    episodes: int,
    seed: int,
    pool: np.ndarray | None = None,
    small_classes: str = "error",
    class_names: tuple[str, ...] | None = None,
) -> tuple[Episodes, list[str]]:
    """Draw ``episodes`` K-way N-shot episodes from a local generator seeded with ``seed``.

    Each episode draws K distinct classes, then N+Q distinct images of each class. A class
    with fewer than N+Q images in the pool is an error (``small_classes="error"``), or is
    left out of every episode with a recorded warning (``small_classes="drop"``).
    Returns the episodes and the warnings.
    """
    labels = np.asarray(labels, dtype=np.int64)
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool, dtype=np.int64)
    if min(n_way, n_shot, n_query, episodes) < 1:
        raise FewShotError("n_way, n_shot, n_query and episodes must all be >= 1")
    need = n_shot + n_query
    pool_labels = labels[pool]
    present = np.unique(pool_labels[pool_labels >= 0])
    per_class = {int(c): pool[pool_labels == c] for c in present}
    name = (lambda c: class_names[c]) if class_names else (lambda c: str(c))
    small = {c: len(ix) for c, ix in per_class.items() if len(ix) < need}
    warnings: list[str] = []
    if small:
        desc = ", ".join(f"{name(c)!r} has {k}" for c, k in sorted(small.items()))
        if small_classes != "drop":
            raise FewShotError(
                f"{n_shot}-shot episodes with {n_query} queries need {need} images per class; {desc} "
                f"(use fewer shots or queries, e.g. --set fewshot.n_shot=10, or --set fewshot.small_classes=drop "
                f"to leave such classes out; in Python: n_shot=..., small_classes='drop')"
            )
        warnings.append(f"classes left out of every episode (fewer than {need} images): {desc}")
    eligible = np.array(sorted(c for c in per_class if c not in small), dtype=np.int64)
    if len(eligible) < n_way:
        raise FewShotError(
            f"{n_way}-way episodes need {n_way} classes with >= {need} images each; only {len(eligible)} have"
        )
    rng = np.random.default_rng(seed)
    # classes of each episode: the first K of an independent random permutation per episode
    cls_pos = np.argsort(rng.random((episodes, len(eligible))), axis=1)[:, :n_way]
    classes = eligible[cls_pos]
    # images of each class for every episode (drawn for all classes, used where chosen)
    draws = np.empty((episodes, len(eligible), need), dtype=np.int64)
    for j, c in enumerate(eligible):
        members = per_class[int(c)]
        order = np.argsort(rng.random((episodes, len(members))), axis=1)[:, :need]
        draws[:, j, :] = members[order]
    chosen = np.take_along_axis(draws, cls_pos[:, :, None], axis=1)  # E x K x (N+Q)
    return Episodes(classes=classes, support=chosen[:, :, :n_shot], query=chosen[:, :, n_shot:]), warnings


def episode_accuracies(features: np.ndarray | torch.Tensor, episodes: Episodes, chunk: int = 64,
                       device: str | torch.device = "cpu") -> np.ndarray:
    """Accuracy of every episode (fraction in [0, 1]), all episodes evaluated in batches.

    Distances are computed in float64 so that ties and rounding do not depend on the batch
    layout.
    """
    feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    e, k, n = episodes.support.shape
    q = episodes.query.shape[2]
    truth = torch.arange(k, device=device).repeat_interleave(q)  # query order: class-major
    out = np.empty(e, dtype=np.float64)
    for start in range(0, e, chunk):
        stop = min(e, start + chunk)
        # numpy fancy indexing copies the rows (works on read-only memmaps too)
        sup_np = feats[episodes.support[start:stop].reshape(-1)]
        qry_np = feats[episodes.query[start:stop].reshape(-1)]
        sup = torch.from_numpy(sup_np).to(device=device, dtype=torch.float64).reshape(stop - start, k, n, -1)
        qry = torch.from_numpy(qry_np).to(device=device, dtype=torch.float64).reshape(stop - start, k * q, -1)
        protos = sup.mean(dim=2)  # B x K x D
        d2 = (qry.pow(2).sum(-1, keepdim=True) - 2.0 * qry @ protos.transpose(1, 2)
              + protos.pow(2).sum(-1).unsqueeze(1))  # B x KQ x K
        pred = d2.argmin(dim=-1)
        out[start:stop] = (pred == truth).double().mean(dim=1).cpu().numpy()
    return out


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and 95% half-width 1.96 * std / sqrt(n) with the population std."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(Z95 * v.std(ddof=0) / np.sqrt(len(v)))


@dataclass(frozen=True)
class FewShotParams(Params):
    """Few-shot settings (the paper's: 2-way or 5-way, 20 shots, 15 queries, 600 episodes)."""

    n_way: int = setting(2, check=positive, help="classes per episode")
    n_shot: int = setting(20, check=positive, help="support images per class")
    n_query: int = setting(15, check=positive, help="query images per class")
    episodes: int = setting(600, check=positive, help="number of episodes")
    pool_size: int | None = setting(None, check=positive,
                                    help="draw from the first N seeded-shuffled train images (None: all images)")
    pool_splits: tuple[str, ...] | None = setting(None, help="with pool_size None: the splits the pool is "
                                                  "made of (None: every image)")
    paper_squash: bool = setting(False, help="compat: the authors' 257x257 bilinear squash on the small "
                                 "datasets (those without a pool size)")
    small_classes: Literal["error", "drop"] = setting("error", help="a class smaller than shots + queries: "
                                                      "error, or drop it from every episode")


def draw_episodes(labels: np.ndarray, splits: np.ndarray | None, p: FewShotParams, seed: int,
                  class_names: tuple[str, ...] | None = None) -> tuple[np.ndarray, Episodes, list[str]]:
    """The pool and the episodes of ``p`` for these labels (they never depend on the model)."""
    pool = select_pool(labels, splits, p.pool_size, seed, p.pool_splits)
    eps, warnings = sample_episodes(labels, p.n_way, p.n_shot, p.n_query, p.episodes, seed,
                                    pool=pool, small_classes=p.small_classes, class_names=class_names)
    return pool, eps, warnings


def evaluate_fewshot(features: FeatureSet, p: FewShotParams, seed: int) -> EvalResult:
    """Prototypical-network few-shot evaluation of one feature set."""
    feats = np.asarray(features.features)
    if not np.isfinite(feats).all():
        bad = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
        raise FewShotError(f"features of {features.model} on {features.dataset} are not finite "
                           f"(first bad record: {features.records[bad].path})")
    pool, eps, warnings = draw_episodes(features.labels, features.splits, p, seed, features.class_names)
    accs = episode_accuracies(feats, eps)
    mean, half = mean_ci95(accs)
    return EvalResult(
        protocol="fewshot",
        metrics={"accuracy": 100.0 * mean, "ci95": 100.0 * half, "episodes": float(p.episodes)},
        headline=Headline("accuracy", 100.0 * mean, 100.0 * half, True),
        params=p.to_dict(),
        details={
            "episode_accuracies": [float(a) for a in accs],
            "episode_seed": seed,
            "episodes_sha256": eps.digest(),
            "pool_images": int(len(pool)),
            "distance": "squared euclidean to class-mean prototypes, unnormalised features",
            "ci": "1.96 * population std / sqrt(episodes)",
        },
        warnings=warnings,
    )


def _resize(p: FewShotParams) -> str | None:
    """The transform of the features: the authors squashed the small datasets only."""
    return "squash" if p.paper_squash and p.pool_size is None else None


def _run(ctx: Context, p: FewShotParams, seed: int) -> EvalResult:
    return evaluate_fewshot(ctx.features(resize=_resize(p)), p, seed)


def _check(view: LabelView, p: FewShotParams, seed: int) -> None:
    draw_episodes(view.labels, view.splits, p, seed, view.class_names)


register_protocol(Protocol(
    name="fewshot",
    version="1",
    params=FewShotParams,
    run=_run,
    needs=Needs(features=("pooled",), accelerator="cpu",
                inputs=lambda p: (Input("features", "pooled", resize=_resize(p)),)),
    check=_check,
    dataset_defaults=lambda info: {"n_way": info.fewshot_way, "n_shot": info.fewshot_shot,
                                   "pool_size": info.fewshot_pool, "pool_splits": info.fewshot_splits},
    compat={"paper": {"paper_squash": True}},
    description="prototypical networks, K-way N-shot, 15 queries, 600 episodes, mean ± 95% CI (paper Table 3)",
), aliases=("few-shot", "protonet"))
