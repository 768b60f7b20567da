"""iPNDM-v (``ipndm_v``, ComfyUI's ``sample_ipndm_v``): the fused loop against ComfyUI's loop written below in float64
on the exact denoiser of a Gaussian mixture, every CPU backend within the project's tolerance rule, the weights'
properties (exact variable-step AB2; ComfyUI's order-3/4 formula only exact on equal steps), cross-checks against
``lms`` and ``ipndm``, awkward shapes, the knob check and the measured convergence order."""
from __future__ import annotations

import math

import pytest
import torch

from diffkern import analytic, coef_tables_plms, schedules
from diffkern.sampling import knobs, sample
from diffkern.testing import assert_matches_reference
from sampler_checks import AWKWARD, AWKWARD_IDS, check_awkward_shape, check_backend

F64 = torch.float64
REF = "reference"


def comfy_ipndm_v(model, x, sigmas, max_order=4):
    """ComfyUI's ``sample_ipndm_v`` as published (its h's are negative: sigmas decrease), in Python floats."""
    t = [float(s) for s in sigmas]
    buffer = []
    for i in range(len(t) - 1):
        t_cur, t_next = t[i], t[i + 1]
        denoised = model(x, torch.full((x.shape[0],), t_cur, dtype=x.dtype))
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x = denoised
        elif order == 1:
            x = x + (t_next - t_cur) * d_cur
        elif order == 2:
            h_n, h_n_1 = t_next - t_cur, t_cur - t[i - 1]
            coeff1, coeff2 = (2 + (h_n / h_n_1)) / 2, -(h_n / h_n_1) / 2
            x = x + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer[-1])
        elif order == 3:
            h_n, h_n_1, h_n_2 = t_next - t_cur, t_cur - t[i - 1], t[i - 1] - t[i - 2]
            temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
            coeff3 = temp * h_n_1 / h_n_2
            x = x + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer[-1] + coeff3 * buffer[-2])
        else:
            h_n, h_n_1, h_n_2, h_n_3 = t_next - t_cur, t_cur - t[i - 1], t[i - 1] - t[i - 2], t[i - 2] - t[i - 3]
            temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            temp2 = (((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n
                      / (6 * (h_n + h_n_1 + h_n_2)))
                     * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2))
                     / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3)))
            ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + ratio) * temp2
            coeff3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio * (1 + h_n_2 / h_n_3)) * temp2
            coeff4 = -temp2 * ratio * h_n_1 / h_n_2
            x = x + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer[-1] + coeff3 * buffer[-2]
                                        + coeff4 * buffer[-3])
        buffer = (buffer + [d_cur])[-(max_order - 1):] if max_order > 1 else []
    return x


def gmm(dim=5, seed=11):
    gen = torch.Generator().manual_seed(seed)
    return analytic.GaussianMixture([1.0, 1.5, 0.8], torch.randn(3, dim, generator=gen, dtype=F64), [0.3, 0.5, 0.2])


def start(shape=(7, 5), sigma=10.0, seed=0):
    return torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * sigma


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 9])
def test_is_comfyui_loop_in_float64(max_order, steps):
    x = start(seed=steps)
    for sig in (schedules.karras(steps, 0.1, 10.0), schedules.karras(steps + 1, 0.1, 10.0)[:-1]):
        want = comfy_ipndm_v(gmm(), x, sig, max_order)
        got = sample(gmm(), x, sig, "ipndm_v", backend=REF, max_order=max_order)
        assert_matches_reference(got, want, want, f"steps={steps} max_order={max_order}")


def test_every_backend_matches_reference(cpu_backend):
    check_backend(gmm(), start((3, 5), 5.0, seed=4), schedules.karras(8, 0.05, 5.0), "ipndm_v", cpu_backend)


@pytest.mark.parametrize("shape, contiguous", AWKWARD, ids=AWKWARD_IDS)
def test_awkward_shapes(cpu_backend, shape, contiguous):
    check_awkward_shape(lambda dim: gmm(dim, seed=9), shape, contiguous, schedules.karras(7, 0.05, 10.0), "ipndm_v",
                        cpu_backend)


def _residuals(w, hs):
    """sum_j w_j (t_j - t_0)^k - h^k/(k+1), k = 0..len(w)-1: zero where the weights integrate degree k exactly over
    the step h from the nodes t_0 = 0, t_1 = -h1, t_2 = -h1 - h2, ... (in units of the step)."""
    nodes = [0.0]
    for hj in hs[1:len(w)]:
        nodes.append(nodes[-1] - hj)
    return [sum(wj * nj ** k for wj, nj in zip(w, nodes)) - hs[0] ** k / (k + 1) for k in range(len(w))]


