"""Linear probe: multinomial L2 logistic regression on frozen features (paper Table 4).

lambda = logspace(-6, 5, 45), C = 1 / lambda (scikit-learn's meaning: mean cross-entropy +
||W||^2 / (2 C N), unpenalised intercept). Every grid point is fitted on the fit part of
train, scored on validation (the dataset's own split, or a seeded carve of train), the best
value is refitted on train + validation and scored on test.

Solvers (a registry): ``"medxfer"`` fits the whole path at once with the batched,
preconditioned L-BFGS of :mod:`medxfer.protocols.logreg` (torch, GPU when present), every fit
to convergence; ``"sklearn-lbfgs"`` is scikit-learn's lbfgs one C at a time, optionally warm
started along the grid (``--compat paper``: 100 iterations, weak to strong, as the authors ran
it; their non-converged fits are counted and reported here instead of silenced).
"""
from __future__ import annotations

import logging
import time
import warnings as pywarnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from medxfer.data.splits import identity_keys
from medxfer.errors import UsageError
from medxfer.features import FeatureSet
from medxfer.progress import progress_enabled
from medxfer.protocols.base import EvalResult, Headline, LabelView, Needs, Params, Protocol, register_protocol
from medxfer.protocols.logreg import fit_path
from medxfer.protocols.metrics import HEADLINE_METRICS, classification_metrics, test_report
from medxfer.protocols.splits import many_shot_splits
from medxfer.registry import Registry
from medxfer.typed import fraction, positive, setting

if TYPE_CHECKING:
    from medxfer.cell import Context

log = logging.getLogger(__name__)

VERSION = "2"  # 2: exact line search on kept logits, bf16 products verified exactly


def lambda_grid(lo: float = -6.0, hi: float = 5.0, size: int = 45) -> np.ndarray:
    """The paper's regularisation grid, ascending lambda (descending C)."""
    return np.logspace(lo, hi, size)


@dataclass
class GridFit:
    """What a solver returns: per-grid-point probabilities on validation + fit diagnostics,
    and a ``refit(index)`` that fits train+val with that grid point and gives test probabilities."""

    val_proba: np.ndarray  # M x Nval x K
    n_iter: list[int]
    converged: list[bool]
    refit: Callable[[int], tuple[np.ndarray, int, bool]]  # -> (test proba, iterations, converged)
    info: dict[str, Any]


Solver = Callable[..., GridFit]
SOLVERS: Registry[Solver] = Registry("linear-probe solver")


def _medxfer_solver(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, x_all: np.ndarray, y_all: np.ndarray,
                    x_test: np.ndarray, lambdas: np.ndarray, k: int, params: LinearParams, device: str) -> GridFit:
    dtype = {"float32": torch.float32, "float64": torch.float64}[params.dtype]
    opts = dict(num_classes=k, tol=params.tol, max_iter=params.max_iter, history=params.history,
                device=device, dtype=dtype, matmul=params.matmul, progress=progress_enabled())
    path = fit_path(x_fit, y_fit, lambdas, **opts)
    val_proba = path.predict_proba(x_val)

    def refit(i: int) -> tuple[np.ndarray, int, bool]:
        # reuse the path's rotation (exact; saves the eigendecomposition) when it is a full basis
        # and start from the path's solution for that C (the data differ only by the val rows)
        one = fit_path(x_all, y_all, lambdas[i : i + 1], basis=path.basis,
                       init=(path.coef[i : i + 1], path.intercept[i : i + 1]), **opts)
        return one.predict_proba(x_test)[0], int(one.n_iter[0]), bool(one.converged[0])

    info = {"device": path.device, "dtype": params.dtype, "matmul": path.matmul,
            "rel_grad": path.rel_grad.tolist(), "dist_bound": path.dist_bound.tolist(),
            "grad_max": path.grad_max.tolist(),
            "stopping": "relative gradient certificate rel <= tol after at least one checked step "
                        "(exact products; see medxfer.protocols.logreg), or max_iter"}
    return GridFit(val_proba, path.n_iter.tolist(), path.converged.tolist(), refit, info)


