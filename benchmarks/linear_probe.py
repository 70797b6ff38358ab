"""Linear-probe speed: medxfer's 45-value path vs scikit-learn's best practice, at equal certified accuracy.

Problem (default = the issue's size): 20,000 train+val rows (16,000 fit + 4,000 validation)
and 5,000 test rows of 2,048 non-negative features (post-ReLU, like pooled CNN features),
5 classes. Features = ReLU(scale * (nuisance factors + class signal + noise + offset)); the
classes overlap, so the validation curve has an interior optimum.

Baseline: ``LogisticRegression(solver="lbfgs", max_iter=10000, warm_start=True)`` swept from
strong to weak regularisation (each fit continues from the previous one), C chosen on
validation accuracy, refit on train+val warm-started from that C's path solution. Ours:
``medxfer.evaluate("linear", features)`` (whole path at once, torch, GPU when present; bf16
products where they are fast, every fit finished and certified with float32 products).

Equal certified accuracy: both solvers must meet the same certificate at every C, relative
stationarity ``rel <= --tol`` (the protocol's, 1e-4), recomputed independently here (float64
numpy, ``_common.LogregCertificate``). scikit-learn's own test is an absolute max |gradient|,
which cannot express it: at its default (1e-4) its warm-started weak fits stop 8 validation
points from their optimum, and no single tol certifies every problem (1e-6 left 29 of 45
fits above 1e-4 on a 2,400 x 256 problem). So each scikit-learn fit starts at
``--sklearn-tol`` (its default 1e-4) and, while its certificate exceeds ``--tol``, continues
at a 10x smaller tol: the cheapest way to certify it with scikit-learn's own controls. Where
that stops improving (lbfgs' relative-decrease floor, 64 eps max(|f|, 1), which no tol
moves) the fit is left less accurate than ours, which only flatters the baseline. Only
scikit-learn's calls are timed, not these checks (generous to the baseline). Both solvers'
certificates are printed for every C.

Timing on a shared machine: the solvers run interleaved (sklearn, medxfer, sklearn, ...,
``--rounds`` each); each one's best and median are printed and ``ratio=`` is
median(sklearn) / median(medxfer), wall clock. The exit status is 1 when the answers disagree
(chosen C different with an unequal validation score, test accuracy more than 0.2 points
apart, an answer that changes between rounds, or validation curves more than 0.5 points apart
at some C where medxfer is also more than 0.5 points from a float64 fit certified to 1e-9: at
weak penalties scikit-learn's warm-started lbfgs can stop at its relative-decrease floor away
from the optimum, and then it is the baseline that is off), never because the machine was busy: the speed target is judged from the
``target=``/``ratio=`` lines.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LogregCertificate, load_average, machine

TEST_GAP = 0.2  # test accuracy points the two answers may differ by (5,000 test rows: 10 rows)
CURVE_GAP = 0.5  # validation accuracy points, at every C


def make_problem(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic pooled-feature-like data: low-rank nuisance + class signal + noise, ReLU."""
    rng = np.random.default_rng(seed)
    n_nuis, n_sig = 32, 16
    a = rng.standard_normal((n_nuis, d)).astype(np.float32) * (3.0 / np.sqrt(n_nuis))
    b = rng.standard_normal((n_sig, d)).astype(np.float32) / np.sqrt(n_sig)
    means = rng.standard_normal((k, n_sig)).astype(np.float32) * 0.5
    y = rng.integers(0, k, n)
    x = rng.standard_normal((n, n_nuis)).astype(np.float32) @ a
    x += (rng.standard_normal((n, n_sig)).astype(np.float32) + means[y]) @ b
    x += rng.standard_normal((n, d)).astype(np.float32) + 0.5
    x *= 0.05
    np.maximum(x, 0.0, out=x)
    return x.astype(np.float32, copy=False), y  # cached features are float32


@dataclass
class Answer:
    """One solver's result: chosen grid index, validation curve, test accuracy, iterations."""

    best: int
    curve: np.ndarray
    test_acc: float
    iters: np.ndarray
    non_converged: int
    wall: float
    cpu: float


