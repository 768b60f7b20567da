"""HOLD samplers (``math-hold.md`` 6): Euler-Maruyama, fused order-n SSCS, probability-flow ODE.

Every sampler is a table of per-step (K_i, k_i, C_i) built on the host in float64 and one fused
``hold_transition`` launch per network evaluation: ``z <- K_i z + k_i eps_hat + C_i eta``. The network
(``model(z, t) -> eps_hat``, z (B, n*C, ...), t a Python float forward time, eps_hat (B, C, ...)) is
evaluated at the start-of-step forward time s_i, as in CLD's samplers.

Time grid (forward time, N loop steps): linear s_i = T - (i/N)(T - t_min), or quadratic striding
s_i = t_min + (T - t_min)(1 - i/N)^2 (CLD's "QS"). With ``denoise`` the last NFE is one EM step of
length t_min keeping the mean (6.4), so ``num_steps`` NFE = N + 1. b_i = int_{s_{i+1}}^{s_i} beta.

* EM (6.1):    K = I - b F,  k = -b (2 xi / L) / L_nn(s_i) e_n,  C = sqrt(2 xi b / L) E_nn
* SSCS (6.2), fused: the first A half-step acts on the exact stationary prior and is skipped; after
  network call i:  K = A(p_i) D_i,  k = A(p_i) c_i,  C = chol(Q_A(p_i)) with
  D_i = I + 2 xi b_i E_nn, c_i = -(2 xi b_i / L) / L_nn(s_i) e_n, p_i = b_i / 2 + b_{i+1} / 2 (last: b/2)
* ODE (5), Euler: K = I - b F,  k = -b (xi / L) / L_nn(s_i) e_n,  C = 0
* ODE (5), exponential Euler ("ode_exp"): with F = S_k - xi E_nn (S_k skew) the reverse-time drift is
  -S_k z + (xi / L)(s_n + L z_n) e_n; the rotation is integrated exactly and the second term frozen at
  the step start: K = R + xi psi e_n^T,  k = -(xi / L) / L_nn(s_i) psi,  C = 0 with R = exp(-S_k b) and
  psi = int_0^b exp(-S_k v) dv e_n, both from one (n+1)x(n+1) matrix exponential (Van Loan)
* ODE, DDIM-like ("ode_flow", :mod:`diffkern.hold_flow`): the x0 prediction frozen over the step, z moved by
  the exact probability-flow map of N(E(t)(x0_hat, 0, ..), Sigma_t): K = A + g w_z^T, k = w_eps g, C = 0;
  its denoising row is that flow from t_min to t = 0 (x out = x0_hat), not the EM step

The prior is z ~ N(0, I / L), drawn from the Philox stream at counter ``PRIOR_STEP``; step i of the
loop draws at counter i.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from . import sampler_loop, samplers
from .hold import HOLD
from .hold_flow import flow_rows
from .hold_stability import check_euler_ode
from .ops import _checks
from .ops.hold import hold_transition, transition_table
from .ops.philox import randn

SAMPLERS = ("em", "sscs", "ode", "ode_exp", "ode_flow")
SPACINGS = ("linear", "quadratic")
PRIOR_STEP = 2**32 - 1  # Philox counter of the prior draw; table rows use counters 0..N

#----------------------------------------------------------------------------
# Time grid and per-step tables (host, float64).


def time_grid(proc: HOLD, steps: int, *, t_min: float = 1e-3, spacing: str = "linear") -> torch.Tensor:
    """Forward times s_0 = T > s_1 > ... > s_steps = t_min, float64 (steps + 1,) on the CPU."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:  # numpy ints too
        raise ValueError(f"steps: expected a Python int >= 1, got {steps!r}")
    if isinstance(t_min, bool) or not (isinstance(t_min, numbers.Real) and 0 < t_min < proc.T):
        raise ValueError(f"t_min: expected 0 < t_min < T = {proc.T}, got {t_min!r}")
    steps, t_min = int(steps), float(t_min)  # numpy scalars as Python's: np.float32 arithmetic would stay float32
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    if spacing == "linear":
        return proc.T - u * (proc.T - t_min)
    return t_min + (proc.T - t_min) * (1 - u) ** 2


def _last(n: int, N: int) -> torch.Tensor:
    e = torch.zeros(N, n, dtype=torch.float64)
    e[:, n - 1] = 1.0
    return e


