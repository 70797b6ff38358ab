"""Invariance of pooled features to transforms and to a second view (PROTOCOL.md, "Invariance";
Tables A1-A3 of Anton et al. 2022, after Ericsson et al.).

Features are whitened with the feature mean and covariance of a set of statistics images:
z = L^T (mean - f(x)) with L the Cholesky factor of the inverse covariance. Invariance is
the mean cosine similarity between z of the clean image and z of each transformed view.
Every square root of S^-1 gives the same cosine, d1' S^-1 d2 / sqrt(d1' S^-1 d1 * d2' S^-1 d2),
so this module whitens once with C^-1, C the Cholesky factor of S (no inverse of S is
formed), and takes all cosines with matrix products, in float64.

Covariance: Ledoit-Wolf shrinkage towards a scaled identity by default (well conditioned
when there are fewer statistics images than feature dimensions); the authors' 1e-6 ridge
(``estimator="ridge"``), which with N <= D weights the covariance's null space by 1e6 and
drives similarities towards 0, is the compat option. Statistics images are disjoint from
the evaluated images (:func:`choose_indices`) and the identity view is left out of the mean
unless ``include_identity`` (the authors included it).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from medxfer.data.images import open_image
from medxfer.data.splits import identity_keys
from medxfer.errors import UsageError
from medxfer.prepare import RESIZES
from medxfer.protocols.base import EvalResult, Headline, Needs, Params, Protocol, register_protocol
from medxfer.typed import positive, setting

log = logging.getLogger(__name__)

ESTIMATORS = ("ledoit-wolf", "ridge")
AUTHORS_RIDGE = 1e-6

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # uint8 B x 3 x S x S -> features B x D
ImageLike = Image.Image | str | os.PathLike[str]


class InvarianceError(UsageError):
    """Invalid input to the invariance analysis (the message names what is wrong)."""


# --------------------------------------------------------------------------- covariance

def _as_features(x: np.ndarray | torch.Tensor, what: str, min_rows: int = 1) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < min_rows or a.shape[1] < 1:
        raise InvarianceError(f"{what} must be a 2-D N x D array with N >= {min_rows}, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InvarianceError(f"{what} contain NaN or infinity")
    return a


def ledoit_wolf(features: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf (2004) shrinkage covariance of the rows of ``features`` (N x D), float64.

    S = centred X'X / N; target mu * I with mu = trace(S) / D;
    shrinkage = min(b2, d2) / d2 with d2 = ||S - mu I||_F^2 / D and
    b2 = sum_k ||x_k x_k' - S||_F^2 / (N^2 D) = (sum_k ||x_k||^4 / N - ||S||_F^2) / (N D).
    Returns ((1 - shrinkage) S + shrinkage mu I, shrinkage).
    """
    x = _as_features(features, "features", min_rows=2)
    n, d = x.shape
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n
    mu = float(np.trace(s)) / d
    s_sq = float(np.einsum("ij,ij->", s, s))
    d2 = (s_sq - d * mu * mu) / d  # ||S - mu I||_F^2 / D
    row_sq = np.einsum("ij,ij->i", xc, xc)
    b2 = (float(np.dot(row_sq, row_sq)) / n - s_sq) / (n * d)
    b2 = min(max(b2, 0.0), d2)
    shrinkage = 0.0 if d2 <= 0.0 else b2 / d2
    cov = (1.0 - shrinkage) * s
    cov[np.diag_indices(d)] += shrinkage * mu
    return cov, float(shrinkage)


@dataclass(frozen=True)
class FeatureStats:
    """Feature mean and regularised covariance of the statistics images, ready to whiten.

    ``whitener`` W (D x D) satisfies W W' = covariance^-1 (W = C^-T, C the lower Cholesky
    factor of the covariance), so ``(mean - f) @ W`` are whitened features.
    """

    mean: np.ndarray
    covariance: np.ndarray
    whitener: np.ndarray = field(repr=False)
    estimator: str
    shrinkage: float | None
    ridge: float | None
    n: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def condition_number(self) -> float:
        """Ratio of the covariance's largest to smallest eigenvalue."""
        ev = np.linalg.eigvalsh(self.covariance)
        return float(ev[-1] / ev[0]) if ev[0] > 0 else float("inf")

    def describe(self) -> str:
        if self.estimator == "ledoit-wolf":
            return f"Ledoit-Wolf shrinkage {self.shrinkage:.4g} from {self.n} images, float64"
        return f"sample covariance + {self.ridge:g} ridge from {self.n} images, float64"


