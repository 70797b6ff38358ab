"""Linear probe: solver parity with scikit-learn, C selection, the result contract, errors."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import medxfer
from medxfer.data.records import DatasetInfo
from medxfer.features import FeatureSet
from medxfer.protocols.base import PROTOCOLS
from medxfer.protocols.linear import lambda_grid
from medxfer.protocols.logreg import fit_path
from medxfer.protocols.splits import carve_validation
from medxfer.testing import relu_blobs

linear_model = pytest.importorskip("sklearn.linear_model")


def blobs(n: int, d: int, k: int, seed: int = 0, sep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    return relu_blobs(n, d, k, seed, sep)


def sk_fit(x: np.ndarray, y: np.ndarray, c: float):
    return linear_model.LogisticRegression(C=c, tol=1e-10, max_iter=20000).fit(x.astype(np.float64), y)


def test_grid_is_the_papers() -> None:
    grid = lambda_grid()
    assert len(grid) == 45 and grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
    assert np.any(np.isclose(1 / grid, 5623.413, rtol=1e-6))


@pytest.mark.parametrize("n,d", [(300, 12), (40, 60)])  # N > D (full basis) and N < D (reduced)
def test_path_matches_sklearn_multinomial(n: int, d: int) -> None:
    x, y = blobs(n, d, 3, seed=n)
    lambdas = np.array([1e-2, 1.0, 30.0, 1e3])
    path = fit_path(x, y, lambdas, tol=1e-9, max_iter=5000, dtype=torch.float64, device="cpu")
    assert path.converged.all()
    proba = path.predict_proba(x)
    for i, lam in enumerate(lambdas):
        ref = sk_fit(x, y, 1 / lam)
        np.testing.assert_allclose(proba[i], ref.predict_proba(x), atol=2e-5)
        np.testing.assert_allclose(path.coef[i], ref.coef_.T, atol=2e-4 * max(1.0, np.abs(ref.coef_).max()))
        np.testing.assert_allclose(path.intercept[i], ref.intercept_, atol=2e-4 * max(1.0, np.abs(ref.intercept_).max()))


def test_float32_default_is_close_to_sklearn() -> None:
    x, y = blobs(400, 16, 4, seed=3)
    lambdas = lambda_grid()[::4]
    path = fit_path(x, y, lambdas, device="cpu")  # float32, tol 1e-4 (the defaults)
    assert path.converged.all() and (path.rel_grad <= 1e-4).all()  # the certificate (test_linear_certificate.py)
    proba = path.predict_proba(x)
    for i in (0, 5, len(lambdas) - 1):
        np.testing.assert_allclose(proba[i], sk_fit(x, y, 1 / lambdas[i]).predict_proba(x), atol=5e-3)


def test_binary_multinomial_equals_sklearn_binomial_at_twice_c() -> None:
    # a 2-class softmax with ||W||^2 / (2CN) is the binomial model with C' = 2C
    x, y = blobs(200, 8, 2, seed=5)
    path = fit_path(x, y, np.array([0.5]), tol=1e-10, max_iter=5000, dtype=torch.float64, device="cpu")
    ref = sk_fit(x, y, 2 * (1 / 0.5))
    np.testing.assert_allclose(path.predict_proba(x)[0], ref.predict_proba(x), atol=1e-6)


@pytest.mark.parametrize("n,d", [(3000, 48), (150, 300)])  # full basis and reduced (N < D)
def test_bf16_products_are_verified_exactly(n: int, d: int) -> None:
    # tol 2e-6 is below what bf16 products can certify: every fit must finish on exact products,
    # and "converged" must mean the certificate holds for the returned weights (recomputed
    # independently in float64)
    from test_linear_certificate import certificate

    x, y = blobs(n, d, 4, seed=13, sep=0.3)
    lambdas = lambda_grid()[::8]
    tol = 2e-6
    fast = fit_path(x, y, lambdas, tol=tol, device="cpu", matmul="bf16")
    exact = fit_path(x, y, lambdas, tol=tol, device="cpu", matmul="exact")
    assert fast.matmul == "bf16" and exact.matmul == "exact"
    assert fast.converged.all()
    for i, lam in enumerate(lambdas):
        assert certificate(x, y, fast.coef[i], fast.intercept[i], lam)[0] <= 1.05 * tol
    np.testing.assert_allclose(fast.predict_proba(x), exact.predict_proba(x), atol=1e-3)


def test_fast_bf16_detection_reads_cpu_flags(tmp_path) -> None:
    from medxfer.devices import fast_bf16_matmul

    with_bf16 = tmp_path / "with"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 fma\n")
    without = tmp_path / "without"
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f fma\n")
    assert fast_bf16_matmul("cpu", cpuinfo=str(with_bf16))
    assert not fast_bf16_matmul("cpu", cpuinfo=str(without))
    assert not fast_bf16_matmul("cpu", cpuinfo=str(tmp_path / "absent"))


def test_matmul_auto_and_errors() -> None:
    x, y = blobs(100, 8, 3, seed=1)
    assert fit_path(x, y, np.array([1.0]), device="cpu").matmul == "exact"  # small problem: no bf16 copy
    assert fit_path(x, y, np.array([1.0]), device="cpu", dtype=torch.float64, matmul="auto").matmul == "exact"
    with pytest.raises(ValueError, match="matmul must be one of"):
        fit_path(x, y, np.array([1.0]), device="cpu", matmul="fp8")


def test_reused_basis_gives_the_same_fit() -> None:
    x, y = blobs(300, 10, 3, seed=7)
    first = fit_path(x[:200], y[:200], np.array([1.0]), dtype=torch.float64, tol=1e-10, device="cpu")
    assert first.basis is not None
    a = fit_path(x, y, np.array([2.0]), dtype=torch.float64, tol=1e-10, device="cpu")
    b = fit_path(x, y, np.array([2.0]), dtype=torch.float64, tol=1e-10, device="cpu", basis=first.basis)
    np.testing.assert_allclose(a.coef, b.coef, atol=1e-6)


def run_linear(features: FeatureSet, seed: int = 0, **params):
    return medxfer.evaluate("linear", features, seed=seed, device="cpu", **params)


def feature_set(n: int = 600, d: int = 20, k: int = 3, seed: int = 0, with_val: bool = True,
                headline: str = "accuracy") -> FeatureSet:
    x, y = blobs(n, d, k, seed=seed, sep=0.35)
    rng = np.random.default_rng(seed + 100)
    names = np.array(["train", "val", "test"], dtype=object)
    splits = names[rng.choice(3, size=n, p=[0.6, 0.2, 0.2])]
    if not with_val:
        splits[splits == "val"] = "train"
    info = DatasetInfo("d", "multiclass", tuple(str(c) for c in range(k)), headline_metric=headline)
    return FeatureSet.from_arrays(x, y, splits, model="m", dataset="d", info=info)


def test_chosen_c_and_test_accuracy_match_sklearn() -> None:
    fs = feature_set()
    res = run_linear(fs, seed=0, tol=1e-6)
    tr, va, te = (fs.split_indices(s) for s in ("train", "val", "test"))
    grid = lambda_grid()
    curve = [100 * sk_fit(fs.features[tr], fs.labels[tr], 1 / lam).score(fs.features[va], fs.labels[va])
             for lam in grid]
    best = int(np.flatnonzero(np.isclose(curve, max(curve)))[0])
    k = res.details["chosen_index"]
    assert k == best or (abs(k - best) == 1 and np.isclose(curve[k], curve[best]))
    np.testing.assert_allclose(res.details["val_curve"], curve, atol=1e-9 + 100 / len(va) + 1e-9)
    all_idx = np.concatenate([tr, va])
    ref = sk_fit(fs.features[all_idx], fs.labels[all_idx], 1 / grid[k])
    assert res.metrics["accuracy"] == pytest.approx(100 * ref.score(fs.features[te], fs.labels[te]), abs=0.2)
    assert res.metrics["C"] == pytest.approx(1 / grid[k])


def test_result_contract_is_complete_and_json_serialisable() -> None:
    fs = feature_set(headline="mean_per_class_accuracy")
    res = medxfer.evaluate("linear", fs, seed=1)
    assert res.protocol == "linear"
    for key in ("accuracy", "mean_per_class_accuracy", "balanced_accuracy", "auroc", "C", "headline"):
        assert key in res.metrics
    assert res.metrics["headline"] == res.metrics["mean_per_class_accuracy"]
    d = res.details
    assert d["headline_metric"] == "mean_per_class_accuracy"
    assert len(d["grid_C"]) == len(d["val_curve"]) == len(d["iterations"]) == len(d["converged"]) == 45
    assert d["grid_C"][d["chosen_index"]] == res.metrics["C"]
    assert d["val_curve"][d["chosen_index"]] == max(d["val_curve"])
    assert d["splits"]["val_source"] == "dataset"
    json.dumps({"m": res.metrics, "p": res.params, "d": res.details, "w": res.warnings}, allow_nan=False)
    assert "linear" in PROTOCOLS


def test_carved_validation_is_seeded_and_stratified() -> None:
    fs = feature_set(with_val=False)
    a = run_linear(fs, seed=3)
    b = run_linear(fs, seed=3)
    assert a.details["splits"]["val_source"] == "carved"
    assert a.details["val_stratified"] is True
    assert a.metrics == b.metrics and a.details["val_curve"] == b.details["val_curve"]
    labels = np.repeat(np.arange(3), [50, 30, 4])
    fit, val = carve_validation(labels, 0.2, seed=0, stratified=True)
    assert sorted(np.unique(labels[val])) == [0, 1, 2] and len(np.intersect1d(fit, val)) == 0
    assert len(fit) + len(val) == len(labels)
    _, val2 = carve_validation(labels, 0.2, seed=0, stratified=False)
    assert len(val2) == round(0.2 * len(labels))
    assert not np.array_equal(val, carve_validation(labels, 0.2, seed=1, stratified=True)[1])


def test_non_converged_fits_are_reported() -> None:
    fs = feature_set()
    res = run_linear(fs, seed=0, max_iter=2, tol=1e-8)
    assert res.details["non_converged"], "2 iterations cannot reach tol=1e-8"
    assert len(res.details["non_converged"]) == sum(not c for c in res.details["converged"])
    assert any("did not converge" in w for w in res.warnings)


def test_paper_compat_runs_sklearn_weak_to_strong() -> None:
    fs = feature_set(n=300)
    params = PROTOCOLS.get("linear").make_params({"max_iter": 5}, compat="paper")
    assert params.solver == "sklearn-lbfgs" and params.warm_start_order == "weak_to_strong"
    res = run_linear(fs, seed=0, compat="paper", max_iter=5)
    assert res.details["solver"] == "sklearn-lbfgs"
    assert res.details["non_converged"]  # 5 iterations: recorded, not silenced
    assert 0.0 <= res.metrics["accuracy"] <= 100.0


def test_clear_errors() -> None:
    fs = feature_set()
    no_test = FeatureSet.from_arrays(fs.features, fs.labels, ["train"] * len(fs), model="m", dataset="d")
    with pytest.raises(ValueError, match="no 'test' split"):
        run_linear(no_test)
    bad = fs.features.copy()
    bad[7, 3] = np.nan
    nan_fs = FeatureSet.from_arrays(bad, fs.labels, fs.splits, model="m", dataset="d")
    with pytest.raises(ValueError, match=r"rows \[7\]"):
        run_linear(nan_fs)
    with pytest.raises(ValueError, match="unknown '--set linear.not_a_param'"):
        medxfer.evaluate("linear", fs, not_a_param=1)
    with pytest.raises(ValueError, match="solver"):
        medxfer.evaluate("linear", fs, solver="newton")  # refused before any fitting


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_matches_cpu() -> None:
    x, y = blobs(500, 32, 4, seed=9)
    lambdas = lambda_grid()[::6]
    cpu = fit_path(x, y, lambdas, device="cpu", tol=1e-5)
    gpu = fit_path(x, y, lambdas, device="cuda", tol=1e-5)
    assert gpu.device.startswith("cuda")
    np.testing.assert_allclose(gpu.predict_proba(x), cpu.predict_proba(x), atol=2e-3)


def test_warm_started_fit_reaches_the_same_solution_faster() -> None:
    x, y = blobs(600, 40, 3, seed=11)
    lam = np.array([0.1])
    cold = fit_path(x, y, lam, dtype=torch.float64, tol=1e-9, device="cpu")
    near = fit_path(x[:550], y[:550], lam, dtype=torch.float64, tol=1e-9, device="cpu")
    warm = fit_path(x, y, lam, dtype=torch.float64, tol=1e-9, device="cpu", init=(near.coef, near.intercept))
    assert cold.converged.all() and warm.converged.all()
    np.testing.assert_allclose(warm.coef, cold.coef, atol=1e-5)  # |grad| <= 1e-9 with curvature down to lam/N = 1.7e-4
    assert warm.n_iter[0] < cold.n_iter[0]
    same = fit_path(x, y, lam, dtype=torch.float64, tol=1e-9, device="cpu", init=(cold.coef, cold.intercept))
    assert same.n_iter[0] <= 1  # starting at the optimum: nothing (or one polishing step) to do


def test_the_run_device_reaches_the_solver_and_stays_out_of_run_keys() -> None:
    """The solver gets the caller's device (``--device`` in a run), unless ``linear.device`` is set."""
    from medxfer.protocols.linear import SOLVERS

    seen: list[str] = []
    real = SOLVERS.get("medxfer")

    def recording(*args):
        seen.append(args[-1])
        return real(*args[:-1], "cpu")

    SOLVERS.register("recording", recording)
    try:
        fs = feature_set(n=200)
        medxfer.evaluate("linear", fs, solver="recording", device="cpu")
        medxfer.evaluate("linear", fs, solver="recording", device="cuda:7")  # recorded, never used
    finally:
        SOLVERS.unregister("recording")
    assert seen == ["cpu", "cuda:7"]
    assert "device" not in PROTOCOLS.get("linear").make_params({"device": "cpu"}).key()


