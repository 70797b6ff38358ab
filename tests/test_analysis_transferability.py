"""Transferability scores against naive transcriptions of their papers' formulas (explicit
inverses, no SVD tricks), scikit-learn's Ledoit-Wolf, their invariances and their ordering of
more and less separable features; Kendall's tau against scipy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.covariance import ledoit_wolf, ledoit_wolf_shrinkage

from medxfer.analysis import transferability as T


def blobs(n: int, d: int, k: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k Gaussian classes in d dimensions, class means sep * N(0, I), anisotropic noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    rng.shuffle(y)
    centres = sep * rng.standard_normal((k, d))
    scales = np.linspace(0.5, 2.0, d)
    return centres[y] + rng.standard_normal((n, d)) * scales + 3.0, y


def rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# ------------------------------------------------------------------------ LogME, transcribed

def naive_logme_column(f: np.ndarray, y: np.ndarray, iters: int = 10_000, tol: float = 1e-13
                       ) -> tuple[float, float, float]:
    """You et al. 2021, Algorithm 1 as written: alpha = beta = 1; repeat gamma = sum beta s_i /
    (alpha + beta s_i) over the eigenvalues s_i of F'F, A = alpha I + beta F'F, m = beta A^-1 F'y,
    alpha = gamma / m'm, beta = (n - gamma) / |Fm - y|^2; then the log evidence / n."""
    n, d = f.shape
    ftf = f.T @ f
    s = np.clip(np.linalg.eigvalsh(ftf), 0.0, None)
    alpha, beta = 1.0, 1.0
    for _ in range(iters):
        a_mat = alpha * np.eye(d) + beta * ftf
        m = beta * np.linalg.inv(a_mat) @ f.T @ y
        gamma = np.sum(beta * s / (alpha + beta * s))
        new_alpha = gamma / (m @ m)
        new_beta = (n - gamma) / np.sum((f @ m - y) ** 2)
        done = abs(new_alpha / alpha - 1) < tol and abs(new_beta / beta - 1) < tol
        alpha, beta = new_alpha, new_beta
        if done:
            break
    a_mat = alpha * np.eye(d) + beta * ftf
    m = beta * np.linalg.inv(a_mat) @ f.T @ y
    sign, logdet = np.linalg.slogdet(a_mat)
    assert sign > 0
    evidence = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                - beta / 2 * np.sum((f @ m - y) ** 2) - alpha / 2 * (m @ m) - logdet / 2)
    return evidence / n, alpha, beta


def naive_logme(f: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([naive_logme_column(f, (y == c).astype(float))[0] for c in np.unique(y)]))


@pytest.mark.parametrize(("n", "d", "k", "seed"), [(120, 10, 3, 0), (60, 25, 4, 1), (30, 50, 2, 2)])
def test_logme_matches_the_papers_fixed_point(n: int, d: int, k: int, seed: int) -> None:
    f, y = blobs(n, d, k, sep=1.0, seed=seed)
    f = f / 3.0
    got = T.logme(f, y, tol=1e-12, max_iter=10_000)
    assert got == pytest.approx(naive_logme(f, y), rel=1e-8, abs=1e-10)
    fits = T.logme_fits(f, (y == 0).astype(float), tol=1e-12, max_iter=10_000)
    ev, alpha, beta = naive_logme_column(f, (y == 0).astype(float))
    assert fits[0].converged and fits[0].evidence == pytest.approx(ev, rel=1e-8)
    assert fits[0].alpha == pytest.approx(alpha, rel=1e-6) and fits[0].beta == pytest.approx(beta, rel=1e-6)


def test_logme_default_tolerance_is_close_to_the_fixed_point() -> None:
    f, y = blobs(200, 16, 3, sep=1.0, seed=3)
    assert T.logme(f, y) == pytest.approx(T.logme(f, y, tol=1e-13, max_iter=10_000), rel=1e-6)


