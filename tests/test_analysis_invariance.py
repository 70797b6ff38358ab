"""Invariance: Ledoit-Wolf against scikit-learn, known answers of the whitened cosine, the
vectorised statistic against a direct float64 transcription, the ridge collapse with N < D,
index sets, transform families and the real EyePACS left/right pairs."""
from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.covariance import LedoitWolf

from medxfer.analysis.invariance import (
    InvarianceError,
    choose_indices,
    choose_pair_indices,
    evaluation_view,
    feature_statistics,
    image_views,
    invariance_from_features,
    ledoit_wolf,
    match_pairs,
    pair_invariance,
    transform_family,
    transform_invariance,
    view_features,
    whiten,
    whitened_cosine,
)
from medxfer.models import load_model
from medxfer.models.backbone import build_trunk
from medxfer.models.normalize import get_normalizer
from medxfer.prepare import decode_record


def low_rank_features(rng: np.random.Generator, n: int, d: int, rank: int = 10) -> np.ndarray:
    basis = rng.normal(size=(rank, d))
    return (rng.normal(size=(n, rank)) * np.linspace(3, 1, rank)) @ basis + 0.3 * rng.normal(size=(n, d)) + 5.0


def direct_similarity(mean: np.ndarray, cov: np.ndarray, f1: np.ndarray, f2: np.ndarray) -> float:
    """The definition: z = L^T (mean - f), L the Cholesky factor of the inverse covariance."""
    lower = np.linalg.cholesky(np.linalg.inv(cov))
    z1, z2 = lower.T @ (mean - f1), lower.T @ (mean - f2)
    return float(z1 @ z2 / np.sqrt((z1 @ z1) * (z2 @ z2)))


# --------------------------------------------------------------------------- covariance

@pytest.mark.parametrize("n,d", [(50, 200), (500, 30), (10, 3), (2048, 64)])
def test_ledoit_wolf_matches_scikit_learn(n: int, d: int) -> None:
    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    cov, shrink = ledoit_wolf(x)
    ref = LedoitWolf().fit(x)
    assert shrink == pytest.approx(ref.shrinkage_, rel=1e-10)
    np.testing.assert_allclose(cov, ref.covariance_, rtol=1e-10, atol=1e-12 * np.abs(ref.covariance_).max())
    stats = feature_statistics(x)
    assert stats.estimator == "ledoit-wolf" and stats.shrinkage == shrink and stats.n == n
    np.testing.assert_allclose(stats.mean, x.mean(axis=0))
    np.testing.assert_allclose(stats.whitener @ stats.whitener.T, np.linalg.inv(cov), rtol=1e-6,
                               atol=1e-9 * np.abs(np.linalg.inv(cov)).max())


def test_ridge_estimator_is_sample_covariance_plus_ridge() -> None:
    x = np.random.default_rng(3).normal(size=(30, 8))
    stats = feature_statistics(x, estimator="ridge", ridge=1e-3)
    np.testing.assert_allclose(stats.covariance, np.cov(x, rowvar=False) + 1e-3 * np.eye(8))
    assert stats.shrinkage is None and stats.ridge == 1e-3
    assert "ridge" in stats.describe() and "Ledoit-Wolf" in feature_statistics(x).describe()


# --------------------------------------------------------------------------- known answers

def test_identity_view_gives_one_and_is_excluded_by_default() -> None:
    rng = np.random.default_rng(4)
    stats = feature_statistics(rng.normal(size=(100, 16)))
    clean = rng.normal(size=(12, 16))
    views = np.stack([clean, clean + rng.normal(size=clean.shape), -clean], axis=1)
    res = invariance_from_features(stats, clean, views, identity=0)
    np.testing.assert_allclose(res.similarities[:, 0], 1.0, rtol=0, atol=1e-12)
    assert res.invariance == pytest.approx(res.similarities[:, 1:].mean())
    assert res.included.tolist() == [False, True, True]
    with_id = invariance_from_features(stats, clean, views, identity=0, include_identity=True)
    assert with_id.invariance == pytest.approx(res.similarities.mean())
    assert with_id.invariance > res.invariance