def _steps(proc: HOLD, grid: torch.Tensor):
    b = proc.int_beta(grid[:-1]) - proc.int_beta(grid[1:])  # (N,) integrated beta per step
    lnn = proc.score_scale(grid[:-1])  # (N,) L_t[n, n] at the score times
    return b, lnn


def euler_rows(proc: HOLD, b: torch.Tensor, lnn: torch.Tensor, score_weight: float):
    """K = I - b F, k = -b (score_weight xi / L) / L_nn e_n for each step: score_weight 2 (SDE) or 1 (ODE)."""
    n, N = proc.order, b.numel()
    K = torch.eye(n, dtype=torch.float64) - b[:, None, None] * proc.F
    k = _last(n, N) * (-b * score_weight * proc.xi / proc.L / lnn)[:, None]
    return K, k


def exp_ode_rows(proc: HOLD, b: torch.Tensor, lnn: torch.Tensor):
    """K = R + xi psi e_n^T, k = -(xi / L) / L_nn psi per step: the exponential-Euler probability-flow ODE step.
    b, lnn: (N,) float64 integrated beta and L_t[n, n] at each step's start; returns K (N, n, n), k (N, n) float64.

    exp(b [[-S_k, e_n], [0, 0]]) = [[R, psi], [0, 1]] with R = exp(-S_k b) and psi = int_0^b exp(-S_k v) dv e_n,
    so the exact rotation and its phi-integral come from one float64 matrix exponential per step, no quadrature.
    Euler's I - b S_k has eigenvalues 1 +- i b omega (+- i omega those of S_k), of modulus > 1: it spirals out.
    """
    n, N = proc.order, b.numel()
    skew = proc.F.clone()
    skew[n - 1, n - 1] += proc.xi  # S_k = F + xi E_nn
    aug = torch.zeros(N, n + 1, n + 1, dtype=torch.float64)
    aug[:, :n, :n] = -b[:, None, None] * skew
    aug[:, n - 1, n] = b
    X = torch.linalg.matrix_exp(aug)
    R, psi = X[:, :n, :n], X[:, :n, n]
    K = R.clone()
    K[:, :, n - 1] += proc.xi * psi  # the frozen term's xi z_n
    k = psi * (-proc.xi / proc.L / lnn)[:, None]  # and its (xi / L) s_n, s_n = -eps_hat / L_nn
    return K, k


def denoise_row(proc: HOLD, t_min: float):
    """(K, k, C) of the final denoising step: EM of length t_min, mean only (``math-hold.md`` 6.4); shapes (1, n, ...)."""
    b = torch.tensor([proc.int_beta(float(t_min))], dtype=torch.float64)
    K, k = euler_rows(proc, b, proc.score_scale(torch.tensor([float(t_min)], dtype=torch.float64)), 2.0)
    return K, k, torch.zeros_like(K)