def feature_statistics(features: np.ndarray | torch.Tensor, *, estimator: str = "ledoit-wolf",
                       ridge: float = AUTHORS_RIDGE) -> FeatureStats:
    """Mean and covariance of N x D features: ``"ledoit-wolf"`` (default) or ``"ridge"``
    (the authors: ``np.cov`` with N - 1, plus ``ridge`` on the diagonal)."""
    x = _as_features(features, "statistics features", min_rows=2)
    n, d = x.shape
    if estimator == "ledoit-wolf":
        cov, shrink = ledoit_wolf(x)
        rdg: float | None = None
    elif estimator == "ridge":
        if not ridge > 0:
            raise InvarianceError(f"ridge must be > 0, got {ridge}")
        cov = np.cov(x, rowvar=False).reshape(d, d)
        cov[np.diag_indices(d)] += ridge
        shrink, rdg = None, float(ridge)
    else:
        raise InvarianceError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError as exc:
        raise InvarianceError(f"the {estimator} covariance of {n} x {d} features is not positive definite "
                              f"(are all features constant?)") from exc
    whitener = np.linalg.inv(chol).T
    if n <= d:
        log.info("feature statistics from %d images for %d dimensions (%s)", n, d, estimator)
    return FeatureStats(x.mean(axis=0), cov, whitener, estimator, shrink, rdg, n)


def whiten(stats: FeatureStats, features: np.ndarray | torch.Tensor) -> np.ndarray:
    """Whitened features ``(mean - f) @ W`` of ... x D features (float64)."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim < 1 or f.shape[-1] != stats.dim:
        raise InvarianceError(f"features have shape {f.shape}; the statistics have {stats.dim} dimensions")
    if not np.isfinite(f).all():
        raise InvarianceError("features contain NaN or infinity")
    flat = f.reshape(-1, stats.dim)
    return ((stats.mean - flat) @ stats.whitener).reshape(f.shape)


def _cosine(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    num = np.einsum("...d,...d->...", za, zb)
    den = np.sqrt(np.einsum("...d,...d->...", za, za) * np.einsum("...d,...d->...", zb, zb))
    if np.any(den == 0):
        raise InvarianceError("a feature vector equals the statistics mean: its whitened cosine is undefined")
    return num / den


def whitened_cosine(stats: FeatureStats, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """d1' S^-1 d2 / sqrt(d1' S^-1 d1 * d2' S^-1 d2) with d = mean - f, broadcasting over the
    leading dimensions of ``a`` and ``b`` (e.g. N x 1 x D against N x V x D)."""
    return _cosine(whiten(stats, a), whiten(stats, b))


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class InvarianceResult:
    """Whitened cosine similarities of clean vs transformed features.

    ``similarities``: N x V (image x view); ``per_view``: mean over images per view;
    ``invariance``: mean over images and the views in ``included`` (the identity view is
    left out unless ``include_identity``).
    """

    invariance: float
    per_view: np.ndarray
    similarities: np.ndarray
    params: tuple[Any, ...]
    included: np.ndarray
    estimator: str
    shrinkage: float | None
    ridge: float | None
    n_stats: int
    n_eval: int
    family: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures for a result record."""
        return {
            "family": self.family, "invariance": self.invariance, "per_view": self.per_view.tolist(),
            "params": [p if isinstance(p, (bool, int, str)) else float(p) for p in self.params],
            "included": self.included.tolist(), "estimator": self.estimator, "shrinkage": self.shrinkage,
            "ridge": self.ridge, "n_stats": self.n_stats, "n_eval": self.n_eval,
        }