def _sklearn_solver(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, x_all: np.ndarray, y_all: np.ndarray,
                    x_test: np.ndarray, lambdas: np.ndarray, k: int, params: LinearParams, device: str) -> GridFit:
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:  # a test/compat-only dependency
        raise UsageError("solver 'sklearn-lbfgs' (used by --compat paper) needs scikit-learn: "
                         "pip install 'medxfer[test]' or pip install scikit-learn") from exc
    order_name = params.warm_start_order
    orders = {"weak_to_strong": np.arange(len(lambdas)), "strong_to_weak": np.arange(len(lambdas))[::-1],
              "none": np.arange(len(lambdas))}
    warm = order_name != "none"
    clf = LogisticRegression(solver="lbfgs", max_iter=params.max_iter, tol=params.tol, warm_start=warm)
    val_proba = np.zeros((len(lambdas), len(x_val), k))
    n_iter = [0] * len(lambdas)
    converged = [True] * len(lambdas)
    n_warn = 0

    # a 2-class softmax with ||W||^2 / (2CN) is the binomial model at 2C: what the authors'
    # scikit-learn fitted for binary tasks (installed versions fit a binomial model at C)
    c_scale = 2.0 if params.binary_as_multinomial and k == 2 else 1.0

    def fit(c: float, x: np.ndarray, y: np.ndarray) -> tuple[int, bool]:
        nonlocal n_warn
        clf.C = float(c) * c_scale
        with pywarnings.catch_warnings(record=True) as caught:
            pywarnings.simplefilter("always", ConvergenceWarning)
            clf.fit(x, y)
        conv = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        n_warn += int(not conv)
        return int(np.max(clf.n_iter_)), conv

    def full_proba(x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), k))
        out[:, clf.classes_.astype(int)] = clf.predict_proba(x)
        return out

    for i in orders[order_name]:
        n_iter[i], converged[i] = fit(1.0 / lambdas[i], x_fit, y_fit)
        val_proba[i] = full_proba(x_val)

    def refit(i: int) -> tuple[np.ndarray, int, bool]:
        # with warm starts this continues from the last fit of the sweep, as the authors' code did
        it, conv = fit(1.0 / lambdas[i], x_all, y_all)
        return full_proba(x_test), it, conv

    import sklearn

    info = {"sklearn_version": sklearn.__version__, "warm_start_order": order_name,
            "stopping": "scikit-learn lbfgs (gtol=tol, ftol=64*eps) or max_iter",
            "note": "scikit-learn fits binary problems as binomial (one weight vector)"
                    + ("; fitted at 2C, which equals the two-class multinomial model at C" if c_scale == 2.0 else "")}
    return GridFit(val_proba, n_iter, converged, refit, info)


SOLVERS.register("medxfer", _medxfer_solver, aliases=("torch-lbfgs",))
SOLVERS.register("sklearn-lbfgs", _sklearn_solver, aliases=("sklearn",))


def _select(curve: list[float], rule: str) -> int:
    """Index of the best validation score; ties go to the first (``"first"``, weakest lambda,
    as in the authors' sweep) or to the strongest regularisation (``"strongest"``)."""
    best = max(curve)
    ties = [i for i, v in enumerate(curve) if v == best]
    return {"first": ties[0], "strongest": ties[-1]}[rule]


