"""HOLD's time arguments after the routing tidy-up (one extended-precision Law, one set of routed parts).

* Every method taking an integrated time b (transition_b, gramian_b, a_transition, a_cov, a_chol) names ``b`` in its
  errors, on the three paths: float64 (n = 3), the SSCS factor routed to the extended path (n = 6), every law extended
  (n = 12): bad numbers, bad dtypes, and, where the extended path reads b on the host, negative / NaN tensors and b
  with autograd history (accepted under no_grad).
* Forward-time methods still name ``t``; their float64 laws stay sync-free where a factor is routed (DSM n = 5), and the
  routed factor reads (and checks) its times; the routing table itself.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffkern.hold import HOLD
from diffkern.ops.hold import F64_MAX_ORDER

F64 = torch.float64
B_METHODS = ("transition_b", "gramian_b", "a_transition", "a_cov", "a_chol")
# per order: the b-methods whose part the extended path computes (it reads b on the host and checks it there)
HOST = {3: (), 6: ("a_chol",), 12: B_METHODS}


class _Reads(TorchDispatchMode):
    """Records the ops that read a tensor's values on the host (a sync on a GPU): item, nonzero, boolean indexing."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                    torch.ops.aten.masked_select.default, torch.ops.aten.index.Tensor):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n", (3, 6, 12))
@pytest.mark.parametrize("method", B_METHODS)
def test_b_methods_name_b_for_bad_numbers_and_dtypes(n, method):
    f = getattr(HOLD(n), method)
    for bad in (-1.0, math.nan, math.inf, -0.0 - 1e-300):
        with pytest.raises(ValueError, match=r"^b: expected a finite time >= 0"):
            f(bad)
    for bad in ("x", True, None, [0.1, 0.2]):
        with pytest.raises(TypeError, match=r"^b: expected a real number or a tensor"):
            f(bad)
    for bad in (torch.tensor([True]), torch.tensor([0.1 + 0j])):
        with pytest.raises(TypeError, match=r"^b: expected a real tensor, got dtype"):
            f(bad)


@pytest.mark.parametrize("n", (3, 6, 12))
@pytest.mark.parametrize("method", B_METHODS)
def test_b_tensors_checked_by_name_where_read_on_the_host(n, method):
    proc = HOLD(n)
    f = getattr(proc, method)
    good = torch.tensor([0.02, 0.5], dtype=F64)
    want = f(good)
    # an integer or float32 tensor is its float64 value (the same result)
    assert torch.equal(f(torch.tensor([0, 1])), f(torch.tensor([0.0, 1.0], dtype=F64)))
    assert torch.equal(f(good.float()), f(good.float().double()))
    grad = good.clone().requires_grad_()
    if method in HOST[n]:
        for bad, got in ((torch.tensor([0.1, -0.5], dtype=F64), "-0.5"), (torch.tensor([math.nan], dtype=F64), "nan")):
            with pytest.raises(ValueError, match=rf"^b: expected finite times >= 0, got {got} \(order n = {n} "):
                f(bad)
        with pytest.raises(ValueError, match=r"^b: expected times without autograd history .* pass b\.detach\(\)"):
            f(grad)
        with torch.no_grad():  # nothing to drop: accepted, the same values
            assert torch.equal(f(grad), want)
    else:  # float64: the tensor is not read (sync-free) and the result is differentiable in b
        with _Reads() as rec:
            f(torch.tensor([-0.5, math.nan], dtype=F64))
        assert rec.reads == []
        out = f(grad)
        assert out.requires_grad and torch.equal(out.detach(), want)


def test_forward_time_methods_still_name_t():
    proc = HOLD(5, hsm=False, delta=0.0)  # L_t routed, the laws float64
    assert proc._xparts == {"L"} and proc._xp is not None
    bad = torch.tensor([0.2, -0.1], dtype=F64)
    for method in ("chol", "score_scale", "x0_coefficients", "perturb_matrices"):
        with pytest.raises(ValueError, match=r"^t: expected finite times >= 0, got -0.1 \(order n = 5 reads them"):
            getattr(proc, method)(bad)
    with pytest.raises(ValueError, match=r"^t: expected times without autograd history .* pass t\.detach\(\)"):
        proc.chol(torch.tensor([0.2], dtype=F64, requires_grad=True))
    for method in ("transition", "gramian", "cov", "chol"):
        with pytest.raises(ValueError, match=r"^t: expected a finite time >= 0, got -1.0"):
            getattr(proc, method)(-1.0)
    above = HOLD(F64_MAX_ORDER + 1)
    with pytest.raises(ValueError, match=r"^t: expected finite times >= 0, got -0.1"):
        above.transition(bad)
    with pytest.raises(ValueError, match=r"^t: expected finite times >= 0, got -0.1"):
        above.int_beta(bad)


def test_float64_laws_sync_free_beside_a_routed_factor():
    """DSM n = 5: L_t comes from the extended path (it reads t), E and Q stay float64 and never read t."""
    proc = HOLD(5, hsm=False, delta=0.0)
    t = torch.tensor([1e-3, 0.3, 2.0], dtype=F64)
    with _Reads() as rec:
        proc.transition(t), proc.gramian(t), proc.cov(t, jitter=True), proc.int_beta(t)
        proc.transition_b(t), proc.gramian_b(t), proc.a_transition(t), proc.a_cov(t), proc.a_chol(t)
    assert rec.reads == []
    with _Reads() as rec:
        proc.chol(t)
    assert rec.reads  # the recorder sees the routed factor's host read


def test_routing_is_one_law_and_one_set_of_parts():
    table = {(4, False, 0.0): set(), (5, False, 0.0): {"L"}, (6, True, 1e-9): {"LA"}, (9, True, 0.0): {"L", "LA"},
             (F64_MAX_ORDER, True, 1e-9): {"LA"}, (F64_MAX_ORDER + 1, True, 1e-9): {"E", "Q", "QA", "L", "LA"}}
    for (n, hsm, delta), parts in table.items():
        proc = HOLD(n, hsm=hsm, delta=delta)
        assert proc._xparts == parts and (proc._xp is None) == (not parts), (n, hsm, delta)


@pytest.mark.parametrize("n", (2, 3, 6))
def test_factors_and_x0_weights_differentiate_in_t(n):
    """chol (L_t, through chol_psd of Q) and the x0 weights take gradients in t where float64 computes them (chol_psd
    used to write its factor in place after reading it: backward raised an in-place-modification error)."""
    proc = HOLD(n)
    t = torch.tensor([0.3, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(proc.chol, (t,))
    assert torch.autograd.gradcheck(lambda s: proc.x0_coefficients(s)[1], (t,))
