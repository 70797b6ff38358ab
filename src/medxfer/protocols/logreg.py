"""Multinomial L2 logistic regression for a whole regularisation path at once (torch, CPU/GPU).

Objective of one model (scikit-learn's meaning of ``C``, ``lam = 1 / C``)::

    f(W, b) = mean_i CE(softmax(x_i W + b), y_i) + lam / (2 N) * ||W||_F^2      (b unpenalised)

How it is fast:

* **Exact reparametrisation.** Features are centred (the intercept absorbs the mean) and
  rotated onto the eigenvectors of their covariance; with N < D the null space is dropped
  (the optimum puts no weight there, since only the penalty acts on it), shrinking the
  problem to N x N. A later fit on similar data (the refit on train + validation) may reuse
  a full rotation: the problem stays exact, only the preconditioner is slightly less tuned.
* **Preconditioning.** In that basis Böhning's bound on the softmax Hessian,
  ``1/2 (I - 11'/K) (x) Cov + lam/N I``, is diagonal, so every model is optimised in
  variables scaled by ``(s_j / 2 + lam / N) ** -1/2``: strongly regularised fits converge in a
  few steps, weakly regularised ones in tens instead of thousands.
* **Many models in one pass.** Every L-BFGS iteration evaluates all still-active models with
  one ``N x r`` by ``r x (M K)`` product and its transpose; converged models leave the batch.
* **Warm starts.** The path runs in waves: every 5th value of the grid from zero, then the
  values in between, each started from its solved, more strongly regularised neighbour.

Convergence: a model is converged when the largest absolute gradient entry of ``f`` with
respect to the original coefficients and intercepts is ``<= tol`` (scikit-learn's lbfgs
``gtol`` statistic). Non-converged fits are reported, never hidden.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class PathFit:
    """One fitted model per ``lambdas`` entry, in the original feature space.

    ``coef`` M x D x K, ``intercept`` M x K (float64 numpy), ``n_iter``/``converged``/
    ``grad_max`` per model (``grad_max`` = the final convergence statistic).
    """

    lambdas: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    grad_max: np.ndarray
    tol: float
    device: str
    basis: torch.Tensor | None = None  # the full orthonormal rotation used (None when reduced, N < D)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """M x N x K logits of every model on ``x`` (N x D)."""
        xd = np.asarray(x, dtype=np.float64)
        return np.einsum("nd,mdk->mnk", xd, self.coef) + self.intercept[:, None, :]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """M x N x K softmax probabilities."""
        z = self.logits(x)
        z -= z.max(axis=2, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=2, keepdims=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Problem:
    """The rotated, centred data and the batched objective for a set of models."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int, lambdas: torch.Tensor,
                 rank_rtol: float, basis: torch.Tensor | None = None) -> None:
        n, d = x.shape
        self.n, self.d, self.k = n, d, k
        self.mu = x.mean(0)
        xc = x - self.mu
        if basis is not None:  # a full orthonormal basis from an earlier fit (exact for any data)
            v = basis
        elif n < d:  # eigenvectors through the small N x N Gram matrix; drop the null space
            evals, u = torch.linalg.eigh(xc @ xc.T)
            keep = evals > rank_rtol * evals.max().clamp_min(torch.finfo(x.dtype).tiny)
            v = (xc.T @ u[:, keep]) / evals[keep].sqrt()  # D x r, orthonormal columns
        else:  # eigenvectors of the scatter matrix, every direction kept: no approximation
            v = torch.linalg.eigh(xc.T @ xc)[1]
        self.v = v.to(x.dtype)  # D x r
        self.z = xc @ self.v  # N x r
        self.s = (self.z * self.z).mean(0)  # variances along the basis vectors
        self.r = self.z.shape[1]
        self.y = y
        self.onehot = torch.nn.functional.one_hot(y, k).to(x.dtype)
        self.lam_n = (lambdas / n).to(x.dtype)  # penalty per model, M
        # preconditioner: scale of each variable, M x (r + 1) x 1 (last row = intercept)
        scale_w = (0.5 * self.s[None, :] + self.lam_n[:, None]).rsqrt()
        scale_b = torch.full((len(lambdas), 1), 2.0 ** 0.5, dtype=x.dtype, device=x.device)
        self.scale = torch.cat([scale_w, scale_b], dim=1).unsqueeze(-1)

    def value_grad(self, u: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Objective (float64, a), gradient in scaled variables and in W space (a x (r+1) x K)."""
        a = u.shape[0]
        w = u * self.scale[idx]  # a x (r+1) x K
        wz = w[:, : self.r, :]
        b = w[:, self.r, :]
        logits = (self.z @ wz.permute(1, 0, 2).reshape(self.r, a * self.k)).view(self.n, a, self.k) + b
        logp = torch.log_softmax(logits, dim=2)
        nll = -(logp * self.onehot[:, None, :]).sum(2).double().sum(0) / self.n  # a
        lam = self.lam_n[idx]
        pen = 0.5 * lam.double() * (wz.double() ** 2).sum((1, 2))
        gl = (logp.exp() - self.onehot[:, None, :]) / self.n  # N x a x K
        gwz = (self.z.T @ gl.reshape(self.n, a * self.k)).view(self.r, a, self.k).permute(1, 0, 2)
        gwz = gwz + lam[:, None, None] * wz
        gb = gl.sum(0)  # a x K
        gw = torch.cat([gwz, gb[:, None, :]], dim=1)
        return nll + pen, gw * self.scale[idx], gw

    def grad_max_original(self, gw: torch.Tensor) -> torch.Tensor:
        """max |gradient| w.r.t. the original (uncentred, unrotated) coefficients and intercepts."""
        gwz, gb = gw[:, : self.r, :], gw[:, self.r, :]
        g_orig = torch.einsum("dr,ark->adk", self.v, gwz) + self.mu[None, :, None] * gb[:, None, :]
        return torch.maximum(g_orig.abs().amax((1, 2)), gb.abs().amax(1))

    def from_original(self, coef: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
        """Scaled variables (M x (r+1) x K) of models given in the original space."""
        wz = torch.einsum("dr,mdk->mrk", self.v, coef)
        b = intercept + torch.einsum("d,mdk->mk", self.mu, coef)
        return torch.cat([wz, b[:, None, :]], dim=1) / self.scale

    def to_original(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = u * self.scale
        wz, b = w[:, : self.r, :], w[:, self.r, :]
        coef = torch.einsum("dr,mrk->mdk", self.v.double(), wz.double())
        intercept = b.double() - torch.einsum("d,mdk->mk", self.mu.double(), coef)
        return coef, intercept


def _waves(lambdas: np.ndarray, stride: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Order of work along the path: ``(models, warm-start sources)`` per wave.

    Models sorted from strong to weak regularisation; wave 0 takes every ``stride``-th one
    (strongest first) from zero, wave j the next ones, each warm-started from its stronger
    neighbour solved in wave j - 1. ``stride=1``: all models at once from zero.
    """
    order = np.argsort(-lambdas, kind="stable")
    stride = max(1, min(int(stride), len(order)))
    out: list[tuple[np.ndarray, np.ndarray | None]] = [(order[0::stride], None)]
    for j in range(1, stride):
        pos = np.arange(j, len(order), stride)
        if pos.size:
            out.append((order[pos], order[pos - 1]))
    return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-model inner products, accumulated in float64."""
    return (a * b).sum((1, 2), dtype=torch.float64)


def fit_path(
    x: np.ndarray,
    y: np.ndarray,
    lambdas: np.ndarray,
    *,
    num_classes: int | None = None,
    tol: float = 1e-4,
    max_iter: int = 1000,
    history: int = 10,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    rank_rtol: float = 1e-6,
    stall_patience: int = 10,
    basis: np.ndarray | torch.Tensor | None = None,
    wave_stride: int = 5,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = False,
) -> PathFit:
    """Fit one multinomial L2 logistic regression per ``lambdas`` entry (``C = 1 / lambda``).

    Batched preconditioned L-BFGS with Armijo backtracking. The path is solved in
    ``wave_stride`` waves: every ``wave_stride``-th model (strongest first) from zero, then the
    models in between, each warm-started from its solved stronger neighbour; ``init``
    (coefficients M x D x K, intercepts M x K) starts every model from given values instead
    (e.g. the refit on train + validation from the path's solution). Every model
    runs until its gradient statistic is ``<= tol`` or ``max_iter`` iterations; line-search
    failures, or ``stall_patience`` steps in a row that lower the objective by less than a
    relative 1e-10 (1e-15 in float64: the floating point precision is exhausted), end that model's fit; it is reported as converged only if
    its gradient meets ``tol``.
    """
    dev = torch.device(device) if device is not None else default_device()
    yv = np.asarray(y, dtype=np.int64)
    k = int(num_classes if num_classes is not None else yv.max() + 1)
    if k < 2:
        raise ValueError("logistic regression needs at least two classes")
    xt = torch.as_tensor(np.asarray(x), dtype=dtype, device=dev)
    if not torch.isfinite(xt).all():
        raise ValueError("features contain NaN or infinite values")
    yt = torch.as_tensor(yv, device=dev)
    lam = torch.as_tensor(np.asarray(lambdas, dtype=np.float64), device=dev)
    m = lam.numel()
    if basis is not None:
        basis = torch.as_tensor(basis, dtype=dtype, device=dev)
        if basis.shape != (xt.shape[1], xt.shape[1]):
            raise ValueError(f"basis must be a full D x D orthonormal matrix, got {tuple(basis.shape)}")
    prob = _Problem(xt, yt, k, lam, rank_rtol, basis)

    shape = (m, prob.r + 1, k)
    u = torch.zeros(shape, dtype=dtype, device=dev)
    f = torch.zeros(m, dtype=torch.float64, device=dev)
    g = torch.zeros(shape, dtype=dtype, device=dev)
    gw = torch.zeros_like(g)
    gmax = torch.full((m,), float("inf"), dtype=dtype, device=dev)
    s_hist = torch.zeros((history,) + shape, dtype=dtype, device=dev)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros((history, m), dtype=torch.float64, device=dev)
    n_mem = torch.zeros(m, dtype=torch.long, device=dev)  # valid pairs per model
    head = torch.zeros(m, dtype=torch.long, device=dev)  # next slot to write, per model
    n_iter = torch.zeros(m, dtype=torch.long, device=dev)
    active = torch.zeros(m, dtype=torch.bool, device=dev)
    stalled = torch.zeros(m, dtype=torch.bool, device=dev)
    no_gain = torch.zeros(m, dtype=torch.long, device=dev)
    # relative decrease of f below which a step counts as no progress (float32 logits carry
    # ~1e-7 relative noise per term; sums over N samples are exact to ~1e-10)
    stall_rtol = 1e-10 if dtype == torch.float32 else 1e-15

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=m, desc="logistic path", unit="fit", leave=False)
    if init is not None:
        coef0 = torch.as_tensor(np.asarray(init[0]), dtype=dtype, device=dev)
        icpt0 = torch.as_tensor(np.asarray(init[1]), dtype=dtype, device=dev)
        if coef0.shape != (m, prob.d, k) or icpt0.shape != (m, k):
            raise ValueError(f"init must be ({m} x {prob.d} x {k}, {m} x {k}) arrays, "
                             f"got {tuple(coef0.shape)}, {tuple(icpt0.shape)}")
        u = prob.from_original(coef0, icpt0)
        wave_stride = 1
    for wave, source in _waves(lam.cpu().numpy(), wave_stride):
        wi = torch.as_tensor(wave, device=dev)
        if source is not None:  # warm start from the solved, more strongly regularised neighbour
            si = torch.as_tensor(source, device=dev)
            u[wi] = u[si] * prob.scale[si] / prob.scale[wi]
        f[wi], g[wi], gw[wi] = prob.value_grad(u[wi], wi)
        gmax[wi] = prob.grad_max_original(gw[wi])
        active[wi] = gmax[wi] > tol
        if bar is not None:
            bar.update(int((~active[wi]).sum()))
        while bool(active.any()):
            idx = torch.nonzero(active).flatten()
            a = idx.numel()
            q = g[idx].clone()
            # two-loop recursion, newest to oldest; pair slots are per model (ring buffers)
            alphas = []
            for j in range(history):
                slot = (head[idx] - 1 - j) % history
                valid = (j < n_mem[idx])
                sj = s_hist[slot, idx]
                yj = y_hist[slot, idx]
                rj = rho[slot, idx] * valid
                al = rj * _dot(sj, q)
                q = q - al.to(dtype)[:, None, None] * yj
                alphas.append((al, slot, rj))
            # initial Hessian scale from the newest pair (identity before any pair)
            newest = (head[idx] - 1) % history
            sy = _dot(s_hist[newest, idx], y_hist[newest, idx])
            yy = _dot(y_hist[newest, idx], y_hist[newest, idx])
            gamma = torch.where(n_mem[idx] > 0, sy / yy.clamp_min(1e-300), torch.ones_like(sy))
            q = q * gamma.to(dtype)[:, None, None]
            for al, slot, rj in reversed(alphas):
                be = rj * _dot(y_hist[slot, idx], q)
                q = q + (al - be).to(dtype)[:, None, None] * s_hist[slot, idx]
            p = -q
            gp = _dot(g[idx], p)
            bad = gp >= 0  # not a descent direction: fall back to steepest descent
            if bool(bad.any()):
                p[bad] = -g[idx][bad]
                gp = torch.where(bad, -_dot(g[idx], g[idx]), gp)
            # unit steps: in the scaled variables the bound Hessian is the identity, so even the
            # first (steepest-descent) step is the majorise-minimise step and decreases f
            step = torch.ones_like(gp)
            f0 = f[idx]
            u0 = u[idx]
            todo = torch.ones(a, dtype=torch.bool, device=dev)
            f_new = f0.clone()
            g_new = g[idx].clone()
            gw_new = gw[idx].clone()
            for _ in range(20):  # Armijo backtracking, only for models still searching
                t = torch.nonzero(todo).flatten()
                if t.numel() == 0:
                    break
                ut = u0[t] + step[t].to(dtype)[:, None, None] * p[t]
                ft, gt, gwt = prob.value_grad(ut, idx[t])
                ok = ft <= f0[t] + 1e-4 * step[t] * gp[t]
                okt = t[ok]
                f_new[okt], g_new[okt], gw_new[okt] = ft[ok], gt[ok], gwt[ok]
                todo[okt] = False
                step[t[~ok]] *= 0.5
            failed = todo
            accepted = ~failed
            acc_idx = idx[accepted]
            if acc_idx.numel():
                s_vec = step[accepted].to(dtype)[:, None, None] * p[accepted]
                y_vec = g_new[accepted] - g[acc_idx]
                sy_new = _dot(s_vec, y_vec)
                good = sy_new > 1e-10 * _dot(s_vec, s_vec).sqrt() * _dot(y_vec, y_vec).sqrt()
                slot = head[acc_idx]
                gi = acc_idx[good]
                s_hist[slot[good], gi] = s_vec[good]
                y_hist[slot[good], gi] = y_vec[good]
                rho[slot[good], gi] = 1.0 / sy_new[good]
                head[gi] = (head[gi] + 1) % history
                n_mem[gi] = (n_mem[gi] + 1).clamp(max=history)
                u[acc_idx] = u0[accepted] + s_vec
                f[acc_idx] = f_new[accepted]
                g[acc_idx] = g_new[accepted]
                gw[acc_idx] = gw_new[accepted]
                gmax[acc_idx] = prob.grad_max_original(gw_new[accepted])
                n_iter[acc_idx] += 1
            stalled[idx[failed]] = True
            # `stall_patience` steps in a row that barely lower f: the precision is exhausted
            gain = (f0 - f[idx]) / f0.abs().clamp_min(1.0)
            no_gain[idx] = torch.where(gain > stall_rtol, 0, no_gain[idx] + 1)
            stalled[idx[no_gain[idx] >= stall_patience]] = True
            done = (gmax <= tol) | stalled | (n_iter >= max_iter)
            newly = int((active & done).sum())
            active &= ~done
            if bar is not None and newly:
                bar.update(newly)
    if bar is not None:
        bar.close()
    converged = gmax <= tol
    coef, intercept = prob.to_original(u)
    n_bad = int((~converged).sum())
    if n_bad:
        log.info("%d of %d logistic fits did not reach tol=%g", n_bad, m, tol)
    return PathFit(
        lambdas=np.asarray(lambdas, dtype=np.float64),
        coef=coef.cpu().numpy(),
        intercept=intercept.cpu().numpy(),
        n_iter=n_iter.cpu().numpy(),
        converged=converged.cpu().numpy(),
        grad_max=gmax.double().cpu().numpy(),
        tol=float(tol),
        device=str(dev),
        basis=prob.v if prob.r == prob.d else None,
    )