def evaluate_linear(features: FeatureSet, p: LinearParams, seed: int, device: str = "cpu") -> EvalResult:
    """Linear-probe ``features`` (train/val/test splits) and score the chosen C on test; the
    solver runs on ``p.device`` when set, else on ``device`` (the run's)."""
    what = f"feature set {features.model}/{features.dataset}"
    x = np.asarray(features.features, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise UsageError(f"{what}: NaN/inf features in rows {bad[:10].tolist()} (e.g. {features.records[bad[0]].path})")
    y = np.asarray(features.labels, dtype=np.int64)
    k = max(len(features.class_names), int(y.max()) + 1)
    val_seed = seed if p.val_seed is None else int(p.val_seed)
    sp = many_shot_splits(features.splits, y, val_fraction=p.val_fraction, val_seed=val_seed,
                          stratified=p.val_stratified, what=what, keys=identity_keys([r.path for r in features.records]),
                          generator=p.val_generator)
    headline = features.headline_metric
    select_metric = p.select_metric or headline
    lambdas = lambda_grid(p.grid_min, p.grid_max, p.grid_size)
    all_idx = np.concatenate([sp.train, sp.val])

    t0 = time.perf_counter()
    solver = SOLVERS.get(p.solver)
    fit = solver(x[sp.train], y[sp.train], x[sp.val], x[all_idx], y[all_idx], x[sp.test], lambdas, k, p,
                 p.device or device)
    t_path = time.perf_counter() - t0
    val_scores = [classification_metrics(y[sp.val], fit.val_proba[i], select_metric)[0]["headline"]
                  for i in range(len(lambdas))]
    val_acc = [float(100.0 * np.mean(fit.val_proba[i].argmax(1) == y[sp.val])) for i in range(len(lambdas))]
    best = _select(val_scores, p.tie_break)
    t1 = time.perf_counter()
    test_proba, refit_iter, refit_conv = fit.refit(best)
    t_refit = time.perf_counter() - t1
    groups = [features.records[i].patient for i in sp.test]
    metrics, half, boot, warns = test_report(y[sp.test], test_proba, headline, groups=groups, n_boot=p.bootstrap,
                                             seed=seed)
    grid_c = (1.0 / lambdas).tolist()
    metrics["C"] = float(grid_c[best])
    at_edge = best in (0, len(lambdas) - 1)
    if at_edge:
        warns.append(f"C chosen at the {'weak' if best == 0 else 'strong'}-regularisation edge of the grid "
                     f"(C={grid_c[best]:.6g}): the best value may lie outside it")
    non_conv = [grid_c[i] for i, c in enumerate(fit.converged) if not c]
    if non_conv:
        warns.append(f"{len(non_conv)} of {len(lambdas)} path fits did not converge (tol={p.tol}, "
                     f"max_iter={p.max_iter}); C values listed in details.non_converged")
    if not refit_conv:
        warns.append(f"the final refit (C={grid_c[best]:.6g}) did not converge")
    for w in warns:
        log.warning("linear %s: %s", what, w)
    details = {
        "headline_metric": headline,
        "select_metric": select_metric,
        "grid_lambda": lambdas.tolist(),
        "grid_C": grid_c,
        "val_curve": [float(v) for v in val_scores],
        "val_accuracy_curve": val_acc,
        "iterations": [int(i) for i in fit.n_iter],
        "converged": [bool(c) for c in fit.converged],
        "non_converged": non_conv,
        "chosen_index": int(best),
        "c_at_grid_edge": bool(at_edge),
        "bootstrap": boot,
        "chosen_lambda": float(lambdas[best]),
        "refit_iterations": int(refit_iter),
        "refit_converged": bool(refit_conv),
        "tolerance": float(p.tol),
        "solver": p.solver,
        "solver_info": fit.info,
        "splits": sp.as_dict(),
        "val_seed": val_seed,
        "val_stratified": bool(p.val_stratified) if sp.val_source == "carved" else None,
        "timing_s": {"path": t_path, "refit": t_refit},
    }
    return EvalResult(protocol="linear", metrics=metrics, params=p.to_dict(), details=details, warnings=warns,
                      headline=Headline(headline, float(metrics["headline"]), half, True))


@dataclass(frozen=True)
class LinearParams(Params):
    """Linear-probe settings (lambda = logspace(grid_min, grid_max, grid_size), C = 1 / lambda)."""

    grid_min: float = setting(-6.0, help="log10 of the smallest lambda")
    grid_max: float = setting(5.0, help="log10 of the largest lambda")
    grid_size: int = setting(45, check=positive, help="number of grid values")
    val_fraction: float = setting(0.2, check=fraction, help="carved from train when the dataset has no val split")
    val_seed: int | None = setting(None, help="seed of the validation carve (None: the run seed)")
    val_stratified: bool = setting(True, help="carve validation stratified by class")
    val_generator: Literal["default", "legacy"] = setting(
        "default", help="default: seeded by record identity; legacy: the authors' RandomState permutation of rows")
    select_metric: str | None = setting(None, help="metric choosing C (None: the dataset's headline metric)")
    tie_break: Literal["first", "strongest"] = setting("first", help="equal validation scores: weakest or "
                                                       "strongest regularisation")
    solver: str = setting("medxfer", help="medxfer (batched L-BFGS path) or sklearn-lbfgs")
    tol: float = setting(1e-4, check=positive, help="stopping tolerance")
    max_iter: int = setting(1000, check=positive, help="iterations per fit")
    history: int = setting(10, check=positive, help="L-BFGS memory")
    warm_start_order: Literal["none", "weak_to_strong", "strong_to_weak"] = setting(
        "none", help="sklearn-lbfgs only: warm starts along the grid")
    binary_as_multinomial: bool = setting(False, help="sklearn-lbfgs only: fit binary tasks as a two-class "
                                          "multinomial model (the authors' scikit-learn), i.e. binomial at 2C")
    dtype: Literal["float32", "float64"] = setting("float32", help="medxfer solver precision")
    matmul: Literal["auto", "bf16", "exact"] = setting("auto", help="medxfer solver: bf16 products (verified "
                                                       "exactly) where fast, or exact float32")
    bootstrap: int = setting(1000, help="bootstrap replicates of the test set for the headline's 95% interval "
                             "(patients resampled where known; 0: none)")
    device: str | None = setting(None, execution=True, help="solver device (None: the run's device)")

    def __post_init__(self) -> None:
        SOLVERS.canonical(self.solver)  # an unknown solver is an error now, not after the extraction
        if self.select_metric is not None and self.select_metric not in HEADLINE_METRICS:
            raise ValueError(f"select_metric={self.select_metric!r} is not one of {', '.join(HEADLINE_METRICS)}")


PAPER = {"solver": "sklearn-lbfgs", "max_iter": 100, "warm_start_order": "weak_to_strong", "binary_as_multinomial": True,
         "val_seed": 0, "val_stratified": False, "val_generator": "legacy"}


def _run(ctx: Context, p: LinearParams, seed: int) -> EvalResult:
    return evaluate_linear(ctx.features(), p, seed, device=ctx.device)


def _check(view: LabelView, p: LinearParams, seed: int) -> None:
    val_seed = seed if p.val_seed is None else int(p.val_seed)
    many_shot_splits(view.splits, view.labels, val_fraction=p.val_fraction, val_seed=val_seed,
                     stratified=p.val_stratified, what=f"dataset {view.name!r}")


register_protocol(Protocol(
    name="linear", version=VERSION, params=LinearParams, run=_run, check=_check,
    needs=Needs(features=("pooled",), accelerator="cpu"),
    description="multinomial L2 logistic regression on frozen features, C chosen on validation "
                "from 45 values, refit on train+val, scored on test",
    compat={"paper": PAPER},
))