def invariance_from_features(
    stats: FeatureStats,
    clean: np.ndarray | torch.Tensor,
    views: np.ndarray | torch.Tensor,
    *,
    params: Sequence[Any] | None = None,
    identity: int | None = None,
    include_identity: bool = False,
    family: str = "",
) -> InvarianceResult:
    """Invariance from features: ``clean`` N x D and ``views`` N x V x D (view v of image n).

    ``identity``: index of the identity view (left out of the mean unless ``include_identity``).
    One whitening of all N * (V + 1) vectors, then row-wise cosines.
    """
    c = _as_features(clean, "clean features")
    v = np.asarray(views.detach().cpu() if isinstance(views, torch.Tensor) else views, dtype=np.float64)
    if v.ndim != 3 or v.shape[0] != c.shape[0] or v.shape[2] != c.shape[1]:
        raise InvarianceError(f"views must be N x V x D = {c.shape[0]} x V x {c.shape[1]}, got shape {v.shape}")
    n, nv, d = v.shape
    z = whiten(stats, np.concatenate([c[:, None, :], v], axis=1).reshape(-1, d)).reshape(n, nv + 1, d)
    sims = _cosine(z[:, :1, :], z[:, 1:, :])
    pars = tuple(params) if params is not None else tuple(range(nv))
    if len(pars) != nv:
        raise InvarianceError(f"{len(pars)} params for {nv} views")
    included = np.ones(nv, dtype=bool)
    if identity is not None:
        if not 0 <= identity < nv:
            raise InvarianceError(f"identity view index {identity} out of range for {nv} views")
        included[identity] = include_identity
    if not included.any():
        raise InvarianceError("no views left to average (only the identity view, which is excluded)")
    return InvarianceResult(float(sims[:, included].mean()), sims.mean(axis=0), sims, pars, included,
                            stats.estimator, stats.shrinkage, stats.ridge, stats.n, n, family)


def pair_invariance(stats: FeatureStats, first: np.ndarray | torch.Tensor, second: np.ndarray | torch.Tensor,
                    *, family: str = "pairs") -> InvarianceResult:
    """Multi-view invariance: whitened cosine of P paired views (e.g. left vs right eye)."""
    a = _as_features(first, "first views")
    b = _as_features(second, "second views")
    if a.shape != b.shape:
        raise InvarianceError(f"paired features differ in shape: {a.shape} vs {b.shape}")
    return invariance_from_features(stats, a, b[:, None, :], params=("pair",), family=family)


# --------------------------------------------------------------------------- index sets

