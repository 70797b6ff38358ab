"""Transferability scores on frozen features (no training): LogME, H-score (plain and
shrinkage-regularised), GBC; and Kendall's tau between scores and measured accuracies.

Every score takes features ``n x D`` (numpy or a CPU torch tensor; computed in float64) and class
labels ``n`` (any hashable values), and is "higher is better".

* LogME (You et al., ICML 2021): per class, the log evidence of a Bayesian linear model of the
  one-hot target column, ``y = F w + e``, ``w ~ N(0, I/alpha)``, ``e ~ N(0, 1/beta)``, maximised
  over alpha and beta by MacKay's fixed-point iteration; divided by n and averaged over classes.
  One SVD of F serves every class and iteration.
* H-score (Bao et al. 2019): ``tr(cov(f)^+ cov(E[f | y]))`` (pseudo-inverse for a singular
  feature covariance). Shrinkage H-score (Ibrahim et al. 2022): the feature covariance replaced
  by its Ledoit-Wolf shrinkage ``(1 - a) S + a (tr S / D) I`` and the between-class covariance
  scaled by ``(1 - a)``; stable when n is not much larger than D.
* GBC (Pandy et al., CVPR 2022): features reduced by PCA, one Gaussian with diagonal (or
  spherical) covariance per class, ``-sum_{i != j} BC(c_i, c_j)`` over ordered class pairs with
  the Bhattacharyya coefficient ``BC = exp(-D_B)``; in [-K(K-1), 0].

No scikit-learn: linear algebra is numpy/scipy.
"""
from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

from medxfer.analysis._select import choose_rows
from medxfer.errors import UsageError
from medxfer.protocols.base import EvalResult, Headline, Needs, Params, Protocol, register_protocol
from medxfer.typed import positive, setting

log = logging.getLogger(__name__)


