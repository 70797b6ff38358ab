"""Multinomial L2 logistic regression for a whole regularisation path at once (torch, CPU/GPU).

Objective of one model (scikit-learn's meaning of ``C``, ``lam = 1 / C``)::

    f(W, b) = mean_i CE(softmax(x_i W + b), y_i) + lam / (2 N) * ||W||_F^2      (b unpenalised)

How it is fast:

* **Exact reparametrisation.** Features are centred (the intercept absorbs the mean) and the
  weights are expressed in an orthonormal eigenbasis of the feature covariance (estimated
  from at most 65,536 evenly spaced rows: any orthonormal basis is exact, the estimate only
  tunes the preconditioner). With N < D only the null space of the centred rows is dropped
  (the optimum puts no weight there, since only the penalty acts on it), shrinking the
  problem to N x N; the Gram matrix is decomposed in float64, because directions of tiny
  but nonzero variance (random-init CNN features have them 1e-6 to 1e-12 below the largest)
  carry weight when the penalty is weak. A later fit on similar data (the refit on
  train + validation) reuses the basis.
* **Preconditioning.** In that basis Böhning's bound on the softmax Hessian,
  ``1/2 (I - 11'/K) (x) Cov + lam/N I``, is diagonal, so every model is optimised in
  variables scaled by ``(s_j / 2 + lam / N) ** -1/2``: strongly regularised fits converge in a
  few steps, weakly regularised ones in tens to about a hundred.
* **Two passes over X per iteration, for all models at once.** The logits of every model are
  kept (float64) and moved along the search direction: one product ``X P`` gives the
  direction's logits ``D``, the line search along ``L + t D`` is exact and needs no further
  pass, and one product ``R' X`` gives the gradient. Every product serves all still-active
  models (``N x D`` by ``D x (M K)``); converged models leave the batch.
* **bf16 products, verified in float32.** Where bf16 matrix products are fast (AVX512-BF16 /
  AMX CPUs, CUDA), the two products use a bf16 copy of the centred features. That solves a
  slightly different problem: on the benchmark's features the gradient at the same weights
  moves by ~1e-5 with strong regularisation and up to ~1e-3 with the weakest (large
  weights). So a fit whose bf16 certificate reaches ``max(tol, 1e-3)`` is re-evaluated with
  float32 logits and gradient, and only counts as converged if that exact certificate meets
  ``tol``; otherwise it goes on with float32 products.
* **Warm starts.** Wave 0 solves anchors from zero (every 5th value of the grid from the
  strongest, and the weakest); wave 1 solves every other value at once, each started from the
  log-lambda interpolation of the two anchors that bracket it.

Convergence certificate. With residuals ``R = (softmax - onehot) / N`` (N x K), centred
features ``X_c`` and ``mu = lam / N``, the gradient with the intercept at the feature means is
``G = X_c' R + mu W`` (coefficients) and ``g = R' 1`` (intercepts). A fit is converged when,
after at least one checked step, ::

    rel = max(||G||_F / (||X_c||_F ||R||_F + ||mu W||_F),  max_k |g_k| / (sqrt(N) ||R_k||))  <=  tol

The denominators are the Cauchy-Schwarz bounds of what the terms could sum to without
cancelling, so ``rel`` is the fraction of its own size the gradient has left. It is scale-free
(features times c with lam times c^2, the same model, leave it unchanged; so does a constant
offset of the features) and scale-aware: residuals set the scale, so when the loss flattens
(separable or N <= D data under a weak penalty: tiny residuals, large weights) the test
tightens with it, where an absolute ``max |gradient| <= 1e-4`` holds far from the optimum
(it held at warm starts 24-44 validation points away). Near such an optimum ``X_c' R ~ -mu W``
and the denominator is a small multiple (6-20 on the test battery) of ``||mu W||``, so the
certificate also makes ``dist_bound = ||G||_F / ||mu W||_F`` small, which bounds the distance
rigorously: ``||W - W*||_F <= dist_bound * ||W||_F`` whenever the intercept is optimal for W
(``min_b f(W, b)`` is mu-strongly convex). Where the data rather than the penalty pin the
solution (weak penalty on non-separable data, ``||mu W|| << ||X_c|| ||R||``) ``dist_bound`` is
large and bounds nothing; the certificate is then relative stationarity alone (float32 fits
reach rel ~1e-6 at best there; tighter needs float64). ``rel``, ``dist_bound`` and the
absolute ``max |gradient|`` are reported per fit.

Checked steps: every fit, cold or warm, takes at least one L-BFGS step (a line search from its
start) before ``rel`` may end it, so a start that already meets the test is confirmed by a
step, not accepted unexamined (a line search that finds no measurable decrease leaves it
where it is). Fits that stop otherwise (``max_iter``, line-search failure, stalled progress)
are reported as not converged, never hidden.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from medxfer.devices import fast_bf16_matmul, resolve_device

log = logging.getLogger(__name__)

MATMUL_MODES = ("auto", "bf16", "exact")
# below this many feature entries (N * D) the bf16 copy and the verification passes cost more
# than the faster products save
AUTO_BF16_MIN_ENTRIES = 1 << 22
# line search: sufficient decrease and (weak Wolfe) curvature constants, trials per iteration
ARMIJO_C1, WOLFE_C2, LINE_SEARCH_TRIALS = 1e-4, 0.9, 20
# bf16 products leave the gradient ~1e-3 of its scale off (see the module docstring): a bf16
# fit goes on to exact products once its bf16 certificate is below max(tol, BF16_RTOL)
BF16_RTOL = 1e-3


@dataclass
class PathFit:
    """One fitted model per ``lambdas`` entry, in the original feature space.

    ``coef`` M x D x K, ``intercept`` M x K (float64 numpy); per model ``n_iter`` (accepted
    steps), ``converged`` (``rel_grad <= tol`` after a checked step), ``rel_grad`` (the
    certificate), ``dist_bound`` (``||W - W*|| / ||W||`` bound when the intercept is optimal)
    and ``grad_max`` (max |gradient| w.r.t. coefficients and intercepts, scikit-learn's
    absolute statistic: a diagnostic only), all in the working precision (see the module
    docstring). ``matmul``: ``"bf16"`` when most iterations used bf16 products (every fit then
    ended with exact ones), else ``"exact"``.
    """

    lambdas: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    grad_max: np.ndarray
    tol: float
    device: str
    matmul: str = "exact"
    rel_grad: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    dist_bound: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
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


def _groups(low: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
    """Model positions split by product precision: ``[(positions, use_bf16), ...]``, non-empty."""
    out = []
    for flag in (True, False):
        pos = torch.nonzero(low == flag).flatten()
        if pos.numel():
            out.append((pos, flag))
    return out


class _Problem:
    """The centred data in an eigenbasis of its covariance, and the products with it.

    Two layouts, the same maths: with N < D the data are rotated once into the r <= N
    dimensional span of the rows (``a = Z``, cheap); otherwise the data stay in their original
    basis (``a = X``) and the weights are rotated (``W = V Wz``), which avoids an N x D x D
    product per fit. ``a_low``: a bf16 copy of the *centred* data (or None).

    Layouts: weights in the layout of ``a`` ("rows") are m x K x R (R = D, or r when rotated);
    logits and residuals are m x N x K (float64), so every model's block is contiguous.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int, lambdas: torch.Tensor, rank_rtol: float,
                 basis: tuple[torch.Tensor, torch.Tensor] | None, precond_rows: int,
                 low_dtype: torch.dtype | None) -> None:
        n, d = x.shape
        self.n, self.d, self.k, self.dtype = n, d, k, x.dtype
        self.mu = x.mean(0)
        if basis is not None:  # a full orthonormal basis (+ variances) from an earlier fit: exact
            v, var = basis
            self.rotated = False
        elif n < d:  # eigenvectors through the small N x N Gram matrix; drop the null space
            # in float64: directions of tiny variance are real (and matter when lam is small);
            # float32 would lose every one below ~1e-7 of the largest eigenvalue
            xc = x.double() - x.double().mean(0)
            evals, u = torch.linalg.eigh(xc @ xc.T)
            keep = evals > rank_rtol * evals.max().clamp_min(torch.finfo(torch.float64).tiny)
            v = (xc.T @ u[:, keep]) / evals[keep].sqrt()  # D x r, orthonormal columns
            z = u[:, keep] * evals[keep].sqrt()  # = xc @ v, exactly
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
        self.a = z.to(x.dtype) if self.rotated else x
        self.a_mu = None if self.rotated else self.mu
        self.a_low = None
        if low_dtype is not None:
            self.a_low = (self.a if self.rotated else x - self.mu).to(low_dtype)
        # ||X_c||_F, the certificate's Cauchy-Schwarz scale (in chunks: no N x D temporary)
        sq = sum(float((chunk - self.mu).double().square().sum()) for chunk in x.split(8192))
        self.fro = torch.tensor(sq ** 0.5, dtype=x.dtype, device=x.device)
        self.onehot = torch.nn.functional.one_hot(y, k).to(torch.float64)  # N x K
        self.lam_n = (lambdas / n).to(x.dtype)  # penalty per model, M
        # preconditioner: scale of each variable, M x (r + 1) x 1 (last row = intercept)
        scale_w = (0.5 * self.var[None, :] + self.lam_n[:, None]).rsqrt()
        scale_b = torch.full((len(lambdas), 1), 2.0 ** 0.5, dtype=x.dtype, device=x.device)
        self.scale = torch.cat([scale_w, scale_b], dim=1).unsqueeze(-1)

    def to_rows(self, wz: torch.Tensor) -> torch.Tensor:
        """Eigenbasis weights (m x r x K) -> weights in the layout of ``a`` (m x K x R)."""
        m = wz.shape[0]
        flat = wz.transpose(1, 2).reshape(m * self.k, self.r)
        return (flat if self.rotated else flat @ self.v.T).view(m, self.k, -1)

    def coef(self, rows: torch.Tensor) -> torch.Tensor:
        """Original-space coefficients (m x K x D) from weights in the layout of ``a``."""
        if not self.rotated:
            return rows
        m = rows.shape[0]
        return (rows.reshape(m * self.k, self.r) @ self.v.T).view(m, self.k, self.d)

    def logits(self, rows: torch.Tensor, b: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Logits of the centred data (float64, m x N x K) for weights ``rows`` (m x K x R) and
        intercepts ``b`` (m x K); models with ``low`` set use the bf16 copy."""
        m, k, _ = rows.shape
        out = torch.empty((m, self.n, k), dtype=torch.float64, device=b.device)
        for pos, use_low in _groups(low):
            cols = rows[pos].reshape(pos.numel() * k, -1)
            if use_low:
                z = self.a_low @ cols.to(self.a_low.dtype).T
            else:
                z = self.a @ cols.T
                if self.a_mu is not None:  # centring, applied to the weights instead of the data
                    z = z - (cols @ self.a_mu)[None, :]
            z = z.view(self.n, pos.numel(), k).transpose(0, 1)
            if pos.numel() == m:
                out.copy_(z)  # converts and transposes in one pass
            else:
                out[pos] = z.double()
        return out.add_(b.double()[:, None, :])

    def data_gradient(self, res: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """``res' A_c`` per model (m x K x R, working dtype) for residuals ``res`` (m x N x K,
        float64). The product reads ``A`` row-major (the ``A' res`` orientation is several
        times slower for narrow ``res`` on CPU)."""
        m, _, k = res.shape
        out = torch.empty((m, k, self.a.shape[1]), dtype=self.dtype, device=res.device)
        for pos, use_low in _groups(low):
            target = self.a_low.dtype if use_low else self.dtype
            rs = res[pos].transpose(1, 2).to(target).reshape(pos.numel() * k, self.n)
            if use_low:
                g = rs @ self.a_low
            else:
                g = rs @ self.a
                if self.a_mu is not None:
                    g = g - rs.sum(1)[:, None] * self.a_mu[None, :]
            out[pos] = g.view(pos.numel(), k, -1).to(self.dtype)
        return out

    def residuals(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy per model and residuals ``(softmax - onehot) / N`` (float64)."""
        logp = torch.log_softmax(logits, dim=2)
        nll = -(logp * self.onehot).sum((1, 2)) / self.n
        return nll, (logp.exp_() - self.onehot) / self.n

    def gradients(self, res: torch.Tensor, wz: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor,
                  low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradient in (Wz, b) (m x (r+1) x K) and, per model, max |gradient| w.r.t. the original
        coefficients and intercepts (scikit-learn's statistic, a diagnostic), the certificate
        ``rel`` and ``dist_bound`` (both defined in the module docstring)."""
        m, _, k = res.shape
        gb = res.sum(1).to(self.dtype)  # m x K
        gdc = self.data_gradient(res, low)  # m x K x R
        flat = gdc.reshape(m * k, -1)
        lam = self.lam_n[idx]
        gwz = (flat if self.rotated else flat @ self.v).view(m, k, self.r).transpose(1, 2)
        gwz = gwz + lam[:, None, None] * wz
        g_orig = (flat @ self.v.T if self.rotated else flat).view(m, k, self.d)
        coef = self.coef(rows)
        g_c = g_orig + lam[:, None, None] * coef  # w.r.t. W with the intercept at the feature means
        g_coef = g_c + gb[:, :, None] * self.mu[None, None, :]  # w.r.t. W with b fixed
        gmax = torch.maximum(g_coef.abs().amax((1, 2)), gb.abs().amax(1))
        r_k = res.square().sum(1).sqrt()  # m x K (float64): ||R_k||
        g_norm = g_c.norm(dim=(1, 2))
        pen = lam * coef.norm(dim=(1, 2))  # ||mu W||
        rel_w = g_norm / (self.fro * r_k.norm(dim=1).to(self.dtype) + pen)
        rel_b = (gb.double().abs() / (r_k * self.n ** 0.5).clamp_min(torch.finfo(torch.float64).tiny)).amax(1)
        rel = torch.maximum(rel_w, rel_b.to(self.dtype))
        bound = g_norm / pen.clamp_min(torch.finfo(self.dtype).tiny)
        return torch.cat([gwz, gb[:, None, :]], dim=1), gmax, rel, bound

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


@dataclass
class _Wave:
    """Models solved together; ``lo``/``hi``/``t``: each is started from ``(1 - t) w_lo + t w_hi``
    of two solved models (``None``: from zero)."""

    models: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    t: np.ndarray | None = None


def _waves(lambdas: np.ndarray, stride: int) -> list[_Wave]:
    """Order of work along the path.

    Wave 0 solves the anchors from zero: every ``stride``-th model from the strongest
    regularisation, and the weakest. Wave 1 solves all the others at once, each started from
    the linear interpolation (in log lambda) of the two anchors that bracket it. ``stride=1``:
    all models at once from zero. Batching every remaining model in one wave keeps the
    products wide (one pass over X serves them all).
    """
    order = np.argsort(-lambdas, kind="stable")
    stride = max(1, min(int(stride), len(order)))
    anchor_pos = np.unique(np.r_[np.arange(0, len(order), stride), len(order) - 1])
    out = [_Wave(order[anchor_pos])]
    rest = np.setdiff1d(np.arange(len(order)), anchor_pos)
    if rest.size:
        right = np.searchsorted(anchor_pos, rest)  # first anchor after each position (weaker)
        lo, hi = order[anchor_pos[right - 1]], order[anchor_pos[right]]
        loglam = np.log(np.maximum(lambdas, np.finfo(np.float64).tiny))
        span = loglam[lo] - loglam[hi]
        t = np.where(span > 0, (loglam[lo] - loglam[order[rest]]) / np.where(span > 0, span, 1.0), 0.0)
        out.append(_Wave(order[rest], lo, hi, t))
    return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-model inner products (as float64 scalars)."""
    return torch.einsum("aij,aij->a", a, b).double()


def _lbfgs_product(g: torch.Tensor, s_hist: torch.Tensor, y_hist: torch.Tensor, rho: torch.Tensor,
                   head: torch.Tensor, n_mem: torch.Tensor) -> torch.Tensor:
    """L-BFGS inverse-Hessian estimate times ``g`` for a batch of models (two-loop recursion).

    Each model's pairs sit in a ring buffer (``s_hist``/``y_hist``: a x h x ...; ``head`` =
    next slot to write, ``n_mem`` = valid pairs); the initial scale comes from the newest pair
    (the identity before any pair).
    """
    history = s_hist.shape[1]
    ages = torch.arange(history, device=g.device)
    order = (head[:, None] - 1 - ages[None, :]) % history  # a x h, newest pair first
    valid = ages[None, :] < n_mem[:, None]
    sh = torch.take_along_dim(s_hist, order[:, :, None, None], dim=1)
    yh = torch.take_along_dim(y_hist, order[:, :, None, None], dim=1)
    rh = rho.gather(1, order) * valid
    q = g.clone()
    alphas = []
    for j in range(history):
        al = rh[:, j] * _dot(sh[:, j], q)
        q = q - al.to(q.dtype)[:, None, None] * yh[:, j]
        alphas.append(al)
    sy = _dot(sh[:, 0], yh[:, 0])
    yy = _dot(yh[:, 0], yh[:, 0])
    gamma = torch.where(n_mem > 0, sy / yy.clamp_min(1e-300), torch.ones_like(sy))
    q = q * gamma.to(q.dtype)[:, None, None]
    for j in reversed(range(history)):
        be = rh[:, j] * _dot(yh[:, j], q)
        q = q + (alphas[j] - be).to(q.dtype)[:, None, None] * sh[:, j]
    return q


@dataclass
class _Step:
    """Outcome of one line search per model: ``ok`` where a point with sufficient decrease
    was found, its step ``t``, objective change ``df`` and residuals there (a x N x K)."""

    ok: torch.Tensor
    t: torch.Tensor
    df: torch.Tensor
    res: torch.Tensor


def _line_search(logits: torch.Tensor, d: torch.Tensor, onehot: torch.Tensor, slope: torch.Tensor,
                 pen_lin: torch.Tensor, pen_quad: torch.Tensor) -> _Step:
    """Weak-Wolfe line search along ``logits + t d`` (m x N x K) for every model at once, with
    no pass over X.

    ``phi(t) - phi(0) = mean_i[lse(L_i + t d_i) - lse(L_i) - t d_i,y_i] + t pen_lin + t^2/2 pen_quad``
    is convex in t and is computed as a difference (float64), so decreases far below the
    objective's own size are resolved. ``slope`` = phi'(0) (< 0). Steps start at 1 (the
    majorise-minimise step in the preconditioned variables); the bracket shrinks by secant
    steps on phi' (safeguarded), or grows 4x while the curvature condition fails.
    """
    a, n, _ = d.shape
    dev = d.device
    logp0 = torch.log_softmax(logits, dim=2)
    p0 = logp0.exp()
    dy = (d * onehot).sum((1, 2)) / n
    t = torch.ones(a, dtype=torch.float64, device=dev)
    lo, dlo = torch.zeros_like(t), slope.clone()
    hi, dhi = torch.full_like(t, float("inf")), torch.zeros_like(t)
    found = torch.zeros(a, dtype=torch.bool, device=dev)
    t_ok, df_ok = torch.zeros_like(t), torch.zeros_like(t)
    res = torch.empty_like(d)
    todo = torch.ones(a, dtype=torch.bool, device=dev)
    everyone = torch.arange(a, device=dev)
    for trial in range(LINE_SEARCH_TRIALS):
        j = everyone if trial == 0 else torch.nonzero(todo).flatten()
        if j.numel() == 0:
            break
        lpj, pj, dj = (logp0, p0, d) if trial == 0 else (logp0[j], p0[j], d[j])
        tj = t[j]
        z = tj[:, None, None] * dj
        # lse(L + z) - lse(L) = log1p(sum_k p0_k expm1(z_k)): no cancellation, so steps whose
        # decrease is far below the rounding of lse itself are still resolved; large moves
        # (where expm1 could overflow) take the direct difference
        delta = torch.log1p((pj * torch.expm1(z)).sum(2))
        far = z.abs().amax(2) > 30.0
        if bool(far.any()):
            delta = torch.where(far, torch.logsumexp(lpj + z, dim=2), delta)
        p = torch.exp_(z.add_(lpj).sub_(delta[:, :, None]))
        df = delta.mean(1) - tj * dy[j] + tj * pen_lin[j] + 0.5 * tj * tj * pen_quad[j]
        dphi = (p * dj).sum((1, 2)) / n - dy[j] + pen_lin[j] + tj * pen_quad[j]
        armijo = df <= ARMIJO_C1 * tj * slope[j]
        curv = dphi >= WOLFE_C2 * slope[j]
        ja = j[armijo]  # remember the latest point with sufficient decrease
        found[ja], t_ok[ja], df_ok[ja] = True, tj[armijo], df[armijo]
        res[ja] = (p[armijo] - onehot) / n
        todo[j[armijo & curv]] = False
        shrink, grow = ~armijo, armijo & ~curv
        hi[j[shrink]], dhi[j[shrink]] = tj[shrink], dphi[shrink]
        lo[j[grow]], dlo[j[grow]] = tj[grow], dphi[grow]
        # next trial: the secant zero of phi' inside a finite bracket, else 4x further
        frac = torch.where(dhi > dlo, dlo / (dlo - dhi), torch.full_like(dlo, 0.5)).clamp(0.1, 0.9)
        t = torch.where(torch.isfinite(hi), lo + frac * (hi - lo), 4.0 * lo.clamp_min(t))
    return _Step(found, t_ok, df_ok, res)


def _use_bf16(matmul: str, dtype: torch.dtype, dev: torch.device, entries: int) -> bool:
    if matmul not in MATMUL_MODES:
        raise ValueError(f"matmul must be one of {', '.join(MATMUL_MODES)}, got {matmul!r}")
    if matmul == "auto":
        return dtype == torch.float32 and entries >= AUTO_BF16_MIN_ENTRIES and fast_bf16_matmul(dev)
    return matmul == "bf16"


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
    matmul: str = "auto",
    rank_rtol: float = 1e-12,
    stall_patience: int = 10,
    basis: tuple[torch.Tensor, torch.Tensor] | None = None,
    precond_rows: int = 65536,
    wave_stride: int = 5,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = False,
) -> PathFit:
    """Fit one multinomial L2 logistic regression per ``lambdas`` entry (``C = 1 / lambda``).

    Batched preconditioned L-BFGS with an exact weak-Wolfe line search on the kept logits.
    The path is solved in two waves: anchors (every ``wave_stride``-th model from the
    strongest, and the weakest) from zero, then all the others at once, each started between
    its two bracketing anchors (``wave_stride=1``: all from zero); ``init`` (coefficients
    M x D x K, intercepts M x K) starts every model from given values instead (e.g. the refit
    on train + validation from the path's solution).

    ``tol`` is the certificate's relative tolerance (module docstring): a model is converged
    when ``rel <= tol`` after at least one checked step. ``matmul``: ``"exact"`` computes every
    product in ``dtype``; ``"bf16"`` computes them from a bf16 copy of the features until the
    bf16 certificate reaches ``max(tol, BF16_RTOL)``, then re-evaluates that fit exactly and
    continues exactly if needed; ``"auto"`` picks ``"bf16"`` for float32 problems of at least
    2**22 entries on devices with fast bf16 products. Every model runs until it is certified
    or ``max_iter`` iterations; line-search failures, or ``stall_patience`` steps in a row
    that neither lower the objective by a relative 1e-10 (1e-15 in float64) nor reach a new
    smallest ``rel`` (the precision is exhausted), end that model's fit; it is reported as
    converged only if its exact certificate meets ``tol``. ``rank_rtol``: with N < D,
    eigenvalues of the centred Gram matrix at most ``rank_rtol`` times the largest count as
    its null space (dropped directions then hold a gradient of at most ``sqrt(rank_rtol)``
    of the certificate's scale). ``basis`` (a full rotation and variances from an earlier
    fit, :attr:`PathFit.basis`) skips the eigendecomposition; ``precond_rows`` caps the rows
    used to estimate the covariance (preconditioner only). Memory: the features (plus a bf16
    copy; float64 N x D and N x N temporaries when N < D) and every model's logits, M x N x K
    float64, three times over in the line search (36 MB each for 45 models x 20,000 rows x 5
    classes).
    """
    dev = torch.device(resolve_device(device))
    yv = np.asarray(y, dtype=np.int64)
    k = int(num_classes if num_classes is not None else yv.max() + 1)
    if k < 2:
        raise ValueError("logistic regression needs at least two classes")
    xt = torch.as_tensor(np.asarray(x), dtype=dtype, device=dev)
    if not torch.isfinite(xt).all():
        raise ValueError("features contain NaN or infinite values")
    use_bf16 = _use_bf16(matmul, dtype, dev, xt.numel())
    yt = torch.as_tensor(yv, device=dev)
    lam = torch.as_tensor(np.asarray(lambdas, dtype=np.float64), device=dev)
    m = lam.numel()
    if basis is not None:
        basis = (torch.as_tensor(basis[0], dtype=dtype, device=dev), torch.as_tensor(basis[1], dtype=dtype, device=dev))
        if basis[0].shape != (xt.shape[1], xt.shape[1]) or basis[1].shape != (xt.shape[1],):
            raise ValueError(f"basis must be a full D x D orthonormal matrix and D variances, "
                             f"got {tuple(basis[0].shape)}, {tuple(basis[1].shape)}")
    prob = _Problem(xt, yt, k, lam, rank_rtol, basis, precond_rows, torch.bfloat16 if use_bf16 else None)
    r = prob.r

    shape = (m, r + 1, k)
    u = torch.zeros(shape, dtype=dtype, device=dev)
    logits = torch.zeros((m, prob.n, k), dtype=torch.float64, device=dev)  # every model's logits, kept
    rows = torch.zeros((m, k, prob.a.shape[1]), dtype=dtype, device=dev)  # weights in the layout of `a`, kept
    f = torch.zeros(m, dtype=torch.float64, device=dev)
    g = torch.zeros(shape, dtype=dtype, device=dev)  # gradient in the scaled variables
    gmax = torch.full((m,), float("inf"), dtype=dtype, device=dev)
    rel = torch.full((m,), float("inf"), dtype=dtype, device=dev)  # certificate statistic
    bound = torch.full((m,), float("inf"), dtype=dtype, device=dev)
    tried = torch.zeros(m, dtype=torch.bool, device=dev)  # at least one checked step taken
    # L-BFGS memory, model-major so one gather per iteration fetches every active model's pairs
    s_hist = torch.zeros((m, history) + shape[1:], dtype=dtype, device=dev)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros((m, history), dtype=torch.float64, device=dev)
    n_mem = torch.zeros(m, dtype=torch.long, device=dev)  # valid pairs per model
    head = torch.zeros(m, dtype=torch.long, device=dev)  # next slot to write, per model
    n_iter = torch.zeros(m, dtype=torch.long, device=dev)
    active = torch.zeros(m, dtype=torch.bool, device=dev)
    low = torch.zeros(m, dtype=torch.bool, device=dev)  # model currently uses bf16 products
    pending = torch.zeros(m, dtype=torch.bool, device=dev)  # bf16 fit waiting for its exact check
    stalled = torch.zeros(m, dtype=torch.bool, device=dev)
    no_gain = torch.zeros(m, dtype=torch.long, device=dev)
    best_rel = torch.full((m,), float("inf"), dtype=dtype, device=dev)
    # relative decrease of f below which a step counts as no progress
    stall_rtol = 1e-10 if dtype == torch.float32 else 1e-15

    def evaluate_exactly(ids: torch.Tensor) -> None:
        """Logits, objective and gradient of models ``ids`` from their weights, in ``dtype``."""
        w = u[ids] * prob.scale[ids]
        wz, b = w[:, :r, :], w[:, r, :]
        rows[ids] = prob.to_rows(wz)
        exact = torch.zeros(ids.numel(), dtype=torch.bool, device=dev)
        logits[ids] = prob.logits(rows[ids], b, exact)
        nll, res = prob.residuals(logits[ids])
        gw, gmax[ids], rel[ids], bound[ids] = prob.gradients(res, wz, rows[ids], ids, exact)
        f[ids] = nll + 0.5 * prob.lam_n[ids].double() * (wz.double() ** 2).sum((1, 2))
        g[ids] = gw * prob.scale[ids]
        low[ids] = False
        no_gain[ids] = 0
        best_rel[ids] = rel[ids]

    def finished(ids: torch.Tensor) -> torch.Tensor:
        target = torch.where(low[ids], max(tol, BF16_RTOL), tol)
        return ((rel[ids] <= target) & tried[ids]) | stalled[ids] | (n_iter[ids] >= max_iter)

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
    for wave in _waves(lam.cpu().numpy(), wave_stride):
        wi = torch.as_tensor(wave.models, device=dev)
        if wave.lo is not None:  # warm start between the two solved anchors that bracket it
            lo, hi = torch.as_tensor(wave.lo, device=dev), torch.as_tensor(wave.hi, device=dev)
            t = torch.as_tensor(wave.t, dtype=dtype, device=dev)[:, None, None]
            u[wi] = ((1 - t) * u[lo] * prob.scale[lo] + t * u[hi] * prob.scale[hi]) / prob.scale[wi]
        evaluate_exactly(wi)
        active[wi] = True
        low[wi] = use_bf16
        if bar is not None:
            bar.update(int((~active[wi]).sum()))
        while True:
            if not bool(active.any()):
                # bf16 fits that met tol (or gave up) are checked together, exactly; those
                # whose exact gradient misses tol go on with exact products
                if not bool(pending.any()):
                    break
                ids = torch.nonzero(pending).flatten()
                pending[ids] = False
                evaluate_exactly(ids)
                again = ~finished(ids)
                active[ids[again]] = True
                if bar is not None:
                    bar.update(int((~again).sum()))
                continue
            idx = torch.nonzero(active).flatten()
            p = -_lbfgs_product(g[idx], s_hist[idx], y_hist[idx], rho[idx], head[idx], n_mem[idx])
            g0 = g[idx]
            gp = _dot(g0, p)
            bad = gp >= 0  # not a descent direction: fall back to steepest descent
            if bool(bad.any()):
                p[bad] = -g0[bad]
                gp = torch.where(bad, -_dot(g0, g0), gp)

            # the direction's logits (one pass over X), then an exact line search along them
            scale = prob.scale[idx]
            u0 = u[idx]
            wz = (u0 * scale)[:, :r, :]
            pw = p * scale
            pwz = pw[:, :r, :]
            d_rows = prob.to_rows(pwz)
            lowi = low[idx]
            d = prob.logits(d_rows, pw[:, r, :], lowi)
            lam_i = prob.lam_n[idx].double()
            step = _line_search(logits[idx], d, prob.onehot, gp, lam_i * _dot(wz, pwz), lam_i * _dot(pwz, pwz))
            acc = torch.nonzero(step.ok).flatten()
            acc_idx = idx[acc]
            f0 = f[idx].clone()
            if acc.numel():
                t = step.t[acc]
                s_vec = t.to(dtype)[:, None, None] * p[acc]
                u_new = u0[acc] + s_vec
                logits[acc_idx] += t[:, None, None] * d[acc]
                rows[acc_idx] += t.to(dtype)[:, None, None] * d_rows[acc]
                gw_new, gmax[acc_idx], rel[acc_idx], bound[acc_idx] = prob.gradients(step.res[acc], (u_new * scale[acc])[:, :r, :], rows[acc_idx],
                                                       acc_idx, lowi[acc])
                g_new = gw_new * scale[acc]
                y_vec = g_new - g0[acc]
                sy_new = _dot(s_vec, y_vec)
                good = sy_new > 1e-10 * _dot(s_vec, s_vec).sqrt() * _dot(y_vec, y_vec).sqrt()
                slot = head[acc_idx]
                gi = acc_idx[good]
                s_hist[gi, slot[good]] = s_vec[good]
                y_hist[gi, slot[good]] = y_vec[good]
                rho[gi, slot[good]] = 1.0 / sy_new[good]
                head[gi] = (head[gi] + 1) % history
                n_mem[gi] = (n_mem[gi] + 1).clamp(max=history)
                u[acc_idx] = u_new
                f[acc_idx] = f0[acc] + step.df[acc]
                g[acc_idx] = g_new
                n_iter[acc_idx] += 1
            # `stall_patience` steps in a row that neither lower f by a relative `stall_rtol`
            # nor reach a new smallest gradient: the floating point precision is exhausted
            gain = (f0 - f[idx]) / f0.abs().clamp_min(1e-300)
            tried[idx] = True
            progress_made = step.ok & ((gain > stall_rtol) | (rel[idx] < best_rel[idx]))
            best_rel[idx] = torch.minimum(best_rel[idx], rel[idx])
            no_gain[idx] = torch.where(progress_made, 0, no_gain[idx] + 1)
            stuck = ~step.ok | (no_gain[idx] >= stall_patience)
            # a bf16 fit that meets tol, gets stuck or runs out of iterations waits for its exact check
            stalled[idx[stuck & ~lowi]] = True
            end = finished(idx) | stuck
            pending[idx[end & lowi]] = True
            active[idx[end]] = False
            newly = int((end & ~lowi).sum())
            if bar is not None and newly:
                bar.update(newly)
    if bar is not None:
        bar.close()
    converged = (rel <= tol) & tried
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
        rel_grad=rel.double().cpu().numpy(),
        dist_bound=bound.double().cpu().numpy(),
        tol=float(tol),
        device=str(dev),
        matmul="bf16" if use_bf16 else "exact",
        basis=(prob.v, prob.var) if prob.r == prob.d else None,
    )