@pytest.mark.parametrize("theta", [0.0, 0.3, np.pi / 2, 2.0, np.pi])
def test_constructed_rotation_in_whitened_space_gives_its_cosine(theta: float) -> None:
    rng = np.random.default_rng(5)
    d = 24
    stats = feature_statistics(rng.normal(size=(200, d)) @ rng.normal(size=(d, d)))
    z1 = rng.normal(size=(6, d))
    u = rng.normal(size=(6, d))
    u -= (np.einsum("nd,nd->n", u, z1) / np.einsum("nd,nd->n", z1, z1))[:, None] * z1  # orthogonal to z1
    u *= (np.linalg.norm(z1, axis=1) / np.linalg.norm(u, axis=1))[:, None]
    z2 = np.cos(theta) * z1 + np.sin(theta) * u
    unwhiten = np.linalg.inv(stats.whitener)
    f1, f2 = stats.mean - z1 @ unwhiten, stats.mean - z2 @ unwhiten
    np.testing.assert_allclose(whiten(stats, f1), z1, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(whitened_cosine(stats, f1, f2), np.cos(theta), atol=1e-9)


@pytest.mark.parametrize("estimator,n", [("ledoit-wolf", 80), ("ridge", 80), ("ledoit-wolf", 15), ("ridge", 15)])
def test_vectorised_equals_direct_transcription(estimator: str, n: int) -> None:
    rng = np.random.default_rng(6)
    d, m, v = 20, 7, 3
    stats = feature_statistics(low_rank_features(rng, n, d, rank=5), estimator=estimator)
    clean = low_rank_features(rng, m, d, rank=5)
    views = clean[:, None, :] + 0.5 * rng.normal(size=(m, v, d))
    res = invariance_from_features(stats, clean, views)
    direct = np.array([[direct_similarity(stats.mean, stats.covariance, clean[i], views[i, j]) for j in range(v)]
                       for i in range(m)])
    np.testing.assert_allclose(res.similarities, direct, rtol=1e-8, atol=1e-10)
    assert res.invariance == pytest.approx(direct.mean(), rel=1e-10)
    np.testing.assert_allclose(res.per_view, direct.mean(axis=0), rtol=1e-8)


def test_small_n_shrinkage_stays_conditioned_while_the_ridge_collapses_to_zero() -> None:
    """N < D with the evaluated images among the statistics images (the authors' setting)."""
    rng = np.random.default_rng(0)
    n, d = 40, 256
    x = low_rank_features(rng, n, d)
    views = x[:, None, :] + 0.1 * rng.normal(size=(n, 3, d))
    lw = feature_statistics(x)
    ridge = feature_statistics(x, estimator="ridge")
    assert 0 < lw.shrinkage < 1
    assert lw.condition_number() < 1e4
    assert ridge.condition_number() > 1e8
    inv_lw = invariance_from_features(lw, x, views).invariance
    inv_ridge = invariance_from_features(ridge, x, views).invariance
    assert inv_ridge < 0.05  # the published small-dataset artefact (e.g. 0.005-0.026 on Montgomery)
    big = feature_statistics(low_rank_features(np.random.default_rng(0), 20000, d))  # same distribution
    truth = invariance_from_features(big, x, views).invariance
    assert abs(inv_lw - truth) < 0.1 and truth > 0.8


# --------------------------------------------------------------------------- index sets

def test_choose_indices() -> None:
    st, ev = choose_indices(5000, seed=1)
    assert len(st) == 1000 and len(ev) == 100 and not set(st) & set(ev)
    assert np.all(np.diff(st) > 0) and np.all(np.diff(ev) > 0)
    st2, ev2 = choose_indices(5000, seed=1)
    assert np.array_equal(st, st2) and np.array_equal(ev, ev2)
    assert not np.array_equal(choose_indices(5000, seed=2)[1], ev)
    st, ev = choose_indices(150, seed=0)
    assert len(ev) == 75 and len(st) == 75 and not set(st) & set(ev)
    st, ev = choose_indices(150, seed=0, disjoint=False)
    assert len(ev) == 100 and len(st) == 150 and set(ev) <= set(st)
    with pytest.raises(InvarianceError):
        choose_indices(1, seed=0)


def test_match_pairs() -> None:
    names = ["3_left", "3_right", "7_right", "9_left", "9_right", "12_left"]
    np.testing.assert_array_equal(match_pairs(names), [[0, 1], [3, 4]])
    np.testing.assert_array_equal(match_pairs(names, labels=[0, 0, 1, 2, 1, 0]), [[0, 1]])
    assert match_pairs(["a", "b"]).shape == (0, 2)
    with pytest.raises(InvarianceError, match="unique"):
        match_pairs(["x_left", "x_left"])


def test_choose_pair_indices_keeps_statistics_off_the_evaluated_pairs() -> None:
    pairs = np.array([[2 * i, 2 * i + 1] for i in range(20)])
    st, ev = choose_pair_indices(pairs, 60, seed=3, n_eval=5)
    assert len(ev) == 5 and len(st) == 50
    assert not set(st) & set(pairs[ev].ravel())
    with pytest.raises(InvarianceError):
        choose_pair_indices(pairs, 30, seed=0)  # index 39 out of range


# --------------------------------------------------------------------------- transforms and views

def test_transform_families() -> None:
    rot = transform_family("rotation")
    assert rot.params == tuple(np.linspace(0, 360, 9)[:8]) and rot.identity == 0
    assert transform_family("rotation", k=20).params[1] == 18.0
    assert transform_family("hflip").params == (False, True)
    hue = transform_family("hue")
    assert hue.params == (-0.5, -0.25, 0.0, 0.25, 0.5) and hue.params[hue.identity] == 0.0
    with pytest.raises(InvarianceError):
        transform_family("shear")


def test_views_are_made_from_the_full_image_then_the_evaluation_transform() -> None:
    rng = np.random.default_rng(7)
    img = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    for name in ("rotation", "hflip", "hue"):
        fam = transform_family(name)
        views = image_views(img, fam, size=32)
        assert views.shape == (len(fam.params), 32, 32, 3) and views.dtype == np.uint8
        np.testing.assert_array_equal(views[fam.identity], evaluation_view(img, 32))
    flipped = image_views(img, transform_family("hflip"), size=32)[1]
    np.testing.assert_array_equal(flipped, evaluation_view(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 32))
    grey = Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), mode="L")
    assert image_views(grey, None, size=16).shape == (1, 16, 16, 3)