def test_weights():
    equal = [5.0, 4.0, 3.0, 2.0, 1.0]
    for order in (1, 2, 3):
        assert coef_tables_plms.ipndm_v_weights(equal, 3, order) == pytest.approx(coef_tables_plms.AB_WEIGHTS[order])
    # ComfyUI's order-4 formula on equal steps: exact to degree 2 only, not AB4's (55, -59, 37, -9)/24
    w4 = coef_tables_plms.ipndm_v_weights(equal, 3, 4)
    assert w4 == pytest.approx([57 / 24, -65 / 24, 43 / 24, -11 / 24], rel=1e-14)
    # unequal steps: order 2 is the exact variable-step AB2, order 3 exact to degree 1
    sig = [9.0, 6.5, 4.0, 3.2, 1.7]
    hs = [sig[4] - sig[3], sig[3] - sig[2], sig[2] - sig[1], sig[1] - sig[0]]
    r2 = _residuals(coef_tables_plms.ipndm_v_weights(sig, 3, 2), [h / hs[0] for h in hs])
    r3 = _residuals(coef_tables_plms.ipndm_v_weights(sig, 3, 3), [h / hs[0] for h in hs])
    assert max(map(abs, r2)) < 1e-14 and max(map(abs, r3[:2])) < 1e-14 and abs(r3[2]) > 1e-3
    # order 4's weights sum to 1 only when the step ratios h2/h3 and h1/h2 agree (geometric steps)
    geometric = [8.0 * 0.7 ** k for k in range(5)]
    assert sum(coef_tables_plms.ipndm_v_weights(geometric, 3, 4)) == pytest.approx(1.0, abs=1e-14)
    assert abs(sum(coef_tables_plms.ipndm_v_weights(sig, 3, 4)) - 1.0) > 1e-3


def test_agrees_with_lms_and_ipndm_where_they_coincide():
    """max_order 2 is lms(order=2) (both exact variable-step AB2 in sigma; no step to 0, where ipndm_v jumps); on
    steps equal in sigma, max_order 3 is ipndm's equal-step AB3."""
    x, sig = start(), schedules.karras(9, 0.1, 10.0)[:-1]
    lms = sample(gmm(), x, sig, "lms", backend=REF, order=2)
    assert_matches_reference(sample(gmm(), x, sig, "ipndm_v", backend=REF, max_order=2), lms, lms, "vs lms")
    equal = torch.linspace(10.0, 0.5, 9, dtype=F64)
    ipndm = sample(gmm(), x, equal, "ipndm", backend=REF, max_order=3)
    assert_matches_reference(sample(gmm(), x, equal, "ipndm_v", backend=REF, max_order=3), ipndm, ipndm, "vs ipndm")


def test_step_to_zero_is_the_jump():
    x, sig = start(), schedules.karras(6, 0.1, 10.0)
    out, traj = sample(gmm(), x, sig, "ipndm_v", backend=REF, record=True)
    assert torch.equal(out, traj["denoised"][-1])


def test_knobs_and_history_depth():
    assert knobs("ipndm_v") == {"max_order": 4}
    assert coef_tables_plms.ipndm_v([3.0, 2.0, 1.0, 0.5, 0.0]).history == 3
    assert coef_tables_plms.ipndm_v([3.0, 2.0, 0.0]).history == 1
    assert coef_tables_plms.ipndm_v([3.0, 2.0, 1.0, 0.0], max_order=1).history == 0


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True, "4", None])
def test_max_order_is_checked(bad):
    with pytest.raises(ValueError, match="max_order: expected 1, 2, 3 or 4"):
        sample(gmm(), start((2, 5)), schedules.karras(4, 0.1, 10.0), "ipndm_v", backend=REF, max_order=bad)


def test_convergence_order():
    """Measured slopes (64 -> 128 -> 256 steps against 2048; sigmas 10 -> 0.1, no final 0). Log-linear: max_order 2:
    1.93, 1.96; 3: 2.90, 2.88; 4: 2.37, 2.75 (below 3: not AB4). Karras: 3: 2.92, 2.93; 4: 1.97, 1.78 (its weights
    do not sum to 1 on steps of varying ratio: the method drops to order 2)."""
    x = start((16, 5), seed=3)
    schedules_ = {"loglinear": lambda n: schedules.loglinear(n + 1, 0.1, 10.0)[:-1],
                  "karras": lambda n: schedules.karras(n + 1, 0.1, 10.0)[:-1]}
    expect = [("loglinear", 2, 1.8, 2.2), ("loglinear", 3, 2.7, 3.2), ("loglinear", 4, 2.2, 3.1),
              ("karras", 3, 2.7, 3.2), ("karras", 4, 1.5, 2.2)]
    fine = {name: sample(gmm(), x, mk(2048), "ipndm_v", backend=REF) for name, mk in schedules_.items()}
    for name, order, lo, hi in expect:
        errs = [float((sample(gmm(), x, schedules_[name](n), "ipndm_v", backend=REF, max_order=order)
                       - fine[name]).abs().max()) for n in (64, 128, 256)]
        slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        assert all(lo < s < hi for s in slopes), (name, order, errs, slopes)