def choose_indices(n: int, *, seed: int, n_stats: int = 1000, n_eval: int = 100,
                   disjoint: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (statistics, evaluated) image indices of a dataset of ``n``, independent of the model.

    Disjoint (default): ``min(n_eval, n // 2)`` evaluated images and up to ``n_stats`` of the
    rest. ``disjoint=False``: up to ``n_eval`` and ``n_stats`` from the same seeded order
    (evaluated images are then among the statistics images, as in the authors' code).
    Both returned sorted.
    """
    if n < 2:
        raise InvarianceError(f"need at least 2 images, got {n}")
    if n_stats < 2 or n_eval < 1:
        raise InvarianceError(f"need n_stats >= 2 and n_eval >= 1, got {n_stats} and {n_eval}")
    perm = np.random.default_rng(seed).permutation(n)
    if disjoint:
        ne = min(n_eval, n // 2)
        ev, st = perm[:ne], perm[ne:ne + min(n_stats, n - ne)]
    else:
        ev, st = perm[:min(n_eval, n)], perm[:min(n_stats, n)]
    if len(ev) < n_eval or len(st) < n_stats:
        log.info("dataset of %d images: %d statistics and %d evaluated images (%s)", n, len(st), len(ev),
                 "disjoint" if disjoint else "overlapping")
    return np.sort(st), np.sort(ev)


def match_pairs(names: Sequence[str], first: str = "_left", second: str = "_right",
                labels: Sequence[Any] | None = None) -> np.ndarray:
    """P x 2 indices of names that differ only in ``first`` vs ``second`` (e.g. EyePACS
    ``13_left`` / ``13_right``), in the order of the first names; with ``labels``, only pairs
    whose two labels are equal (PROTOCOL.md: left vs right eye of the same grade)."""
    if labels is not None and len(labels) != len(names):
        raise InvarianceError(f"{len(labels)} labels for {len(names)} names")
    index = {n: i for i, n in enumerate(names)}
    if len(index) != len(names):
        raise InvarianceError("names must be unique")
    out = []
    for n, i in index.items():
        if first in n:
            j = index.get(n.replace(first, second))
            if j is not None and (labels is None or labels[i] == labels[j]):
                out.append((i, j))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def choose_pair_indices(pairs: np.ndarray | Sequence[tuple[int, int]], n_images: int, *, seed: int,
                        n_stats: int = 1000, n_eval: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (statistics image indices, evaluated pair indices) for multi-view invariance.

    ``pairs``: P x 2 image indices. At most ``n_eval`` pairs, and no more than a quarter of
    the images' worth, are evaluated; statistics images (up to ``n_stats``) are drawn from
    the images in no evaluated pair.
    """
    p = np.asarray(pairs, dtype=np.int64)
    if p.ndim != 2 or p.shape[1] != 2 or len(p) == 0:
        raise InvarianceError(f"pairs must be a non-empty P x 2 array of image indices, got shape {p.shape}")
    if p.min() < 0 or p.max() >= n_images:
        raise InvarianceError(f"pair indices must lie in 0..{n_images - 1}")
    rng = np.random.default_rng(seed)
    ne = max(1, min(n_eval, len(p), n_images // 4))
    ev = np.sort(rng.permutation(len(p))[:ne])
    rest = np.setdiff1d(np.arange(n_images), p[ev].ravel())
    if len(rest) < 2:
        raise InvarianceError(f"only {len(rest)} images outside the evaluated pairs: too few for statistics")
    st = np.sort(rng.permutation(rest)[:min(n_stats, len(rest))])
    return st, ev


# --------------------------------------------------------------------------- transforms and views

def _rotate(img: Image.Image, angle: float) -> Image.Image:
    """Counter-clockwise rotation about the centre, same size, black corners (nearest
    neighbour, as torchvision's ``rotate`` default); exactly the input at 0."""
    return img.copy() if float(angle) % 360.0 == 0.0 else img.rotate(float(angle), resample=Image.NEAREST,
                                                                      expand=False, fillcolor=0)


def _hflip(img: Image.Image, flip: bool) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img.copy()


def _hue(img: Image.Image, shift: float) -> Image.Image:
    """torchvision's ``adjust_hue`` (HSV hue shifted by ``shift`` turns); exactly the input at 0
    (the HSV round trip is not lossless) and for greyscale images, which have no hue."""
    return img.copy() if float(shift) == 0.0 else TF.adjust_hue(img, float(shift))


@dataclass(frozen=True)
class TransformFamily:
    """Transform parameters, the index of the identity parameter, and ``apply(image, param)``
    on a full-resolution PIL image (the evaluation transform comes after it)."""

    name: str
    params: tuple[Any, ...]
    identity: int | None
    apply: Callable[[Image.Image, Any], Image.Image] = field(repr=False)


def transform_family(name: str, *, k: int = 8) -> TransformFamily:
    """``"rotation"`` (angles ``linspace(0, 360, k + 1)[:k]``; the authors used 256, 20 on EyePACS),
    ``"hflip"`` ({False, True}) or ``"hue"`` (``linspace(-0.5, 0.5, 5)``)."""
    if name == "rotation":
        if k < 2:
            raise InvarianceError(f"rotation needs k >= 2 angles, got {k}")
        return TransformFamily(name, tuple(float(a) for a in np.linspace(0, 360, k + 1)[:k]), 0, _rotate)
    if name == "hflip":
        return TransformFamily(name, (False, True), 0, _hflip)
    if name == "hue":
        return TransformFamily(name, tuple(float(h) for h in np.linspace(-0.5, 0.5, 5)), 2, _hue)
    raise InvarianceError(f"transform family must be 'rotation', 'hflip' or 'hue', got {name!r}")


def evaluation_view(img: Image.Image, size: int = 224) -> np.ndarray:
    """The evaluation transform (shorter side to ``size`` bicubic, centre crop) -> S x S x 3 uint8."""
    arr = np.asarray(RESIZES.get("aspect")(img, size), dtype=np.uint8)  # resize + centre crop
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def _open(image: ImageLike) -> Image.Image:
    return image if isinstance(image, Image.Image) else open_image(os.fspath(image))


def image_views(image: ImageLike, family: TransformFamily | None, *, size: int = 224) -> np.ndarray:
    """V x S x S x 3 uint8 views of one image (decoded at full resolution): each transform
    parameter applied to the full image, then the evaluation transform. Without a family, the
    evaluation crop alone (V = 1)."""
    img = _open(image)
    if family is None:
        return evaluation_view(img, size)[None]
    return np.stack([evaluation_view(family.apply(img, p), size) for p in family.params])


def view_features(features: FeatureFn, images: Sequence[ImageLike], family: TransformFamily | None = None, *,
                  size: int = 224, batch_size: int = 32) -> np.ndarray:
    """N x V x D float64 features of every view of every image (V = 1 without a family).

    ``features``: uint8 B x 3 x S x S -> B x D, applying the model's own normalisation
    (e.g. ``Backbone.features``).
    """
    if batch_size < 1:
        raise InvarianceError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) == 0:
        raise InvarianceError("no images")
    out: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    n_views = 0

    def flush() -> None:
        batch = torch.from_numpy(np.concatenate(pending)).permute(0, 3, 1, 2)
        pending.clear()
        with torch.inference_mode():
            f = features(batch)
        out.append(np.asarray(f.detach().cpu().double() if isinstance(f, torch.Tensor) else f, dtype=np.float64))

    for img in images:
        v = image_views(img, family, size=size)
        n_views = len(v)
        pending.append(v)
        if sum(len(p) for p in pending) >= batch_size:
            flush()
    if pending:
        flush()
    feats = np.concatenate(out)
    if feats.ndim != 2 or len(feats) != len(images) * n_views:
        raise InvarianceError(f"features callable returned shape {feats.shape} for {len(images) * n_views} views")
    return feats.reshape(len(images), n_views, -1)


def transform_invariance(
    features: FeatureFn,
    stats_images: Sequence[ImageLike],
    eval_images: Sequence[ImageLike],
    family: TransformFamily | str,
    *,
    size: int = 224,
    estimator: str = "ledoit-wolf",
    ridge: float = AUTHORS_RIDGE,
    include_identity: bool = False,
    batch_size: int = 32,
) -> InvarianceResult:
    """End to end: statistics from the clean views of ``stats_images``, then the invariance
    of ``eval_images`` to ``family`` (clean = the identity view's features)."""
    fam = transform_family(family) if isinstance(family, str) else family
    if fam.identity is None:
        raise InvarianceError(f"family {fam.name!r} has no identity parameter to compare with")
    stats = feature_statistics(view_features(features, stats_images, None, size=size, batch_size=batch_size)[:, 0],
                               estimator=estimator, ridge=ridge)
    views = view_features(features, eval_images, fam, size=size, batch_size=batch_size)
    return invariance_from_features(stats, views[:, fam.identity], views, params=fam.params, identity=fam.identity,
                                    include_identity=include_identity, family=fam.name)


# --------------------------------------------------------------------------- the protocol

FAMILIES = ("rotation", "hflip", "hue", "multiview")


def _check_families(value: Any) -> None:
    unknown = [f for f in value if f not in FAMILIES]
    if unknown or not value:
        raise ValueError(f"unknown transform famil(ies) {unknown}; choose from {', '.join(FAMILIES)}")


@dataclass(frozen=True)
class InvarianceParams(Params):
    """PROTOCOL.md: whitened cosine between clean and transformed features (float64), statistics from
    up to 1000 seeded images disjoint from up to 100 evaluated ones, identity view excluded."""

    families: tuple[str, ...] = setting(FAMILIES, check=_check_families,
                                        help="rotation, hflip, hue, multiview (pairs: CheXpert views, EyePACS eyes)")
    rotations: int = setting(8, check=positive, help="k rotation angles linspace(0, 360, k+1)[:k] (authors: 256)")
    n_stats: int = setting(1000, check=positive, help="images for the feature mean and covariance")
    n_eval: int = setting(100, check=positive, help="images (or pairs) evaluated")
    estimator: Literal["ledoit-wolf", "ridge"] = setting("ledoit-wolf", help="covariance: Ledoit-Wolf shrinkage, "
                                                         "or the authors' 1e-6 ridge")
    include_identity: bool = setting(False, help="count the identity view's similarity of 1 (the authors did)")
    disjoint: bool = setting(True, help="statistics images disjoint from the evaluated ones")
    batch_size: int = setting(32, check=positive, execution=True, help="views per forward pass")


def _run(ctx: Any, p: InvarianceParams, seed: int) -> EvalResult:
    from medxfer.runtime import Runner

    model, feats = ctx.model, ctx.features()
    records = feats.records
    order = np.argsort(np.asarray(identity_keys([r.path for r in records]), dtype=object), kind="stable")
    cached = np.asarray(feats.features, dtype=np.float64)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    runner = Runner(model, ctx.device)

    def features(batch: torch.Tensor) -> torch.Tensor:  # uint8 B x 3 x S x S -> B x D
        return runner(batch.permute(0, 2, 3, 1).contiguous())

    try:
        for family in p.families:
            if family == "multiview":
                pairs = _row_pairs(ctx, feats)
                if not pairs:
                    details["multiview"] = "no multi-view pairs in this dataset (CheXpert frontal/lateral, EyePACS eyes)"
                    continue
                st, ev = choose_pair_indices(pairs, len(records), seed=seed, n_stats=p.n_stats, n_eval=p.n_eval)
                stats = feature_statistics(cached[st], estimator=p.estimator)
                chosen = np.asarray(pairs)[ev]
                res = pair_invariance(stats, cached[chosen[:, 0]], cached[chosen[:, 1]], family="multiview")
            else:
                st_pos, ev_pos = choose_indices(len(records), seed=seed, n_stats=p.n_stats, n_eval=p.n_eval,
                                                disjoint=p.disjoint)
                st, ev = order[st_pos], order[ev_pos]
                stats = feature_statistics(cached[st], estimator=p.estimator)
                fam = transform_family(family, k=p.rotations)
                views = view_features(features, [records[i].path for i in ev], fam, size=ctx.prepared().size,
                                      batch_size=p.batch_size)
                res = invariance_from_features(stats, views[:, fam.identity], views, params=fam.params,
                                               identity=fam.identity, include_identity=p.include_identity,
                                               family=family)
            metrics[family] = float(res.invariance)
            details[family] = res.summary()
    finally:
        runner.restore()
    if not metrics:
        raise InvarianceError("invariance: no family could be computed on this dataset")
    metrics["invariance_mean"] = float(np.mean(list(metrics.values())))
    return EvalResult(
        protocol="invariance", metrics=metrics, params=p.to_dict(), details=details,
        headline=Headline("invariance_mean", metrics["invariance_mean"], None, True))


def _row_pairs(ctx: Any, feats: Any) -> list[tuple[int, int]]:
    """The dataset's multi-view pairs as rows of ``feats`` (bad images left out)."""
    ds = ctx.dataset
    if not ds.pairs:
        return []
    row_of = {r.path: i for i, r in enumerate(feats.records)}
    return [(row_of[ds.records[a].path], row_of[ds.records[b].path]) for a, b in ds.pairs
            if ds.records[a].path in row_of and ds.records[b].path in row_of]


register_protocol(Protocol(
    name="invariance", version="1", params=InvarianceParams, run=_run, analysis=True,
    needs=Needs(features=("pooled",), model=True, accelerator="cpu"),
    compat={"paper": {"estimator": "ridge", "include_identity": True, "disjoint": False}},
    description="whitened-cosine invariance to rotation, flips, hue and across views (paper Tables A1-A3)",
))