@functools.lru_cache(maxsize=1)
def _tiny() -> torch.nn.Module:
    return build_trunk("tinycnn", seed=0).eval()


def _tiny_features(x: torch.Tensor) -> torch.Tensor:
    return _tiny()(get_normalizer("imagenet")(x))


def test_a_transform_the_model_cannot_see_gives_one() -> None:
    rng = np.random.default_rng(8)
    # hue on greyscale images: no hue to shift
    greys = [Image.fromarray(rng.integers(0, 256, (64, 80), dtype=np.uint8), mode="L") for _ in range(6)]
    res = transform_invariance(_tiny_features, greys[:4] * 3, greys[4:], "hue", size=32)
    np.testing.assert_allclose(res.similarities, 1.0, atol=1e-12)
    # a flip-symmetrised model on square images cannot see horizontal flips
    net, norm = _tiny(), get_normalizer("imagenet")

    def symmetric(x: torch.Tensor) -> torch.Tensor:
        y = norm(x)
        return net(y) + net(torch.flip(y, dims=[3]))

    squares = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(14)]
    res = transform_invariance(symmetric, squares[:10], squares[10:], "hflip", size=32)
    np.testing.assert_allclose(res.similarities[:, 1], 1.0, atol=1e-5)
    # while an ordinary model does see the flips
    plain = transform_invariance(_tiny_features, squares[:10], squares[10:], "hflip", size=32)
    assert plain.invariance < 0.999