def sampler_table(proc: HOLD, grid: torch.Tensor, sampler: str = "sscs", *, denoise: bool = True) -> torch.Tensor:
    """The float64 (N [+1], n, 2n+1) ``hold_transition`` table of ``sampler`` on ``grid`` (CPU)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if denoise not in (True, False):  # a truthy string would silently add the denoising row
        raise TypeError(f"denoise: expected a bool, got {denoise!r}")
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() < 2 or not grid.is_floating_point():
        got = f"{grid.dtype} of shape {tuple(grid.shape)}" if isinstance(grid, torch.Tensor) else type(grid).__name__
        raise ValueError(f"grid: expected a 1-D float tensor of >= 2 forward times, got {got}")
    grid = grid.to("cpu", torch.float64)  # b = int beta over a step: differences of times, so float64 times
    if not (torch.isfinite(grid).all() and (grid[1:] < grid[:-1]).all() and grid[-1] > 0):
        raise ValueError(f"grid: expected finite, strictly decreasing forward times ending > 0, got {grid.tolist()}")
    n = proc.order
    if sampler == "ode_flow":  # its own denoising row: the flow to t = 0
        K, k = flow_rows(proc, grid, denoise=denoise)
        return transition_table(K, k, torch.zeros_like(K))
    b, lnn = _steps(proc, grid)
    N = b.numel()
    if sampler == "em":
        K, k = euler_rows(proc, b, lnn, 2.0)
        C = torch.zeros(N, n, n, dtype=torch.float64)
        C[:, n - 1, n - 1] = torch.sqrt(2 * proc.xi * b / proc.L)
    elif sampler in ("ode", "ode_exp"):
        if sampler == "ode":  # warns where Euler's step inflates the drift's fastest rotation (host data only)
            check_euler_ode(proc.F, proc.xi, b)
        K, k = euler_rows(proc, b, lnn, 1.0) if sampler == "ode" else exp_ode_rows(proc, b, lnn)
        C = torch.zeros(N, n, n, dtype=torch.float64)
    else:
        post = 0.5 * b + 0.5 * torch.cat([b[1:], b.new_zeros(1)])  # merged A half-steps
        A = proc.a_transition(post)  # (N, n, n)
        D = torch.eye(n, dtype=torch.float64).repeat(N, 1, 1)
        D[:, n - 1, n - 1] += 2 * proc.xi * b
        K = A @ D
        k = A[:, :, n - 1] * (-2 * proc.xi * b / proc.L / lnn)[:, None]
        C = proc.a_chol(post)  # chol_psd(a_cov) up to F64_MAX_ORDER, extended precision above
    if denoise:
        Kd, kd, Cd = denoise_row(proc, float(grid[-1]))
        K, k, C = torch.cat([K, Kd]), torch.cat([k, kd]), torch.cat([C, Cd])
    return transition_table(K, k, C)

#----------------------------------------------------------------------------
# The sampling loop.


def prior(proc: HOLD, state_shape, seed: torch.Tensor, *, dtype=torch.float32, backend=None) -> torch.Tensor:
    """z_T ~ N(0, I / L), shape ``state_shape`` (B, n*C, ...), from the Philox stream at ``PRIOR_STEP``."""
    z = randn(state_shape, seed, step=PRIOR_STEP, dtype=dtype, backend=backend)
    return z.mul_(1.0 / math.sqrt(proc.L))


def check_args(model, proc, shape, num_steps, denoise, return_state=False) -> None:
    """:func:`sample`'s arguments (and :func:`diffkern.graphs.sample_hold`'s), checked before any work."""
    if return_state not in (True, False):  # a truthy string would silently return the whole state
        raise TypeError(f"return_state: expected a bool, got {return_state!r}")
    if not isinstance(proc, HOLD):
        raise TypeError(f"proc: expected a diffkern.hold.HOLD process, got {type(proc).__name__}")
    if not callable(model):
        raise TypeError(f"model: expected a callable model(z, t) -> eps_hat, got {type(model).__name__}")
    check_call(shape, num_steps, denoise)


def check_call(shape, num_steps, denoise) -> None:
    """Raise unless ``shape`` is a data shape (B, C, ...) of >= 2 non-negative ints and ``num_steps`` an int that
    leaves at least one step before the final denoising call."""
    if denoise not in (True, False):  # int(denoise) below: "False" raised about int(), 2 ran off the table
        raise TypeError(f"denoise: expected a bool, got {denoise!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1 + int(denoise):
        raise ValueError(f"num_steps: expected a Python int >= {1 + int(denoise)}, got {num_steps!r}")
    if not isinstance(shape, (tuple, list)):  # torch.Size is a tuple; an int or a tensor has no data shape to read
        raise TypeError(f"shape: expected the data shape (B, C, ...) as a tuple of ints, got {type(shape).__name__}")
    if len(shape) < 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0
                                 for s in shape):
        raise ValueError(f"shape: expected the data shape (B, C, ...) of >= 2 non-negative ints, got {tuple(shape)}")


def _check_output(eps, z: torch.Tensor, channels: int) -> None:
    # Checked here so that the error names the model: the op would name its own argument (eps_hat) or, for a view of
    # the state, an ``out`` the caller never passed.
    if not isinstance(eps, torch.Tensor) or not eps.is_floating_point():
        got = f"dtype {eps.dtype}" if isinstance(eps, torch.Tensor) else type(eps).__name__
        raise TypeError(f"model: expected a floating tensor eps_hat (B, C, ...), got {got}")
    want = (z.shape[0], channels, *z.shape[2:])
    if tuple(eps.shape) != want:
        raise ValueError(f"model: expected eps_hat of the data shape {want} (C = state channels / order), got "
                         f"{tuple(eps.shape)}")
    if eps.numel() and eps.untyped_storage().data_ptr() == z.untyped_storage().data_ptr():
        raise ValueError("model: returned a view of its input z (the state, which the step overwrites in place); "
                         "return a new tensor (e.g. .clone())")


@torch.no_grad()  # as graphs.sample_hold: the fused ops have no autograd, the reference op would chain every step
def sample(model: Callable, proc: HOLD, shape, *, sampler: str = "sscs", num_steps: int = 500,
           spacing: str = "linear", t_min: float = 1e-3, denoise: bool = True, seed=0, device=None,
           dtype=torch.float32, z=None, backend=None, return_state: bool = False) -> torch.Tensor:
    """Sample with ``num_steps`` network evaluations; returns x (B, C, ...) (the state if ``return_state``).

    Args:
        model: ``model(z, t) -> eps_hat``; z (B, n*C, ...) in ``dtype``, t a Python float, eps_hat (B, C, ...).
        proc: the HOLD process the model was trained for.
        shape: data shape (B, C, ...).
        sampler: "em" | "sscs" | "ode" (Euler) | "ode_exp" (exponential Euler) | "ode_flow" (DDIM-like).
        spacing: "linear" | "quadratic" (time grid).
        seed: int64 tensor (1,) or (B,) (or an int) keying the Philox stream; default 0 (repeated calls are
            identical); None draws one from torch's global CPU generator, as :func:`diffkern.sample` does.
        z: optional initial state (B, n*C, ...) instead of the prior draw (updated in place); its device and dtype
            replace ``device`` and ``dtype``.
        backend: ``hold_transition`` (and prior) backend.
    """
    check_args(model, proc, shape, num_steps, denoise, return_state)
    num_steps, shape = int(num_steps), tuple(int(s) for s in shape)  # numpy ints (checked above) as Python's
    n = proc.order
    steps = num_steps - int(denoise)
    grid = time_grid(proc, steps, t_min=t_min, spacing=spacing)
    # named here: a bad z failed on a missing attribute, a bad dtype in the op naming its ``out``
    if z is not None:
        _checks.float_tensor(z, "z")
        device, dtype = z.device, z.dtype
    elif dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {[str(d) for d in _checks.FLOAT_DTYPES]}, got {dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    seed = samplers.seed_value(seed, shape[0])  # validated; None: drawn on the host
    seed = seed.to(device) if isinstance(seed, torch.Tensor) else torch.tensor([seed], dtype=torch.int64, device=device)
    table = sampler_table(proc, grid, sampler, denoise=denoise).to(device)
    state_shape = (shape[0], n * shape[1], *shape[2:])
    if z is None:
        z = sampler_loop.tracked(prior, proc, state_shape, seed, dtype=dtype, backend=backend)
    elif tuple(z.shape) != state_shape:
        raise ValueError(f"z: expected shape {state_shape}, got {tuple(z.shape)}")
    ts = grid.tolist()
    for i in range(steps + int(denoise)):
        version = sampler_loop.input_version(z)
        eps = model(z, ts[min(i, steps)])
        sampler_loop.check_input_kept(z, version, "z")  # the step below would read the corrupted state
        if i == 0:
            _check_output(eps, z, shape[1])
        hold_transition(z, eps, table, i, seed=seed, out=z, backend=backend)
    return z if return_state else z[:, : shape[1]]

#----------------------------------------------------------------------------
# Exact-score model for Gaussian-mixture data (``math-hold.md`` 10.2): a network stand-in.


class GaussianMixture:
    """Isotropic mixture sum_k pi_k N(m_k, sigma_k^2 I_d); weights (K,), means (K, d), stds (K,), float64."""

    def __init__(self, weights, means, stds):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        if self.means.dim() == 1:
            self.means = self.means[:, None]
        K = self.weights.numel()
        if self.means.shape[0] != K or self.stds.shape != (K,):
            raise ValueError(f"means, stds: expected (K, d) and (K,) with K = {K}, got "
                             f"{tuple(self.means.shape)}, {tuple(self.stds.shape)}")
        if not (self.weights > 0).all() or abs(float(self.weights.sum()) - 1) > 1e-12 or not (self.stds > 0).all():
            raise ValueError("weights: expected positive weights summing to 1 and stds > 0")

    def sample(self, num: int, generator=None) -> torch.Tensor:
        """(num, d) float64 draws."""
        k = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        noise = torch.randn(num, self.means.shape[1], dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k, None] * noise

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        """CDF of a 1-D mixture (d = 1) at x (float64)."""
        z = (x.double()[..., None] - self.means[:, 0]) / self.stds
        return (self.weights * torch.special.ndtr(z)).sum(-1)


class GaussianMixtureScore:
    """Exact ``model(z, t) -> eps_hat`` for data ~ ``mixture`` under ``proc`` (HSM joint target, 10.2).

    A sample's data is x in R^d with d = C * prod(rest) flattened from (C, *rest); the forward marginal
    is sum_k pi_k N(a (x) m_k, V_k (x) I_d), a = E(t) e_1, V_k = sigma_k^2 a a^T + E D_alpha E^T + Q(t).
    eps_hat = -L_t[n, n] s_n uses the same jittered L_t as the sampler tables. Math in float64.
    ``elementwise=True`` (1-D mixtures only) treats every data element as an independent sample, so a
    (1, C, H, W) state carries C*H*W draws.
    """

    def __init__(self, proc: HOLD, mixture: GaussianMixture, *, elementwise: bool = False):
        if elementwise not in (True, False):
            raise TypeError(f"elementwise: expected a bool, got {elementwise!r}")
        if elementwise and mixture.means.shape[1] != 1:
            raise ValueError("elementwise: needs a 1-D mixture (means of shape (K, 1))")
        self.proc, self.mix, self.elementwise = proc, mixture, elementwise

    def marginal(self, t: float):
        """(a (n,), V (K, n, n)) of the forward marginal at forward time t."""
        p = self.proc
        E = p.transition(float(t))
        d_alpha = torch.full((p.order,), p.alpha / p.L, dtype=torch.float64)
        d_alpha[0] = 0.0
        R = E @ torch.diag(d_alpha) @ E.T + p.gramian(float(t))
        a = E[:, 0]
        return a, self.mix.stds[:, None, None] ** 2 * torch.outer(a, a) + R

    def __call__(self, z: torch.Tensor, t: float) -> torch.Tensor:
        n, B = self.proc.order, z.shape[0]
        cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
        a, V = self.marginal(t)
        P = torch.linalg.inv(V).to(z.device, cdt)  # (K, n, n)
        logdet = torch.linalg.slogdet(V)[1].tolist()
        zr = z.to(cdt).reshape(B, n, math.prod(z.shape[1:]) // n)  # (B, n, d); explicit d: B may be 0
        if self.elementwise:
            zr = zr.transpose(1, 2).reshape(-1, n, 1)  # (B*d, n, 1): every element its own sample
        samples, d = zr.shape[0], zr.shape[2]
        if self.mix.means.shape[1] != d:
            raise ValueError(f"z: data dimension {d} does not match the mixture's {self.mix.means.shape[1]}")
        Z = zr.permute(1, 0, 2)  # (n, samples, d)
        am = (a[None, :, None] * self.mix.means[:, None, :]).to(z.device, cdt)  # (K, n, d) means of z
        logw, s_parts = [], []
        for k in range(self.mix.weights.numel()):
            diff = (Z - am[k][:, None, :]).reshape(n, samples * d)
            y = P[k] @ diff  # one (n x n) @ (n x samples*d) product per component
            quad = (diff * y).sum(0).reshape(samples, d).sum(1)  # (samples,)
            logw.append(quad.mul_(-0.5).add_(math.log(float(self.mix.weights[k])) - 0.5 * d * logdet[k]))
            s_parts.append(y[n - 1].reshape(samples, d))
        w = torch.softmax(torch.stack(logw), dim=0)  # (K, samples) responsibilities; dim 0: 10x faster than dim 1
        s_n = w[0, :, None] * s_parts[0]
        for k in range(1, len(s_parts)):
            s_n = s_n + w[k, :, None] * s_parts[k]
        eps = s_n * float(self.proc.score_scale(float(t)))  # eps_hat = -L_nn s_n, s_n = -sum_k w_k y_k[n]
        return eps.reshape(z.shape[0], z.shape[1] // n, *z.shape[2:]).to(z.dtype)