def test_logme_invariances() -> None:
    f, y = blobs(150, 12, 3, sep=1.0, seed=4)
    base = T.logme(f, y, tol=1e-12, max_iter=10_000)
    rotated = f @ rotation(12, 5) * 7.3
    assert T.logme(rotated, y, tol=1e-12, max_iter=10_000) == pytest.approx(base, rel=1e-7)
    relabelled = np.array(["c", "a", "b"])[y]
    assert T.logme(f, relabelled, tol=1e-12, max_iter=10_000) == pytest.approx(base, rel=1e-12)
    anisotropic = f * np.linspace(0.1, 10.0, 12)
    assert abs(T.logme(anisotropic, y) - base) > 1e-3  # not invariant to per-dimension scaling


# ------------------------------------------------------------------------- H-score, transcribed

def naive_h_score(f: np.ndarray, y: np.ndarray) -> float:
    """Bao et al. 2019: tr(cov(f)^-1 cov(E[f|y])) with every sample replaced by its class mean."""
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    return float(np.trace(np.linalg.inv(np.cov(f.T, bias=True)) @ np.cov(g.T, bias=True)))


def naive_shrinkage_h_score(f: np.ndarray, y: np.ndarray) -> float:
    """Ibrahim et al. 2022 with scikit-learn's Ledoit-Wolf covariance and intensity."""
    cov, a = ledoit_wolf(f)
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    return float(np.trace(np.linalg.inv(cov) @ ((1 - a) * np.cov(g.T, bias=True))))


@pytest.mark.parametrize(("n", "d", "seed"), [(300, 8, 0), (40, 30, 1), (25, 60, 2)])
def test_ledoit_wolf_matches_scikit_learn(n: int, d: int, seed: int) -> None:
    f, _ = blobs(n, d, 3, sep=1.0, seed=seed)
    assert T.ledoit_wolf_shrinkage(f) == pytest.approx(ledoit_wolf_shrinkage(f), rel=1e-10)


def test_h_scores_match_transcriptions() -> None:
    f, y = blobs(200, 10, 4, sep=1.0, seed=6)
    assert T.h_score(f, y) == pytest.approx(naive_h_score(f, y), rel=1e-9)
    for n, d in ((200, 10), (50, 40), (30, 80)):
        f, y = blobs(n, d, 3, sep=1.0, seed=n + d)
        assert T.h_score_shrinkage(f, y) == pytest.approx(naive_shrinkage_h_score(f, y), rel=1e-8)
    f, y = blobs(200, 10, 4, sep=1.0, seed=6)
    assert T.h_score_shrinkage(f, y, shrinkage=0.0) == pytest.approx(T.h_score(f, y), rel=1e-12)
    with pytest.raises(ValueError):
        T.h_score_shrinkage(f, y, shrinkage=1.5)


def test_h_score_invariances() -> None:
    f, y = blobs(200, 10, 3, sep=1.0, seed=7)
    affine = f @ np.random.default_rng(8).standard_normal((10, 10)) + 5.0
    assert T.h_score(affine, y) == pytest.approx(T.h_score(f, y), rel=1e-7)
    f, y = blobs(40, 30, 3, sep=1.0, seed=9)
    base = T.h_score_shrinkage(f, y)
    assert T.h_score_shrinkage(f @ rotation(30, 10) * 0.01 - 2.0, y) == pytest.approx(base, rel=1e-8)
    assert abs(T.h_score_shrinkage(f * np.linspace(0.1, 10, 30), y) - base) > 1e-3 * abs(base)


# ----------------------------------------------------------------------------- GBC, transcribed

def naive_gbc(f: np.ndarray, y: np.ndarray, dim: int) -> float:
    """Pandy et al. 2022: PCA (eigenvectors of the covariance), per-class diagonal Gaussians with
    variances floored at 1e-4, -sum over ordered pairs i != j of exp(-D_B)."""
    x = f - f.mean(0)
    w, v = np.linalg.eigh(np.cov(x.T, bias=True))
    x = x @ v[:, np.argsort(w)[::-1][:dim]]
    total = 0.0
    for ci in np.unique(y):
        for cj in np.unique(y):
            if ci == cj:
                continue
            m1, m2 = x[y == ci].mean(0), x[y == cj].mean(0)
            v1, v2 = np.maximum(x[y == ci].var(0), 1e-4), np.maximum(x[y == cj].var(0), 1e-4)
            v = (v1 + v2) / 2
            db = np.sum((m1 - m2) ** 2 / v) / 8 + 0.5 * np.log(np.prod(v) / np.sqrt(np.prod(v1) * np.prod(v2)))
            total += np.exp(-db)
    return -total