def test_paper_compat_fits_binary_tasks_as_two_class_multinomial() -> None:
    """The authors' scikit-learn fitted a 2-class softmax; installed scikit-learn fits a binomial
    model, whose C means twice as much. With binary_as_multinomial the two agree."""
    from medxfer.protocols.linear import SOLVERS

    x, y = blobs(240, 10, 2, seed=21, sep=0.5)
    lambdas = np.array([1.0, 10.0, 100.0])
    params = PROTOCOLS.get("linear").make_params({"tol": 1e-10, "max_iter": 5000}, compat="paper")
    assert params.binary_as_multinomial
    sk = SOLVERS.get("sklearn-lbfgs")
    args = (x[:160], y[:160], x[160:], x, y, x[160:], lambdas, 2)
    compat = sk(*args, replace(params, warm_start_order="none"), "cpu")
    plain = sk(*args, replace(params, warm_start_order="none", binary_as_multinomial=False), "cpu")
    ours = fit_path(x[:160], y[:160], lambdas, tol=1e-10, max_iter=5000, dtype=torch.float64, device="cpu")
    ref = ours.predict_proba(x[160:])
    np.testing.assert_allclose(compat.val_proba, ref, atol=2e-4)  # float32 features in scikit-learn
    assert np.abs(plain.val_proba - ref).max() > 0.01  # the binomial model at C is another model
    assert "2C" in compat.info["note"]


def test_many_shot_results_carry_test_size_bootstrap_interval_and_grid_edge_flag() -> None:
    fs = feature_set(n=400)
    res = run_linear(fs, seed=0, bootstrap=200)
    m = res.metrics
    assert m["test_n"] == len(fs.split_indices("test"))
    assert m["ci95_low"] <= m["headline"] <= m["ci95_high"]
    assert res.headline.ci95 == pytest.approx((m["ci95_high"] - m["ci95_low"]) / 2)
    assert res.details["bootstrap"]["unit"] == "image" and res.details["bootstrap"]["replicates"] == 200
    assert run_linear(fs, seed=0, bootstrap=200).metrics == m  # seeded
    edge = run_linear(fs, seed=0, grid_min=2.0, grid_max=5.0, grid_size=4, bootstrap=0)  # only strong penalties
    assert edge.details["c_at_grid_edge"] is (edge.details["chosen_index"] in (0, 3))
    if edge.details["c_at_grid_edge"]:
        assert any("edge of the grid" in w for w in edge.warnings)
    assert "ci95_low" not in edge.metrics and edge.headline.ci95 is None