class SklearnCertified:
    """scikit-learn's lbfgs, made to meet the certificate: each fit runs at ``tol0`` (max
    |gradient|, scikit-learn's own test), and while its certificate exceeds ``rel_target`` the
    tol is divided by 10 and the fit continues from where it stopped (warm start), until the
    certificate holds or stops improving (lbfgs also stops when f falls by less than
    64 eps max(|f|, 1), a floor no tol moves). Only the scikit-learn calls are timed (the
    certificate checks are not: a generous baseline)."""

    def __init__(self, tol0: float, rel_target: float) -> None:
        from sklearn.linear_model import LogisticRegression

        self.clf = LogisticRegression(solver="lbfgs", tol=tol0, max_iter=10000, warm_start=True)
        self.tol0, self.rel_target = tol0, rel_target
        self.wall = self.cpu = 0.0
        self.iters = self.non_conv = 0

    def _timed(self, fn):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        return out

    def fit(self, x: np.ndarray, y: np.ndarray, lam: float, cert: LogregCertificate) -> tuple[float, float]:
        """Fit at C = 1 / lam (continuing from the current solution); ``(final tol, rel)``."""
        from sklearn.exceptions import ConvergenceWarning

        self.clf.C, tol, rel = 1.0 / lam, self.tol0, float("inf")
        while True:
            self.clf.tol = tol
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                self._timed(lambda: self.clf.fit(x, y))
            self.non_conv += any(issubclass(w.category, ConvergenceWarning) for w in caught)
            self.iters += int(np.max(self.clf.n_iter_))
            rel, last = float(cert(self.clf.coef_.T[None], self.clf.intercept_[None], np.array([lam]))[0]), rel
            if rel <= self.rel_target or rel > 0.9 * last or tol <= 1e-12:
                return tol, rel
            tol /= 10.0

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._timed(lambda: self.clf.predict(x))


def sklearn_best_practice(x_fit, y_fit, x_val, y_val, x_all, y_all, x_test, y_test, lambdas, k, tol0, rel_target
                          ) -> tuple[Answer, np.ndarray, np.ndarray, np.ndarray]:
    """The baseline, swept strong -> weak with warm starts and certified at every C; also returns
    its 45 path solutions (M x D x K, M x K) and the tol each needed."""
    sk = SklearnCertified(tol0, rel_target)
    cert_fit, cert_all = LogregCertificate(x_fit, y_fit, k), LogregCertificate(x_all, y_all, k)
    curve = np.zeros(len(lambdas))
    coefs, intercepts = [None] * len(lambdas), [None] * len(lambdas)
    tols = np.zeros(len(lambdas))
    iters = np.zeros(len(lambdas), dtype=int)
    for i in range(len(lambdas) - 1, -1, -1):  # strong -> weak
        before = sk.iters
        tols[i], _ = sk.fit(x_fit, y_fit, lambdas[i], cert_fit)
        iters[i] = sk.iters - before
        curve[i] = 100.0 * np.mean(sk.predict(x_val) == y_val)
        coefs[i], intercepts[i] = sk.clf.coef_.copy(), sk.clf.intercept_.copy()
    best = int(np.flatnonzero(curve == curve.max())[0])  # same tie rule as medxfer: weakest lambda
    sk.clf.coef_, sk.clf.intercept_ = coefs[best].copy(), intercepts[best].copy()
    sk.fit(x_all, y_all, lambdas[best], cert_all)  # refit on train+val from that C's path solution
    acc = 100.0 * float(np.mean(sk.predict(x_test) == y_test))
    answer = Answer(best, curve, acc, iters, sk.non_conv, sk.wall, sk.cpu)
    return answer, np.stack(coefs).transpose(0, 2, 1), np.stack(intercepts), tols


def medxfer_protocol(fs, seed: int, tol: float, device: str, matmul: str) -> Answer:
    import medxfer

    c0, t0 = time.process_time(), time.perf_counter()
    res = medxfer.evaluate("linear", fs, seed=seed, tol=tol, device=device, matmul=matmul)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    d = res.details
    return Answer(d["chosen_index"], np.array(d["val_accuracy_curve"]), res.metrics["accuracy"],
                  np.array(d["iterations"]), len(d["non_converged"]), wall, cpu)


