import json

import numpy as np
import pytest

import medxfer
from medxfer.features import FeatureSet
from medxfer.protocols.fewshot import FewShotError, episode_accuracies, mean_ci95, sample_episodes, select_pool


def run_fewshot(features, seed=0, **params):
    return medxfer.evaluate("fewshot", features, seed=seed, **params)


def _toy(n_per_class=40, classes=3, dim=16, sep=1.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centres = rng.normal(size=(classes, dim)) * sep
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    return x.astype(np.float32), labels


def test_episodes_are_valid_and_deterministic():
    _, labels = _toy()
    e1, _ = sample_episodes(labels, 2, 5, 15, 50, seed=3)
    e2, _ = sample_episodes(labels, 2, 5, 15, 50, seed=3)
    e3, _ = sample_episodes(labels, 2, 5, 15, 50, seed=4)
    assert e1.digest() == e2.digest() != e3.digest()
    assert e1.support.shape == (50, 2, 5) and e1.query.shape == (50, 2, 15)
    for ep in range(50):
        assert len(set(e1.classes[ep])) == 2
        for k in range(2):
            idx = np.concatenate([e1.support[ep, k], e1.query[ep, k]])
            assert len(set(idx)) == 20  # distinct images
            assert (labels[idx] == e1.classes[ep, k]).all()


def test_episode_accuracy_matches_naive_prototypes():
    x, labels = _toy(sep=0.5)
    eps, _ = sample_episodes(labels, 3, 4, 6, 30, seed=1)
    fast = episode_accuracies(x, eps, chunk=7)
    for e in range(30):
        protos = np.stack([x[eps.support[e, k]].mean(0) for k in range(3)])
        correct = 0
        for k in range(3):
            for qi in eps.query[e, k]:
                d = ((protos - x[qi]) ** 2).sum(1)
                correct += int(np.argmin(d) == k)
        assert fast[e] == pytest.approx(correct / 18)


def test_ci_formula_uses_population_std():
    vals = np.array([0.5, 0.6, 0.7, 0.8])
    mean, half = mean_ci95(vals)
    assert mean == pytest.approx(0.65)
    assert half == pytest.approx(1.96 * np.sqrt(((vals - 0.65) ** 2).mean()) / 2)


def test_same_episodes_for_different_models():
    x, labels = _toy()
    a = run_fewshot(FeatureSet.from_arrays(x, labels, model="a"), seed=0, n_shot=5, episodes=100)
    b = run_fewshot(FeatureSet.from_arrays(x * 2 + 1, labels, model="b"), seed=0, n_shot=5, episodes=100)
    assert a.details["episodes_sha256"] == b.details["episodes_sha256"]
    again = run_fewshot(FeatureSet.from_arrays(x, labels, model="a"), seed=0, n_shot=5, episodes=100)
    assert again.metrics == a.metrics
    json.dumps(a.details)  # serialisable


def test_separable_features_beat_chance_and_noise_does_not():
    x, labels = _toy(sep=3.0)
    good = run_fewshot(FeatureSet.from_arrays(x, labels), seed=0, n_shot=5, episodes=200)
    noise = np.random.default_rng(9).normal(size=x.shape).astype(np.float32)
    bad = run_fewshot(FeatureSet.from_arrays(noise, labels), seed=0, n_shot=5, episodes=200)
    assert good.metrics["accuracy"] > 90
    assert abs(bad.metrics["accuracy"] - 50) < 8
    assert len(good.details["episode_accuracies"]) == 200


def test_too_small_class_is_a_clear_error_or_recorded_drop():
    x, labels = _toy(n_per_class=40, classes=3)
    labels = labels.copy()
    labels[:30] = 1  # class 0 keeps 10 images
    fs = FeatureSet.from_arrays(x, labels, class_names=("normal", "tb", "other"))
    with pytest.raises(FewShotError, match="'normal' has 10"):
        run_fewshot(fs, n_shot=20, n_query=15)
    r = run_fewshot(fs, n_shot=20, n_query=15, episodes=20, small_classes="drop")
    assert r.warnings and "normal" in r.warnings[0]


def test_non_finite_features_are_rejected():
    x, labels = _toy()
    x[5, 0] = np.nan
    with pytest.raises(FewShotError, match="not finite"):
        run_fewshot(FeatureSet.from_arrays(x, labels), n_shot=5)


def test_pool_selection():
    labels = np.arange(100) % 2
    splits = np.array(["train"] * 80 + ["test"] * 20, dtype=object)
    assert len(select_pool(labels, splits, None, 0)) == 100
    pool = select_pool(labels, splits, 30, 0)
    assert len(pool) == 30 and (pool < 80).all()
    assert (select_pool(labels, splits, 30, 0) == pool).all()


def test_dataset_paper_settings_apply_when_the_features_know_their_dataset():
    from dataclasses import replace

    from medxfer.data.eyepacs import INFO as EYEPACS

    x, labels = _toy(n_per_class=40, classes=5)
    fs = FeatureSet.from_arrays(x, labels, splits=["train"] * len(labels), info=replace(EYEPACS))
    r = run_fewshot(fs, n_shot=5, episodes=10)
    assert r.params["n_way"] == 5 and r.params["pool_size"] == 10001  # EyePACS: 5-way, 10,001-image pool
    plain = run_fewshot(FeatureSet.from_arrays(x, labels), n_shot=5, episodes=10)
    assert plain.params["n_way"] == 2 and plain.params["pool_size"] is None


def test_parameter_errors_name_the_field_and_suggest():
    from medxfer.errors import ParamError

    x, labels = _toy()
    fs = FeatureSet.from_arrays(x, labels)
    with pytest.raises(ParamError, match="Did you mean '--set fewshot.n_shot'") as exc:
        run_fewshot(fs, n_shto=5)
    assert "n_way (int, default 2)" in str(exc.value)
    with pytest.raises(ParamError, match="n_shot='five': expected an integer"):
        run_fewshot(fs, n_shot="five")
    with pytest.raises(ParamError, match="small_classes='maybe': expected one of 'error' | 'drop'"):
        run_fewshot(fs, small_classes="maybe")
    with pytest.raises(ParamError, match="episodes=0: must be positive"):
        run_fewshot(fs, episodes=0)
