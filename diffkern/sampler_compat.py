"""k-diffusion parity of the sampler loop (:mod:`diffkern.sampler_loop`): which samplers take a zero-length step (a
repeated sigma), and the ``noise_sampler`` argument of k-diffusion's ancestral and SDE samplers: where each sampler
calls it, at which pair of sigmas, and the checks on what it returns.

A ``noise_sampler(sigma, sigma_next) -> tensor like x`` replaces the Philox stream: the loop calls it on the host
between the model call and the fused update, exactly where k-diffusion's ``sample_<method>`` calls it (same steps,
same order, same pair of sigmas: 0-d tensors on a floating tensor schedule's device in its dtype, else float64 CPU,
:func:`noise_sigmas`), and passes what it returns to the fused op as its ``noise``. So where a step also reports,
the draw precedes the callback (k-diffusion calls the callback first): the callback's ``denoised`` comes out of that
same fused launch, and a split noise pass would cost a second pass over x and make the result depend on whether a
callback is given. It cannot run inside a CUDA graph replay (a Python call): graph paths refuse it; use ``seed=``
there.
"""
from __future__ import annotations

import math

import torch

from . import coef_tables_dpm_fast
from .ops import coefs

#----------------------------------------------------------------------------
# Zero-length steps.

REPEATS_OK = frozenset({"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                        "dpmpp_sde", "lcm", "ge", "sde", "heun_flow", "ipndm", "plms"})
"""Samplers whose step from sigma to sigma_next = sigma is defined (k-diffusion runs such schedules): one-step
methods whose update at h = 0 is finite (the identity for the ODE ones, heun_flow's too; lcm re-noises its D, ge and
sde keep their history of eps at that sigma), and ipndm and plms, whose Adams-Bashforth weights are the constant
equal-step ones: x' = x + (sigma' - sigma)*(weighted eps) is the identity, and the step's eps joins the history
(ComfyUI's ipndm pushes it so). The others divide by the step (log-sigma multistep ratios h_last/h, Lagrange or
Adams weights over repeated nodes, ipndm_v's step ratios, dpm_fast's grid) and refuse a repeated sigma."""


def check_repeats(sigmas: list, method: str | None) -> None:
    """Raise ValueError naming ``method`` and the value unless every repeated value of the non-increasing host
    schedule ``sigmas`` is a zero-length step ``method`` can take (:data:`REPEATS_OK`). A repeated 0 is refused for
    every method: a step from sigma = 0, where the model and the conversions are not defined."""
    for i in range(len(sigmas) - 1):
        if sigmas[i + 1] != sigmas[i]:
            continue
        if sigmas[i] == 0:
            raise ValueError(f"sigmas: sigmas[{i}] = sigmas[{i + 1}] = 0 is a step from sigma = 0, where the model is "
                             "not defined; end the schedule at its first 0")
        if method not in REPEATS_OK:
            who = f" for sampler {method!r}" if method else ""
            raise ValueError(f"sigmas: must be strictly decreasing{who}, which cannot take a zero-length step (its "
                             f"coefficients divide by the step length), but sigmas[{i}] = sigmas[{i + 1}] = "
                             f"{sigmas[i]!r} is repeated; the samplers that take one: {sorted(REPEATS_OK)}")

#----------------------------------------------------------------------------
# noise_sampler: where each sampler calls it.

NOISE_SAMPLERS = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
                  "dpmpp_3m_sde", "lcm", "dpm_fast", "res_multistep", "res_multistep_ancestral", "er_sde",
                  "dpm_adaptive")
"""The samplers taking ``noise_sampler`` (those whose k-diffusion counterpart has it; lcm, res_multistep(_ancestral)
and er_sde: ComfyUI's, dpm_fast and dpm_adaptive: k-diffusion's ``sample_dpm_fast``/``sample_dpm_adaptive``;
dpm_adaptive calls it on its accepted steps, :mod:`diffkern.samplers_adaptive`, not from a plan)."""


def noise_calls(method: str, sigmas: list, plan, eta: float = 1.0) -> dict:
    """``{(i, first): (sigma, sigma_next)}``: where k-diffusion's ``sample_<method>`` calls its noise_sampler, keyed
    by loop step i and whether the draw goes into that step's first fused update (True) or its second-call update
    (False), with the pair of sigmas it passes. ``sigmas``: the host schedule (N+1 floats); ``plan``: the method's
    unwindowed plan (its branches and second-call sigmas); ``eta``: dpmpp_2m_sde and dpmpp_3m_sde call it only where
    eta != 0, er_sde where its s_noise (passed as ``eta``) is. Every method calls it on steps to sigma_next > 0 only
    (dpm_fast: once per step of its own grid; res_multistep at eta = 0 too, its draw multiplied by 0, as ComfyUI).
    ``method``: one of :data:`NOISE_SAMPLERS`, the samplers whose signature takes a noise_sampler
    (:func:`diffkern.sample` refuses the others by name, before any work)."""
    if method == "dpm_fast":
        return _dpm_fast_calls(sigmas)
    if method == "dpm_adaptive":
        raise ValueError("noise_sampler: dpm_adaptive draws on the steps it accepts as it runs, not from a plan")
    calls = {}
    for i, (s, sn) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if sn == 0 or (method in ("dpmpp_2m_sde", "dpmpp_3m_sde", "er_sde") and not eta):
            continue
        if method == "dpm_2_ancestral":  # only after a second call: sigma_down = 0 is Euler without noise
            if plan.corrector[i]:
                calls[(i, False)] = (s, sn)
        elif method == "dpmpp_2s_ancestral":  # after the second call, or after Euler when sigma_down = 0
            calls[(i, not plan.corrector[i])] = (s, sn)
        elif method == "dpmpp_sde":  # the tree's two increments from sigma: to the second call's sigma, then on
            calls[(i, True)] = (s, plan.row_sigma[plan.corrector_row + i])
            calls[(i, False)] = (s, sn)
        else:
            calls[(i, True)] = (s, sn)
    return calls


def _dpm_fast_steps(sigmas: list) -> tuple[list, list]:
    """(orders, grid): the model calls of each step of dpm_fast's own grid on ``sigmas``, and its sigmas."""
    lo, hi, n = coef_tables_dpm_fast.from_sigmas(sigmas)
    orders = coef_tables_dpm_fast.orders(n)
    return orders, coef_tables_dpm_fast.grid(lo, hi, len(orders))


def _dpm_fast_calls(sigmas: list) -> dict:
    """dpm_fast's calls: one per step of its grid (eta = 0 too, times 0 there), after the step's last model call,
    at the step's grid sigmas."""
    orders, grid = _dpm_fast_steps(sigmas)
    calls, last = {}, -1
    for k, p in enumerate(orders):
        last += p
        calls[(last, True)] = (grid[k], grid[k + 1])
    return calls


def check_covered(plan, calls: dict) -> None:
    """Raise unless every row of ``plan`` that draws noise has its noise_sampler call in ``calls`` (an internal
    invariant: such a row would otherwise draw Philox noise silently)."""
    s = (plan.table[:, coefs.S] != 0).tolist()
    for i in range(plan.steps):
        if plan.churn[i] and s[plan.churn_row + i]:
            raise RuntimeError(f"noise_sampler: step {i} adds churn noise, which k-diffusion draws with randn_like")
        for row, first in ((plan.step_row + i, True), (plan.corrector_row + i, False)):
            if (first or plan.corrector[i]) and s[row] and (i, first) not in calls:
                raise RuntimeError(f"noise_sampler: row {row} (step {i}) draws noise but has no noise_sampler call")

#----------------------------------------------------------------------------
# The sigmas reported to the callback and the noise_sampler (k-diffusion's tensors).


def on_device(given, schedule: list, wanted: list):
    """``get(k) -> 0-d tensor`` of ``wanted[k] = (value, j)``, as k-diffusion's ``sigmas[j]`` or a sigma it computes,
    on a floating tensor ``given``'s device in its dtype, with no host synchronisation in ``get``: ``given[j]`` itself
    (a view) where ``j`` is not None and ``schedule[j] == value`` (the schedule's own element), else an element of
    one table of the other values, moved there here, once, before the loop (a tensor made from a float at each step
    would be a synchronising host-to-device copy). No table at all when every value is the schedule's own.
    ``given``: the schedule as the caller passed it (a floating tensor); ``schedule``: its host float64 copy."""
    given = given.detach()
    own = [j is not None and 0 <= j < len(schedule) and schedule[j] == v for v, j in wanted]
    table = None
    if not all(own):  # churn, dpm_fast's grid, dpmpp_sde's midpoints: values the schedule does not hold
        table = torch.tensor([v for v, _ in wanted], dtype=torch.float64).to(given.device, given.dtype)
    return lambda k: given[wanted[k][1]] if own[k] else table[k]


def floating_tensor(given) -> bool:
    """Whether the reported sigmas follow ``given`` (a floating tensor: its device and dtype) or are float64 CPU."""
    return isinstance(given, torch.Tensor) and given.is_floating_point()


def callback_sigmas(given, schedule: list, sigma_hat: list):
    """``pair(i) -> (sigma, sigma_hat)``, the 0-d tensors step i's callback reports, as k-diffusion's ``sigmas[i]``
    and ``sigma_hat``. Built once per call, before the loop; ``pair`` makes no host synchronisation.

    ``given``: the schedule as the caller passed it; ``schedule``: its host float64 copy (N+1 values), step i
    reporting ``schedule[i]`` (dpm_fast reports its own grid: :class:`DpmFastReport`); ``sigma_hat``: the plan's
    (after churn), N values. A floating tensor ``given`` gets
    tensors on its device in its dtype (:func:`on_device`: ``given[i]`` itself wherever the value is the schedule's
    own). Any other ``given`` (a list, numpy array, integer tensor): float64 CPU tensors, fresh at each step.
    """
    f64 = torch.float64
    if not floating_tensor(given):
        return lambda i: (torch.tensor(schedule[i], dtype=f64), torch.tensor(sigma_hat[i], dtype=f64))
    n = len(sigma_hat)
    get = on_device(given, schedule, [(r, i) for i, r in enumerate(schedule[:n])] +
                    [(h, i) for i, h in enumerate(sigma_hat)])
    return lambda i: (get(i), get(n + i))


def noise_sigmas(given, schedule: list, calls: dict) -> dict:
    """``calls`` (:func:`noise_calls`: ``{(i, first): (sigma, sigma_next)}`` of host floats) with each pair as
    k-diffusion passes it to its noise_sampler: for a floating tensor ``given``, 0-d tensors on its device in its
    dtype, made before the loop (:func:`on_device`; ``sigmas[i]``, ``sigmas[i + 1]`` themselves where the pair is
    the step's, else the float64 value rounded once: dpmpp_sde's midpoint, dpm_fast's grid). Any other ``given``:
    ``calls`` itself (:func:`draw` makes float64 CPU tensors of the floats at each call)."""
    if not floating_tensor(given) or not calls:
        return calls
    keys, wanted = list(calls), []
    for i, first in keys:  # step i's pair is k-diffusion's sigmas[i], sigmas[i + 1] where the values match
        sigma, sigma_next = calls[(i, first)]
        wanted += [(sigma, i), (sigma_next, i + 1)]
    get = on_device(given, schedule, wanted)
    return {key: (get(2 * k), get(2 * k + 1)) for k, key in enumerate(keys)}


class DpmFastReport:
    """What dpm_fast reports, as k-diffusion's ``sample_dpm_fast``: its ``DPMSolver.dpm_solver_fast`` calls
    ``info_callback`` once per step of its own grid, after the step's first model call, with
    ``{'x': x at the step's start, 'i': grid step, 't': ts[i], 't_up': ts[i], 'denoised'}``, which
    ``sample_dpm_fast`` hands on as ``{'sigma': sigma(t), 'sigma_hat': sigma(t_up), **info}``; its noise_sampler gets
    ``(sigma(ts[i]), sigma(ts[i + 1]))``. Its grid is ``ts = torch.linspace(t_start, t_end, m + 1,
    device=x.device)``: the default dtype on x's device whatever the limits' (or the schedule's) dtype and device.
    Here the float64 grid (``sigmas``: ComfyUI's schedule, N + 1 host floats) rounded once to that dtype, moved to x's
    device in one copy before the loop (k-diffusion computes t in that dtype, so its values may differ in the last
    place)."""

    def __init__(self, sigmas: list, x: torch.Tensor):
        orders, grid = _dpm_fast_steps(sigmas)
        self.m = len(grid)
        self.first, call = {}, 0  # loop step (model call) -> grid step it opens
        for k, p in enumerate(orders):
            self.first[call] = k
            call += p
        self.table = torch.tensor(grid + [-math.log(s) for s in grid],
                                  dtype=torch.float64).to(x.device, torch.get_default_dtype())

    def wants(self, i: int) -> bool:
        """Whether loop step (model call) i opens a grid step: the callback runs there only."""
        return i in self.first

    def info(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> dict:
        """The callback's dict at loop step i (one of :meth:`wants`'), k-diffusion's keys in its order."""
        k, tab = self.first[i], self.table
        return {"sigma": tab[k], "sigma_hat": tab[k], "x": x, "i": k, "t": tab[self.m + k], "t_up": tab[self.m + k],
                "denoised": denoised}

    def noise_pairs(self, calls: dict) -> dict:
        """``calls`` (:func:`noise_calls`' for dpm_fast: one per grid step, at its last model call) with each pair the
        grid's two 0-d tensors, in the order of the grid steps."""
        return {key: (self.table[k], self.table[k + 1]) for k, key in enumerate(sorted(calls))}

#----------------------------------------------------------------------------
# noise_sampler: the argument and what it returns.


def check_noise_sampler(noise_sampler, x: torch.Tensor):
    """``noise_sampler`` validated for a loop over ``x``: None or a callable, refused while a CUDA graph is being
    captured (a Python call runs once at capture, not in each replay). Returns it."""
    if noise_sampler is None:
        return None
    if not callable(noise_sampler):
        raise TypeError(f"noise_sampler: expected None or a callable noise_sampler(sigma, sigma_next) -> tensor like "
                        f"x, got {type(noise_sampler).__name__}")
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError("noise_sampler: a Python noise_sampler cannot run inside a CUDA graph replay (it would run "
                         "once, at capture); use seed= (the Philox stream, keyed in device memory) instead")
    return noise_sampler


def draw(noise_sampler, pair: tuple, x: torch.Tensor) -> torch.Tensor:
    """``noise_sampler(sigma, sigma_next)``, checked to be a floating tensor of x's shape on x's device, in x's dtype
    (cast when another floating dtype). ``pair``: two 0-d tensors (:func:`noise_sigmas`), passed as they are, or two
    floats, passed as fresh 0-d float64 CPU tensors."""
    sigma, sigma_next = (v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64) for v in pair)
    noise = noise_sampler(sigma, sigma_next)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        what = f"a tensor of dtype {noise.dtype}" if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise TypeError(f"noise_sampler: expected it to return a floating tensor like x, got {what}")
    if noise.shape != x.shape:
        raise ValueError(f"noise_sampler: expected it to return a tensor of x's shape {tuple(x.shape)}, got "
                         f"{tuple(noise.shape)}")
    if noise.device != x.device:
        raise ValueError(f"noise_sampler: expected it to return a tensor on x's device {x.device}, got {noise.device}")
    return noise.to(x.dtype)