def summary(name: str, runs: list[Answer], lambdas: np.ndarray) -> str:
    walls, cpus = [r.wall for r in runs], [r.cpu for r in runs]
    a = runs[0]
    return (f"{name}: best {min(walls):.2f} s, median {statistics.median(walls):.2f} s over {len(runs)} runs "
            f"(CPU s best {min(cpus):.2f}, median {statistics.median(cpus):.2f}); C={1 / lambdas[a.best]:.6g} "
            f"(index {a.best}), test accuracy {a.test_acc:.2f}%, iterations max {a.iters.max()} / total "
            f"{a.iters.sum()}, non-converged {a.non_converged}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="train+val rows (80/20); default the issue's 20,000")
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4, help="medxfer's certificate tolerance (the protocol's)")
    ap.add_argument("--sklearn-tol", type=float, default=1e-4,
                    help="scikit-learn's starting max |gradient| tolerance (its default), divided by 10 "
                         "until each fit meets the certificate")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs of each solver")
    ap.add_argument("--device", default=None, help="torch device for medxfer (default: cuda if available)")
    ap.add_argument("--matmul", default="auto", choices=["auto", "bf16", "exact"],
                    help="medxfer's products: bf16 where fast (auto), forced bf16, or exact float32")
    args = ap.parse_args(argv)

    from medxfer.features import FeatureSet
    from medxfer.protocols.linear import lambda_grid
    from medxfer.protocols.logreg import fit_path

    n_fit = round(0.8 * args.n)
    x, y = make_problem(args.n + args.n_test, args.dim, args.classes, args.seed)
    splits = np.array(["train"] * n_fit + ["val"] * (args.n - n_fit) + ["test"] * args.n_test, dtype=object)
    fs = FeatureSet.from_arrays(x, y, splits, model="synthetic", dataset="benchmark")
    fit, val, test = (np.flatnonzero(splits == s) for s in ("train", "val", "test"))
    all_idx = np.concatenate([fit, val])
    lambdas = lambda_grid()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"problem: {args.n} train+val ({n_fit} fit / {args.n - n_fit} val) + {args.n_test} test, "
          f"{args.dim} features, {args.classes} classes, 45 C values; medxfer tol={args.tol} (certificate), "
          f"sklearn tol={args.sklearn_tol} (max |gradient|)")
    print(machine() + f", medxfer device={device}")
    print(load_average())

    ours: list[Answer] = []
    theirs: list[Answer] = []
    sk_coef = sk_icpt = sk_tols = None
    for r in range(args.rounds):  # interleaved: A B A B ...
        ans, coef, icpt, tols = sklearn_best_practice(x[fit], y[fit], x[val], y[val], x[all_idx], y[all_idx],
                                                      x[test], y[test], lambdas, args.classes, args.sklearn_tol,
                                                      args.tol)
        theirs.append(ans)
        if sk_coef is None:
            sk_coef, sk_icpt, sk_tols = coef, icpt, tols
        ours.append(medxfer_protocol(fs, args.seed, args.tol, device, args.matmul))
        print(f"round {r + 1}/{args.rounds}: sklearn {theirs[-1].wall:.2f} s (CPU {theirs[-1].cpu:.2f} s), "
              f"medxfer {ours[-1].wall:.2f} s (CPU {ours[-1].cpu:.2f} s); {load_average()}", flush=True)
    print(summary("sklearn", theirs, lambdas))
    print(summary("medxfer", ours, lambdas))

    # certification (untimed): medxfer's path as the protocol computes it, and sklearn's sweep
    path = fit_path(x[fit], y[fit], lambdas, num_classes=args.classes, tol=args.tol, device=device,
                    matmul=args.matmul)
    cert = LogregCertificate(x[fit], y[fit], args.classes)
    rel_ours, rel_skl = cert(path.coef, path.intercept, lambdas), cert(sk_coef, sk_icpt, lambdas)
    path_curve = 100.0 * (path.predict_proba(x[val]).argmax(2) == y[val]).mean(1)
    same_path = bool(np.array_equal(path_curve, ours[0].curve))
    above = {"medxfer": int((rel_ours > args.tol).sum()), "sklearn": int((rel_skl > args.tol).sum())}
    print(f"certificate rel (relative stationarity, recomputed in float64) <= {args.tol}: "
          f"medxfer max {rel_ours.max():.2e} ({above['medxfer']} of 45 above), "
          f"sklearn max {rel_skl.max():.2e} ({above['sklearn']} of 45 above, at lbfgs' floor); medxfer's "
          f"reported rel max {path.rel_grad.max():.2e}; certified path = the protocol's path: {same_path}")
    print("sklearn tol needed per C (lambda ascending): " + " ".join(f"{v:.0e}" for v in sk_tols))
    print("rel per C (lambda ascending), medxfer: " + " ".join(f"{v:.0e}" for v in rel_ours))
    print("rel per C (lambda ascending), sklearn: " + " ".join(f"{v:.0e}" for v in rel_skl))
    a, b = ours[0], theirs[0]
    print("val accuracy curve (lambda ascending), medxfer: " + " ".join(f"{v:.2f}" for v in a.curve))
    print("val accuracy curve (lambda ascending), sklearn: " + " ".join(f"{v:.2f}" for v in b.curve))

    same_c = a.best == b.best or b.curve[a.best] == b.curve[b.best] or a.curve[a.best] == a.curve[b.best]
    acc_gap = abs(a.test_acc - b.test_acc)
    curve_gap = float(np.abs(a.curve - b.curve).max())
    # where the curves differ by more than CURVE_GAP, a tight fit decides which solver is off:
    # float64, certificate 1e-9 (five orders below the protocol's), from zero, untimed
    disputed = np.flatnonzero(np.abs(a.curve - b.curve) > CURVE_GAP)
    ours_off = 0.0
    if disputed.size:
        tight = fit_path(x[fit], y[fit], lambdas[disputed], num_classes=args.classes, tol=1e-9, device=device,
                         dtype=torch.float64, max_iter=20000, wave_stride=1)
        tight_curve = 100.0 * (tight.predict_proba(x[val]).argmax(2) == y[val]).mean(1)
        ours_off = float(np.abs(a.curve[disputed] - tight_curve).max())
        theirs_off = float(np.abs(b.curve[disputed] - tight_curve).max())
        print(f"curves differ by more than {CURVE_GAP} at {disputed.size} C value(s); a float64 fit certified to "
              f"rel <= 1e-9 there (max rel {tight.rel_grad.max():.1e}, converged {int(tight.converged.sum())} of "
              f"{disputed.size}): medxfer off by at most {ours_off:.2f}, sklearn by {theirs_off:.2f} points")
        print("tight val accuracy at those C (lambda ascending): " + " ".join(f"{v:.2f}" for v in tight_curve))
    stable = all(o.best == a.best and o.test_acc == a.test_acc for o in ours) and \
        all(t.best == b.best and t.test_acc == b.test_acc for t in theirs)
    ratio = statistics.median(t.wall for t in theirs) / statistics.median(o.wall for o in ours)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    print(f"check chosen C: {verdict(same_c)} (grid indices {a.best} vs {b.best})")
    print(f"check test accuracy gap {acc_gap:.2f} points <= {TEST_GAP}: {verdict(acc_gap <= TEST_GAP)}")
    curves_ok = ours_off <= CURVE_GAP
    print(f"check validation curves within {CURVE_GAP} points at every C, or medxfer within {CURVE_GAP} of the "
          f"tight fit where they differ: {verdict(curves_ok)} (max curve gap {curve_gap:.2f}, medxfer vs tight "
          f"{ours_off:.2f})")
    print(f"check same answers in every round: {verdict(stable)}")
    print(f"check medxfer's 45 fits certified (rel <= {args.tol}): {verdict(above['medxfer'] == 0)}")
    print(f"check sklearn's 45 fits certified: {verdict(above['sklearn'] == 0)}"
          + ("" if above["sklearn"] == 0 else f" ({above['sklearn']} stopped at lbfgs' floor, less accurate "
                                              "than medxfer's: their time flatters the baseline)"))
    print(f"check speed-up >= 5 (median sklearn / median medxfer, wall clock): {verdict(ratio >= 5.0)}")
    print(load_average())
    print("target=5.0")
    print(f"ratio={ratio:.2f}")
    # the speed target is judged from the target/ratio lines (make bench reports it); a wrong
    # answer (different C, accuracy or curve, or one that changes between rounds) fails the script
    return 0 if same_c and acc_gap <= TEST_GAP and curves_ok and stable else 1


if __name__ == "__main__":
    sys.exit(main())
