"""Multinomial L2 logistic regression for a whole regularisation path at once (torch, CPU/GPU).

Objective of one model (scikit-learn's meaning of ``C``, ``lam = 1 / C``)::

    f(W, b) = mean_i CE(softmax(x_i W + b), y_i) + lam / (2 N) * ||W||_F^2      (b unpenalised)

How it is fast:

* **Exact reparametrisation.** Features are centred (the intercept absorbs the mean) and the
  weights are expressed in an orthonormal eigenbasis of the feature covariance (estimated
  from at most 65,536 evenly spaced rows: any orthonormal basis is exact, the estimate only
  tunes the preconditioner). With N < D the null space of the rows is dropped (the optimum
  puts no weight there, since only the penalty acts on it), shrinking the problem to
  N x N. A later fit on similar data (the refit on train + validation) reuses the basis.
* **Preconditioning.** In that basis Böhning's bound on the softmax Hessian,
  ``1/2 (I - 11'/K) (x) Cov + lam/N I``, is diagonal, so every model is optimised in
  variables scaled by ``(s_j / 2 + lam / N) ** -1/2``: strongly regularised fits converge in a
  few steps, weakly regularised ones in tens to about a hundred.
* **Many models in one pass.** Every L-BFGS iteration evaluates all still-active models with
  one ``N x D`` by ``D x (M K)`` product and its transpose (float32, softmax in float64);
  converged models leave the batch.
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

from medxfer.devices import resolve_device

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
    basis: tuple[torch.Tensor, torch.Tensor] | None = None  # full rotation V + variances (None when N < D)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """M x N x K logits of every model on ``x`` (N x D)."""
        xd = np.asarray(x, dtype=np.float64)
        m, d, k = self.coef.shape
        flat = self.coef.transpose(1, 0, 2).reshape(d, m * k)  # one BLAS product for all models
        return (xd @ flat).reshape(len(xd), m, k).transpose(1, 0, 2) + self.intercept[:, None, :]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """M x N x K softmax probabilities."""
        z = self.logits(x)
        z -= z.max(axis=2, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=2, keepdims=True)


class _Problem:
    """The centred data in an eigenbasis of its covariance and the batched objective.

    Two layouts, the same maths: with N < D the data are rotated once into the r <= N
    dimensional span of the rows (``a = Z``, cheap); otherwise the data stay in their original
    basis (``a = X``) and the weights are rotated each step (``W = V Wz``), which avoids an
    N x D x D product per fit.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int, lambdas: torch.Tensor, rank_rtol: float,
                 basis: tuple[torch.Tensor, torch.Tensor] | None = None, precond_rows: int = 65536) -> None:
        n, d = x.shape
        self.n, self.d, self.k = n, d, k
        self.mu = x.mean(0)
        if basis is not None:  # a full orthonormal basis (+ variances) from an earlier fit: exact
            v, var = basis
            self.rotated = False
        elif n < d:  # eigenvectors through the small N x N Gram matrix; drop the null space
            xc = x - self.mu
            evals, u = torch.linalg.eigh(xc @ xc.T)
            keep = evals > rank_rtol * evals.max().clamp_min(torch.finfo(x.dtype).tiny)
            v = (xc.T @ u[:, keep]) / evals[keep].sqrt()  # D x r, orthonormal columns
            var = evals[keep] / n
            self.rotated = True
        else:
            # every direction kept, so any orthonormal V is exact; the covariance (estimated
            # from at most `precond_rows` evenly spaced rows) only tunes the preconditioner
            step = max(1, n // max(precond_rows, 2 * d))
            xs = x[::step] - self.mu
            evals, v = torch.linalg.eigh(xs.T @ xs)
            var = evals.clamp_min(0.0) / xs.shape[0]
            self.rotated = False
        self.v = v.to(x.dtype)  # D x r
        self.var = var.to(x.dtype)  # variances along the basis vectors (preconditioner only)
        self.r = self.v.shape[1]
        self.a = (x - self.mu) @ self.v if self.rotated else x
        self.a_mu = None if self.rotated else self.mu
        self.y = y
        self.onehot = torch.nn.functional.one_hot(y, k).to(x.dtype)
        self.lam_n = (lambdas / n).to(x.dtype)  # penalty per model, M
        # preconditioner: scale of each variable, M x (r + 1) x 1 (last row = intercept)
        scale_w = (0.5 * self.var[None, :] + self.lam_n[:, None]).rsqrt()
        scale_b = torch.full((len(lambdas), 1), 2.0 ** 0.5, dtype=x.dtype, device=x.device)
        self.scale = torch.cat([scale_w, scale_b], dim=1).unsqueeze(-1)

    def value_grad(self, u: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Objective (float64), gradient in scaled variables, gradient in (Wz, b) and the
        convergence statistic max |gradient| w.r.t. the original coefficients and intercepts."""
        m = u.shape[0]
        k = self.k
        w = u * self.scale[idx]  # m x (r+1) x K
        wz = w[:, : self.r, :]
        b = w[:, self.r, :]
        wz_flat = wz.permute(1, 0, 2).reshape(self.r, m * k)
        w_data = wz_flat if self.rotated else self.v @ wz_flat  # weights in the layout of `a`
        logits = (self.a @ w_data).view(self.n, m, k) + b
        if self.a_mu is not None:  # centring, applied to the weights instead of the data
            logits = logits - (self.a_mu @ w_data).view(1, m, k)
        # the softmax in float64 (N x m x K values, cheap next to the products): with strong
        # regularisation f barely moves away from log K and float32 would hide its decrease
        logp = torch.log_softmax(logits.double(), dim=2)
        nll = -(logp * self.onehot[:, None, :]).sum((0, 2)) / self.n  # m
        lam = self.lam_n[idx]
        pen = 0.5 * lam.double() * (wz.double() ** 2).sum((1, 2))
        gl = ((logp.exp() - self.onehot[:, None, :]) / self.n).to(u.dtype)  # N x m x K
        gb = gl.sum(0)  # m x K
        # gradient w.r.t. w_data (uncentred), computed as (G' A)': BLAS reads A row-major; the
        # A' G orientation is ~4x slower for narrow G on CPU
        g_data = (gl.reshape(self.n, m * k).T @ self.a).T
        if self.rotated:
            gwz_flat = g_data
            g_orig = self.v @ g_data  # z is centred: the original-space data gradient
        else:
            g_orig = g_data
            gwz_flat = self.v.T @ (g_data - self.a_mu[:, None] * gb.reshape(1, m * k))
        gwz = gwz_flat.view(self.r, m, k).permute(1, 0, 2) + lam[:, None, None] * wz
        gw = torch.cat([gwz, gb[:, None, :]], dim=1)
        # original coefficients w = V wz, intercept b0 = b - mu' w: d f/d w = X' gl + lam/N w
        coef = (self.v @ wz_flat if self.rotated else w_data).view(self.d, m, k)
        g_coef = (g_orig + (self.mu[:, None] * gb.reshape(1, m * k) if self.rotated else 0)).view(self.d, m, k)
        g_coef = g_coef + lam[None, :, None] * coef
        gmax = torch.maximum(g_coef.abs().amax((0, 2)), gb.abs().amax(1))
        return nll + pen, gw * self.scale[idx], gw, gmax

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
    """Per-model inner products (as float64 scalars)."""
    return torch.einsum("aij,aij->a", a, b).double()


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
    basis: tuple[torch.Tensor, torch.Tensor] | None = None,
    precond_rows: int = 65536,
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
    failures, or ``stall_patience`` steps in a row that neither lower the objective by a
    relative 1e-10 (1e-15 in float64) nor reach a new smallest gradient (the precision is
    exhausted), end that model's fit; it
    is reported as converged only if its gradient meets ``tol``. ``basis`` (a full rotation
    and variances from an earlier fit, :attr:`PathFit.basis`) skips the eigendecomposition;
    ``precond_rows`` caps the rows used to estimate the covariance (preconditioner only).
    """
    dev = torch.device(resolve_device(device))
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
        basis = (torch.as_tensor(basis[0], dtype=dtype, device=dev), torch.as_tensor(basis[1], dtype=dtype, device=dev))
        if basis[0].shape != (xt.shape[1], xt.shape[1]) or basis[1].shape != (xt.shape[1],):
            raise ValueError(f"basis must be a full D x D orthonormal matrix and D variances, "
                             f"got {tuple(basis[0].shape)}, {tuple(basis[1].shape)}")
    prob = _Problem(xt, yt, k, lam, rank_rtol, basis, precond_rows)

    shape = (m, prob.r + 1, k)
    u = torch.zeros(shape, dtype=dtype, device=dev)
    f = torch.zeros(m, dtype=torch.float64, device=dev)
    g = torch.zeros(shape, dtype=dtype, device=dev)
    gw = torch.zeros_like(g)
    gmax = torch.full((m,), float("inf"), dtype=dtype, device=dev)
    # L-BFGS memory, model-major so one gather per iteration fetches every active model's pairs
    s_hist = torch.zeros((m, history) + shape[1:], dtype=dtype, device=dev)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros((m, history), dtype=torch.float64, device=dev)
    ages = torch.arange(history, device=dev)
    n_mem = torch.zeros(m, dtype=torch.long, device=dev)  # valid pairs per model
    head = torch.zeros(m, dtype=torch.long, device=dev)  # next slot to write, per model
    n_iter = torch.zeros(m, dtype=torch.long, device=dev)
    active = torch.zeros(m, dtype=torch.bool, device=dev)
    stalled = torch.zeros(m, dtype=torch.bool, device=dev)
    no_gain = torch.zeros(m, dtype=torch.long, device=dev)
    best_gmax = torch.full((m,), float("inf"), dtype=dtype, device=dev)
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
        f[wi], g[wi], gw[wi], gmax[wi] = prob.value_grad(u[wi], wi)
        best_gmax[wi] = gmax[wi]
        active[wi] = gmax[wi] > tol
        if bar is not None:
            bar.update(int((~active[wi]).sum()))
        while bool(active.any()):
            idx = torch.nonzero(active).flatten()
            a = idx.numel()
            q = g[idx].clone()
            # two-loop recursion over each model's ring buffer, newest pair first
            order = (head[idx, None] - 1 - ages[None, :]) % history  # a x h
            valid = ages[None, :] < n_mem[idx, None]
            sh = torch.take_along_dim(s_hist[idx], order[:, :, None, None], dim=1)
            yh = torch.take_along_dim(y_hist[idx], order[:, :, None, None], dim=1)
            rh = rho[idx].gather(1, order) * valid
            alphas = []
            for j in range(history):
                al = rh[:, j] * _dot(sh[:, j], q)
                q = q - al.to(dtype)[:, None, None] * yh[:, j]
                alphas.append(al)
            # initial Hessian scale from the newest pair (identity before any pair)
            sy = _dot(sh[:, 0], yh[:, 0])
            yy = _dot(yh[:, 0], yh[:, 0])
            gamma = torch.where(n_mem[idx] > 0, sy / yy.clamp_min(1e-300), torch.ones_like(sy))
            q = q * gamma.to(dtype)[:, None, None]
            for j in reversed(range(history)):
                be = rh[:, j] * _dot(yh[:, j], q)
                q = q + (alphas[j] - be).to(dtype)[:, None, None] * sh[:, j]
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
            gm_new = gmax[idx].clone()
            for _ in range(20):  # Armijo backtracking, only for models still searching
                t = torch.nonzero(todo).flatten()
                if t.numel() == 0:
                    break
                ut = u0[t] + step[t].to(dtype)[:, None, None] * p[t]
                ft, gt, gwt, gmt = prob.value_grad(ut, idx[t])
                ok = ft <= f0[t] + 1e-4 * step[t] * gp[t]
                # approximate Armijo: f unchanged within rounding and a smaller gradient
                ok |= (ft <= f0[t] + stall_rtol * f0[t].abs()) & (gmt < gmax[idx[t]])
                okt = t[ok]
                f_new[okt], g_new[okt], gw_new[okt], gm_new[okt] = ft[ok], gt[ok], gwt[ok], gmt[ok]
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
                s_hist[gi, slot[good]] = s_vec[good]
                y_hist[gi, slot[good]] = y_vec[good]
                rho[gi, slot[good]] = 1.0 / sy_new[good]
                head[gi] = (head[gi] + 1) % history
                n_mem[gi] = (n_mem[gi] + 1).clamp(max=history)
                u[acc_idx] = u0[accepted] + s_vec
                f[acc_idx] = f_new[accepted]
                g[acc_idx] = g_new[accepted]
                gw[acc_idx] = gw_new[accepted]
                gmax[acc_idx] = gm_new[accepted]
                n_iter[acc_idx] += 1
            stalled[idx[failed]] = True
            # `stall_patience` steps in a row that neither lower f by a relative `stall_rtol`
            # nor reach a new smallest gradient: the floating point precision is exhausted
            gain = (f0 - f[idx]) / f0.abs().clamp_min(1.0)
            progress_made = (gain > stall_rtol) | (gmax[idx] < best_gmax[idx])
            best_gmax[idx] = torch.minimum(best_gmax[idx], gmax[idx])
            no_gain[idx] = torch.where(progress_made, 0, no_gain[idx] + 1)
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
        basis=(prob.v, prob.var) if prob.r == prob.d else None,
    )