def test_gbc_matches_transcription_and_is_bounded() -> None:
    f, y = blobs(150, 20, 3, sep=0.5, seed=11)
    assert T.gbc(f, y, pca_dim=8) == pytest.approx(naive_gbc(f, y, 8), rel=1e-9)
    assert T.gbc(f, y, pca_dim=64) == pytest.approx(naive_gbc(f, y, 20), rel=1e-9)  # capped at D
    far, yf = blobs(150, 20, 3, sep=50.0, seed=12)
    assert -1e-6 < T.gbc(far, yf) <= 0.0
    same = np.random.default_rng(13).standard_normal((3000, 5))
    assert T.gbc(same, np.arange(3000) % 3) == pytest.approx(-6.0, rel=1e-2)  # K(K-1) identical classes
    sph = T.gbc(f, y, gaussian="spherical")
    assert -6.0 <= sph <= 0.0 and sph != T.gbc(f, y)


def test_gbc_invariant_to_rotation_and_translation() -> None:
    f, y = blobs(200, 12, 3, sep=0.7, seed=14)
    moved = f @ rotation(12, 15) - 4.0
    assert T.gbc(moved, y, pca_dim=6) == pytest.approx(T.gbc(f, y, pca_dim=6), rel=1e-8)


# -------------------------------------------------------------------------- every score, sanity

@pytest.mark.parametrize("score", [T.logme, T.h_score, T.h_score_shrinkage, T.gbc])
def test_more_separable_features_score_higher(score) -> None:  # type: ignore[no-untyped-def]
    values = [score(*blobs(240, 16, 4, sep=s, seed=20)) for s in (0.2, 1.0, 3.0)]
    assert values[0] < values[1] < values[2]


def test_inputs() -> None:
    f, y = blobs(50, 6, 2, sep=1.0, seed=21)
    assert T.logme(torch.from_numpy(f).float(), torch.from_numpy(y)) == pytest.approx(T.logme(f, y), rel=1e-5)
    with pytest.raises(ValueError, match="two classes"):
        T.logme(f, np.zeros(50))
    with pytest.raises(ValueError, match="length"):
        T.h_score(f, y[:-1])
    with pytest.raises(ValueError, match="n x D"):
        T.gbc(f[0], y)
    bad = f.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        T.h_score_shrinkage(bad, y)


# ------------------------------------------------------------------------------- Kendall's tau

def test_kendall_tau() -> None:
    scores = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 5.0, "e": 4.0}
    acc = {"e": 0.8, "d": 0.9, "c": 0.6, "b": 0.7, "a": 0.5}  # same order as scores
    r = T.kendall_tau(scores, acc)
    assert r.tau == pytest.approx(1.0) and r.n == 5 and r.pvalue < 0.05
    rev = T.kendall_tau(scores, {k: -v for k, v in acc.items()})
    assert rev.tau == pytest.approx(-1.0)
    xs, ys = [0.1, 0.4, 0.2, 0.9, 0.5, 0.3], [1, 3, 2, 4, 6, 5]
    ref = stats.kendalltau(xs, ys)
    got = T.kendall_tau(xs, ys)
    assert got.tau == pytest.approx(ref.statistic) and got.pvalue == pytest.approx(ref.pvalue)
    with pytest.raises(ValueError, match="models differ"):
        T.kendall_tau(scores, {**acc, "f": 0.1})
    with pytest.raises(ValueError, match="finite"):
        T.kendall_tau([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="two models"):
        T.kendall_tau([1.0], [2.0])
    with pytest.raises(TypeError):
        T.kendall_tau(scores, [1.0] * 5)