def _features(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    f = np.asarray(x, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise ValueError(f"features must be n x D with n >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f


def _labels(y: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(class index per sample 0..K-1, the K distinct labels); at least two classes."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must be a vector of length {n}, got shape {arr.shape}")
    classes, idx = np.unique(arr, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("labels must contain at least two classes")
    return idx.reshape(-1), classes


# --------------------------------------------------------------------------------------- LogME

@dataclass(frozen=True)
class EvidenceFit:
    """LogME's fit of one target column: the maximised log evidence divided by n, the prior
    precision alpha, the noise precision beta, iterations used, and whether they converged."""

    evidence: float
    alpha: float
    beta: float
    iterations: int
    converged: bool


def _svd(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and squared singular values of F, numerically zero ones dropped."""
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s[0] * max(f.shape) * np.finfo(np.float64).eps if s.size and s[0] > 0 else np.zeros_like(s, bool)
    return u[:, keep], s[keep] ** 2


def _fit_column(u: np.ndarray, sigma: np.ndarray, y: np.ndarray, d: int, max_iter: int, tol: float) -> EvidenceFit:
    n = y.shape[0]
    z = u.T @ y                      # y in the left singular basis
    yy = float(y @ y)
    outside = max(yy - float(z @ z), 0.0)  # |y|^2 outside the span of F
    tiny = np.finfo(np.float64).tiny

    def terms(alpha: float, beta: float) -> tuple[float, float, float]:
        t = alpha / beta
        den = sigma + t
        gamma = float(np.sum(sigma / den))                       # effective number of parameters
        mm = float(np.sum(sigma * z**2 / den**2))                # |m|^2, m the posterior mean of w
        res = float(np.sum((t * z / den) ** 2)) + outside        # |F m - y|^2
        return gamma, max(mm, tiny), max(res, tiny)

    alpha, beta, converged, it = 1.0, 1.0, False, 0
    for it in range(1, max_iter + 1):  # noqa: B007  (the count is returned)
        gamma, mm, res = terms(alpha, beta)
        new_alpha, new_beta = gamma / mm, (n - gamma) / res
        done = abs(new_alpha - alpha) <= tol * abs(alpha) and abs(new_beta - beta) <= tol * abs(beta)
        alpha, beta = max(new_alpha, tiny), max(new_beta, tiny)
        if done:
            converged = True
            break
    _, mm, res = terms(alpha, beta)
    r = sigma.size
    logdet = float(np.sum(np.log(alpha + beta * sigma))) + (d - r) * np.log(alpha)  # log|alpha I + beta F'F|
    evidence = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                - beta / 2 * res - alpha / 2 * mm - logdet / 2)
    return EvidenceFit(float(evidence) / n, alpha, beta, it, converged)


def logme_fits(features: Any, targets: Any, *, max_iter: int = 100, tol: float = 1e-6) -> list[EvidenceFit]:
    """LogME's per-column fits for real-valued ``targets`` (n or n x K): each column's maximised
    log evidence / n with its alpha and beta. Iterates until alpha and beta change by at most
    ``tol`` relatively (or ``max_iter``)."""
    f = _features(features)
    t = np.asarray(targets.detach().cpu().numpy() if hasattr(targets, "detach") else targets, dtype=np.float64)
    t = t.reshape(-1, 1) if t.ndim == 1 else t
    if t.ndim != 2 or t.shape[0] != f.shape[0]:
        raise ValueError(f"targets must be n or n x K with n = {f.shape[0]}, got {t.shape}")
    u, sigma = _svd(f)
    fits = [_fit_column(u, sigma, t[:, k], f.shape[1], max_iter, tol) for k in range(t.shape[1])]
    bad = sum(not fit.converged for fit in fits)
    if bad:
        log.warning("LogME: %d of %d fits did not converge in %d iterations", bad, len(fits), max_iter)
    return fits


def logme(features: Any, labels: Any, *, max_iter: int = 100, tol: float = 1e-6) -> float:
    """LogME of a classification task: the mean over classes of the maximised log evidence / n
    of each one-hot label column (You et al. 2021). Higher is better. Invariant to rotations
    and to isotropic rescaling of the features (the prior on w is isotropic)."""
    f = _features(features)
    idx, classes = _labels(labels, f.shape[0])
    onehot = (idx[:, None] == np.arange(len(classes))[None, :]).astype(np.float64)
    return float(np.mean([fit.evidence for fit in logme_fits(f, onehot, max_iter=max_iter, tol=tol)]))


# ------------------------------------------------------------------------------------- H-score

def _between_class(f: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class means minus the overall mean K x D, class weights n_c / n)."""
    k = int(idx.max()) + 1
    counts = np.bincount(idx, minlength=k).astype(np.float64)
    means = np.zeros((k, f.shape[1]))
    np.add.at(means, idx, f)
    means /= counts[:, None]
    return means - f.mean(0), counts / f.shape[0]


def ledoit_wolf_shrinkage(features: Any) -> float:
    """The Ledoit-Wolf (2004) shrinkage intensity towards ``(tr S / D) I`` of the (biased) sample
    covariance S of the centred features, in [0, 1]."""
    x = _features(features)
    x = x - x.mean(0)
    n, d = x.shape
    s = x.T @ x / n if d <= n else None
    # |S|_F^2 without forming S when D > n: |X'X|_F = |X X'|_F
    s_fro2 = float(np.sum(s**2)) if s is not None else float(np.sum((x @ x.T) ** 2)) / n**2
    mu = float(np.sum(x**2)) / n / d
    delta = s_fro2 / d - mu**2                                    # |S - mu I|^2 (normalised Frobenius)
    beta_bar = (float(np.sum(np.sum(x**2, 1) ** 2)) - n * s_fro2) / (n**2 * d)
    if delta <= 0:
        return 0.0
    return float(min(max(beta_bar, 0.0), delta) / delta)


def _scores_in_basis(f: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigen-decomposition of the feature covariance restricted to the span of the centred
    features (the class-mean differences lie in it): (eigenvalues, projections of the class-mean
    differences, class weights)."""
    x = f - f.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    lam = s**2 / f.shape[0]
    diffs, w = _between_class(f, idx)
    return lam, diffs @ vt.T, w


def h_score(features: Any, labels: Any) -> float:
    """H-score (Bao et al. 2019): ``tr(cov(f)^+ cov(E[f|y]))`` with biased covariances and the
    pseudo-inverse (eigenvalues below ``max * max(n, D) * eps`` treated as zero). Invariant to
    invertible affine maps of full-rank features; unstable when n is not >> D (use
    :func:`h_score_shrinkage`)."""
    f = _features(features)
    idx, _ = _labels(labels, f.shape[0])
    lam, proj, w = _scores_in_basis(f, idx)
    keep = lam > lam.max() * max(f.shape) * np.finfo(np.float64).eps
    return float(np.sum(w[:, None] * proj[:, keep] ** 2 / lam[keep]))


def h_score_shrinkage(features: Any, labels: Any, shrinkage: float | None = None) -> float:
    """Shrinkage-regularised H-score (Ibrahim, Ponomareva, Mazumder 2022):
    ``tr(S_a^-1 (1 - a) cov(E[f|y]))`` with ``S_a = (1 - a) S + a (tr S / D) I`` and ``a`` the
    Ledoit-Wolf intensity (or ``shrinkage`` if given). Invariant to rotations and isotropic
    rescaling of the features."""
    f = _features(features)
    idx, _ = _labels(labels, f.shape[0])
    a = ledoit_wolf_shrinkage(f) if shrinkage is None else float(shrinkage)
    if not 0.0 <= a <= 1.0:
        raise ValueError("shrinkage must be in [0, 1]")
    if a == 0.0:  # no shrinkage: the plain H-score (pseudo-inverse)
        return h_score(f, labels)
    lam, proj, w = _scores_in_basis(f, idx)
    mu = float(np.sum((f - f.mean(0)) ** 2)) / f.shape[0] / f.shape[1]  # tr S / D
    # outside the span of the centred features S_a is (a mu) I, but the class-mean differences have
    # no component there, so the span's eigen-directions suffice
    return float((1 - a) * np.sum(w[:, None] * proj**2 / ((1 - a) * lam + a * mu)))


# ----------------------------------------------------------------------------------------- GBC

def pca(features: Any, dim: int) -> np.ndarray:
    """Centred features projected on their top ``dim`` principal directions (n x min(dim, rank))."""
    x = _features(features)
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    rank = int(np.sum(s > s[0] * max(x.shape) * np.finfo(np.float64).eps)) if s[0] > 0 else 0
    k = max(1, min(dim, rank))
    return u[:, :k] * s[:k]


def gbc(features: Any, labels: Any, *, pca_dim: int | None = 64,
        gaussian: Literal["diagonal", "spherical"] = "diagonal", var_floor: float = 1e-4) -> float:
    """Gaussian Bhattacharyya Coefficient (Pandy et al. 2022): ``-sum_{i != j} exp(-D_B(i, j))``
    over ordered pairs of classes, each class a Gaussian with per-dimension (``diagonal``) or a
    single (``spherical``: their mean) population variance, floored at ``var_floor``, fitted to
    the features after PCA to ``pca_dim`` components (``None``: no PCA). For diagonal Gaussians
    ``D_B = 1/8 sum (m_i - m_j)^2 / v + 1/2 sum log(v / sqrt(v_i v_j))``, ``v = (v_i + v_j) / 2``.
    Higher (closer to 0) is better; in [-K(K-1), 0]."""
    if gaussian not in ("diagonal", "spherical"):
        raise ValueError("gaussian must be 'diagonal' or 'spherical'")
    f = _features(features)
    idx, classes = _labels(labels, f.shape[0])
    x = pca(f, pca_dim) if pca_dim is not None else f
    k = len(classes)
    means = np.stack([x[idx == c].mean(0) for c in range(k)])
    var = np.stack([x[idx == c].var(0) for c in range(k)])
    if gaussian == "spherical":
        var = np.repeat(var.mean(1, keepdims=True), x.shape[1], axis=1)
    var = np.maximum(var, var_floor)
    v = (var[:, None, :] + var[None, :, :]) / 2                                    # K x K x D
    maha = np.sum((means[:, None, :] - means[None, :, :]) ** 2 / v, -1) / 8
    logs = np.log(var)
    det = np.sum(np.log(v), -1) - (logs.sum(1)[:, None] + logs.sum(1)[None, :]) / 2
    db = maha + det / 2
    bc = np.exp(-db)
    np.fill_diagonal(bc, 0.0)
    return float(-bc.sum())


# ----------------------------------------------------------------------------- rank correlation

@dataclass(frozen=True)
class RankCorrelation:
    """Kendall's tau-b between scores and measured accuracies across models, its two-sided p value
    (scipy's: exact for small n without ties), and the number of models."""

    tau: float
    pvalue: float
    n: int


def kendall_tau(scores: Mapping[Hashable, float] | Sequence[float],
                measured: Mapping[Hashable, float] | Sequence[float]) -> RankCorrelation:
    """Kendall's tau (``scipy.stats.kendalltau``, tau-b) between transferability ``scores`` and
    ``measured`` accuracies of the same models: two mappings model -> value with the same keys, or
    two sequences in the same order. Needs at least 2 models and finite values."""
    if isinstance(scores, Mapping) != isinstance(measured, Mapping):
        raise TypeError("pass two mappings (model -> value) or two sequences")
    if isinstance(scores, Mapping) and isinstance(measured, Mapping):
        if set(scores) != set(measured):
            raise ValueError(f"models differ: only in scores {sorted(map(str, set(scores) - set(measured)))}, "
                             f"only in measured {sorted(map(str, set(measured) - set(scores)))}")
        keys = list(scores)
        a = np.array([scores[k] for k in keys], dtype=np.float64)
        b = np.array([measured[k] for k in keys], dtype=np.float64)
    else:
        a, b = np.asarray(scores, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"need two vectors of equal length, got {a.shape} and {b.shape}")
    if a.size < 2:
        raise ValueError("need at least two models")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores and measured values must be finite")
    tau, pvalue = stats.kendalltau(a, b)  # tau-b; a tuple-like result in every scipy version
    return RankCorrelation(float(tau), float(pvalue), int(a.size))


# ----------------------------------------------------------------------------- the protocol

SCORES: dict[str, Any] = {"logme": logme, "hscore": h_score, "hscore_shrinkage": h_score_shrinkage, "gbc": gbc}


def _check_scores(value: Any) -> None:
    unknown = [s for s in value if s not in SCORES]
    if unknown or not value:
        raise ValueError(f"unknown score(s) {unknown}; choose from {', '.join(SCORES)}")


@dataclass(frozen=True)
class TransferabilityParams(Params):
    """Scores from frozen features of the labelled (training) images, no training."""

    scores: tuple[str, ...] = setting(("logme", "hscore_shrinkage", "gbc"), check=_check_scores,
                                      help=f"scores to compute ({', '.join(SCORES)}); the first is the headline")
    splits: tuple[str, ...] | None = setting(("train", "val"), help="splits whose images are scored "
                                             "(the labelled ones a user would train on); None: all")
    max_images: int | None = setting(20000, check=positive, help="seeded subsample above this many images")
    gbc_pca_dim: int = setting(64, check=positive, help="PCA dimension for GBC")


def _run(ctx: Any, p: TransferabilityParams, seed: int) -> EvalResult:
    feats = ctx.features()
    rows = np.sort(choose_rows(feats.records, p.max_images, seed, splits=p.splits))
    if len(rows) < 2:
        raise UsageError(f"transferability: fewer than 2 images in splits {p.splits}")
    x = np.asarray(feats.features)[rows]
    y = feats.labels[rows]
    kwargs = {"gbc": {"pca_dim": min(p.gbc_pca_dim, x.shape[1])}}
    metrics = {name: float(SCORES[name](x, y, **kwargs.get(name, {}))) for name in p.scores}
    metrics["images"] = float(len(rows))
    return EvalResult(
        protocol="transferability", metrics=metrics, params=p.to_dict(),
        headline=Headline(p.scores[0], metrics[p.scores[0]], None, True),
        details={"rows": len(rows), "classes": int(len(np.unique(y))), "feature_dim": int(x.shape[1]),
                 "note": "higher is better for every score; compare models on one dataset, not across datasets"})


register_protocol(Protocol(
    name="transferability", version="1", params=TransferabilityParams, run=_run, analysis=True,
    needs=Needs(features=("pooled",), accelerator="cpu"),
    description="LogME, (shrinkage) H-score and GBC on frozen features: predict transfer without training",
), aliases=("logme",))