def test_transform_invariance_end_to_end_and_summary() -> None:
    rng = np.random.default_rng(9)
    imgs = [Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)) for _ in range(12)]
    res = transform_invariance(_tiny_features, imgs[:8], imgs[8:], "rotation", size=32, batch_size=5)
    assert res.similarities.shape == (4, 8) and res.n_eval == 4 and res.n_stats == 8
    np.testing.assert_allclose(res.similarities[:, 0], 1.0, atol=1e-12)
    assert -1 <= res.invariance <= 1 and res.estimator == "ledoit-wolf" and 0 < res.shrinkage <= 1
    summary = res.summary()
    assert summary["family"] == "rotation" and summary["params"][1] == 45.0 and summary["included"][0] is False
    feats = view_features(_tiny_features, imgs[:3], transform_family("hflip"), size=32, batch_size=1)
    assert feats.shape == (3, 2, 32)


# --------------------------------------------------------------------------- bad input

def test_bad_inputs() -> None:
    rng = np.random.default_rng(10)
    x = rng.normal(size=(20, 4))
    with pytest.raises(InvarianceError, match="estimator"):
        feature_statistics(x, estimator="empirical")
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InvarianceError, match="NaN"):
        feature_statistics(bad)
    with pytest.raises(InvarianceError, match="N >= 2"):
        feature_statistics(x[:1])
    with pytest.raises(InvarianceError, match="positive definite"):
        feature_statistics(np.ones((10, 3)))
    stats = feature_statistics(x)
    with pytest.raises(InvarianceError, match="dimensions"):
        whiten(stats, rng.normal(size=(3, 5)))
    with pytest.raises(InvarianceError, match="views"):
        invariance_from_features(stats, x[:3], x[:3])
    with pytest.raises(InvarianceError, match="identity"):
        invariance_from_features(stats, x[:3], x[:3, None, :], identity=0)
    with pytest.raises(InvarianceError, match="shape"):
        pair_invariance(stats, x[:3], x[:4])
    with pytest.raises(InvarianceError, match="undefined"):
        whitened_cosine(stats, stats.mean, x[0])
    assert issubclass(InvarianceError, ValueError)


# --------------------------------------------------------------------------- real data

def test_eyepacs_left_right_pair_invariance_random_resnet18(shared_data: Path) -> None:
    root = shared_data / "eyepacs-sample"
    files = sorted((root / "sample").glob("*.jpeg"))
    if not files:
        pytest.skip(f"EyePACS sample not found under {root}")
    with open(root / "trainLabels.csv", newline="") as f:
        grade = {row["image"]: int(row["level"]) for row in csv.DictReader(f)}
    names = [p.stem for p in files]
    pairs = match_pairs(names, labels=[grade[n] for n in names])  # left and right eye, same grade
    assert len(pairs) >= 10 and len(pairs) <= len(match_pairs(names))
    assert all(names[a].replace("_left", "_right") == names[b] for a, b in pairs)
    st, ev = choose_pair_indices(pairs, len(files), seed=0, n_eval=6, n_stats=1000)
    assert len(ev) == 6 and not set(st) & set(pairs[ev].ravel())
    model = load_model("supervised-r18", weights="random")
    needed = sorted(set(st) | set(pairs[ev].ravel()))
    crops = np.stack([decode_record(str(files[i]), 224, "aspect", 3) for i in needed])
    with torch.inference_mode():
        feats = model.features(torch.from_numpy(crops).permute(0, 3, 1, 2)).double().numpy()
    row = {i: k for k, i in enumerate(needed)}
    stats = feature_statistics(feats[[row[i] for i in st]])
    assert stats.n == len(st) < stats.dim  # fewer images than dimensions: shrinkage needed
    assert 0 < stats.shrinkage < 1
    left = feats[[row[i] for i in pairs[ev, 0]]]
    right = feats[[row[i] for i in pairs[ev, 1]]]
    res = pair_invariance(stats, left, right)
    assert res.similarities.shape == (6, 1) and res.n_eval == 6 and np.isfinite(res.invariance)
    assert np.all(np.abs(res.similarities) <= 1 + 1e-12)
    direct = [direct_similarity(stats.mean, stats.covariance, a, b) for a, b in zip(left, right)]
    np.testing.assert_allclose(res.similarities[:, 0], direct, rtol=1e-8, atol=1e-10)
    same = pair_invariance(stats, left, left)
    np.testing.assert_allclose(same.similarities, 1.0, atol=1e-12)
    assert res.invariance < 1.0
