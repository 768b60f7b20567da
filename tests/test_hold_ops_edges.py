"""Edges of ``hold_transition`` and ``hold_perturb`` that tests/test_hold_ops.py leaves out, on every usable CPU
backend and in every dtype, against the float64 reference (``diffkern.testing.assert_matches_reference``):

* non-contiguous and strided outputs (``out``, ``eps_out``) and inputs, pre-filled with NaN so an element a
  backend does not write fails the comparison; odd P, size 1 and an empty batch for ``hold_perturb``;
* in place: ``out=z`` on a non-contiguous state, ``out=z0`` for a full initial state (m = n), which the
  overlap rule allows (an exact view of an element-wise input);
* bad input, device mismatches included (a tensor on the ``meta`` device): the error names the argument,
  with ``_checks.like``'s exception types (device and shape ValueError, dtype TypeError), and nothing is
  written; the C++ ops themselves refuse the same way.
"""
import math

import pytest
import torch

from diffkern.ops.hold import hold_perturb, hold_perturb_reference, hold_transition, hold_transition_reference
from diffkern.testing import DTYPES, assert_matches_reference, make_tensor, noncontiguous, usable_backends
from test_hold_ops import check_perturb, perturb_inputs, random_hold_table

F64 = torch.float64
NAN = float("nan")
META = torch.device("meta")
LAYOUTS = ("transposed", "strided")


def _id(v):
    return str(v).replace("torch.", "")


def _laid_out(t, layout):
    """A view of a copy of ``t`` in ``layout``: ``transposed`` storage, or ``strided`` (every other element
    along the last dimension of size > 1, so that size-1 dimensions do not make it contiguous again)."""
    if layout == "strided":
        d = max([i for i, s in enumerate(t.shape) if s > 1], default=t.dim() - 1)
        buf = torch.full((*t.shape[:d], 2 * t.shape[d], *t.shape[d + 1:]), NAN, dtype=t.dtype)
        view = buf[(slice(None),) * d + (slice(None, None, 2),)]
        view.copy_(t)
        return view
    return noncontiguous(t.clone())


def _nan_out(shape, dtype, layout):
    return _laid_out(torch.full(shape, NAN, dtype=dtype), layout)

#----------------------------------------------------------------------------
# hold_transition: non-contiguous out (and in place on a non-contiguous state) in every dtype.


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_transition_noncontiguous_out_every_dtype(cpu_backend, dtype, layout):
    n, data = 3, (2, 3, 5, 7)
    state = (data[0], n * data[1], *data[2:])
    z, eps = make_tensor(state, dtype, seed=1), make_tensor(data, dtype, seed=2)
    table, seed = random_hold_table(n), torch.tensor([21, 22], dtype=torch.int64)
    ref64 = hold_transition_reference(z.double(), eps.double(), table, 1, seed=seed)
    eager = hold_transition_reference(z, eps, table, 1, seed=seed)
    out = _nan_out(state, dtype, layout)
    assert not out.is_contiguous()
    assert hold_transition(z, eps, table, 1, seed=seed, out=out, backend=cpu_backend) is out
    assert_matches_reference(out, ref64, eager, f"[{cpu_backend}] {layout} out {dtype}")
    z_nc = _laid_out(z, layout)
    assert hold_transition(z_nc, eps, table, 1, seed=seed, out=z_nc, backend=cpu_backend) is z_nc
    assert_matches_reference(z_nc, ref64, eager, f"[{cpu_backend}] {layout} out=z {dtype}")

#----------------------------------------------------------------------------
# hold_perturb: non-contiguous inputs and outputs in every dtype over awkward shapes; in place when m = n.

# (n, m, B, C, rest, explicit noise): odd P, size 1 everywhere, an empty batch.
PERTURB_CASES = {"odd-P": (3, 1, 3, 1, (7, 5), False), "odd-P-m=n": (3, 3, 2, 1, (5, 3), True),
                 "size-1": (2, 1, 1, 1, (1,), False), "size-1-m=n": (2, 2, 1, 1, (1,), True),
                 "empty-batch": (3, 1, 0, 2, (5,), False)}


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(PERTURB_CASES))
def test_perturb_noncontiguous_every_dtype(cpu_backend, dtype, case):
    n, m, B, C, rest, explicit = PERTURB_CASES[case]
    z0, mean_mat, chol = perturb_inputs(B, n, m, C, rest, dtype, seed=4)
    state, data = (B, n * C, *rest), (B, C, *rest)
    noise = _laid_out(make_tensor(state, dtype, seed=5), "strided") if explicit else None
    seed = torch.arange(B, dtype=torch.int64) * 3 + 1 if B % 2 else torch.tensor([6], dtype=torch.int64)
    out, eps_out = _nan_out(state, dtype, "strided"), _nan_out(data, dtype, "strided")
    z0_nc = _laid_out(z0, "strided")
    assert not any(t.is_contiguous() for t in (z0_nc, out, eps_out) if t.numel() > 1)
    check_perturb(cpu_backend, z0_nc, mean_mat, chol, n * C, seed=seed, noise=noise, step=2, out=out,
                  eps_out=eps_out, what=f"{case} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", ("contiguous",) + LAYOUTS)
def test_perturb_in_place_full_state(cpu_backend, dtype, layout):
    """m = n: out=z0 is an exact view of an element-wise input, so the overlap rule allows it; every
    component of an element is read before any is written."""
    n, B, C, rest = 3, 3, 2, (5, 3)
    z0, mean_mat, chol = perturb_inputs(B, n, n, C, rest, dtype, seed=7)
    seed = torch.tensor([8, 9, 10], dtype=torch.int64)
    ref64, eps64 = hold_perturb_reference(z0.double(), mean_mat, chol, n * C, seed=seed, step=4)
    eager, eps_e = hold_perturb_reference(z0, mean_mat, chol, n * C, seed=seed, step=4)
    z = z0 if layout == "contiguous" else _laid_out(z0, layout)
    eps_out = torch.full((B, C, *rest), NAN, dtype=dtype)
    assert hold_perturb(z, mean_mat, chol, seed=seed, step=4, out=z, eps_out=eps_out, backend=cpu_backend) is z
    assert_matches_reference(z, ref64, eager, f"[{cpu_backend}] {layout} out=z0 {dtype}")
    assert_matches_reference(eps_out, eps64, eps_e, f"[{cpu_backend}] {layout} eps_out with out=z0 {dtype}")


def test_perturb_partial_overlap_with_z0_is_refused(cpu_backend):
    """out over z0 one element off (not the same view) is refused before anything is written."""
    n, B, C = 2, 2, 1
    _, mean_mat, chol = perturb_inputs(B, n, n, C, (4,), torch.float32)
    buf = make_tensor((B * n * C * 4 + 1,), seed=11)
    before = buf.clone()
    with pytest.raises(ValueError, match=r"^out: overlaps z0 without being the same view"):
        hold_perturb(buf[1:].view(B, n * C, 4), mean_mat, chol, out=buf[:-1].view(B, n * C, 4), backend=cpu_backend)
    assert torch.equal(buf, before)

#----------------------------------------------------------------------------
# Bad input: the error names the argument; nothing is written (outputs pre-filled with 7, inputs compared).


def _transition_bad_cases():
    def upper(k):
        k["coef"] = k["coef"].clone()
        k["coef"][1, 0, 3 + 1 + 2] = 1.0  # C[0, 2] of the row used: above the diagonal

    return {
        "z-int": (lambda k: k.update(z=k["z"].long()), TypeError, r"^z: expected a floating dtype"),
        "z-1d": (lambda k: k.update(z=k["z"].reshape(-1)), ValueError, r"^z: expected a state"),
        "z-channels": (lambda k: k.update(z=k["z"][:, :5]), ValueError, r"^z: channel count 5 is not a multiple"),
        "eps_hat-device": (lambda k: k.update(eps_hat=k["eps_hat"].to(META)), ValueError, r"^eps_hat: expected device"),
        "eps_hat-shape": (lambda k: k.update(eps_hat=k["eps_hat"][:, :1]), ValueError, r"^eps_hat: expected shape"),
        "eps_hat-int": (lambda k: k.update(eps_hat=k["eps_hat"].int()), TypeError, r"^eps_hat: expected a floating"),
        "noise-device": (lambda k: k.update(noise=k["z"].to(META)), ValueError, r"^noise: expected device"),
        "noise-shape": (lambda k: k.update(noise=k["z"][:1]), ValueError, r"^noise: expected shape"),
        "noise-dtype": (lambda k: k.update(noise=k["z"].to(F64 if k["z"].dtype != F64 else torch.float32)),
                        TypeError, r"^noise: expected dtype"),
        "out-device": (lambda k: k.update(out=k["out"].to(META)), ValueError, r"^out: expected device"),
        "out-shape": (lambda k: k.update(out=torch.full((2, 9, 5), 7.0, dtype=k["z"].dtype)), ValueError,
                      r"^out: expected shape"),
        "out-dtype": (lambda k: k.update(out=k["out"].to(F64 if k["z"].dtype != F64 else torch.float32)),
                      TypeError, r"^out: expected dtype"),
        "out-not-tensor": (lambda k: k.update(out=[7.0] * 60), TypeError, r"^out: expected a torch.Tensor"),
        "coef-device": (lambda k: k.update(coef=k["coef"].to(META)), ValueError, r"^coef: expected device"),
        "coef-dtype": (lambda k: k.update(coef=k["coef"].float()), TypeError, r"^coef: expected dtype torch.float64"),
        "coef-shape": (lambda k: k.update(coef=k["coef"][:, :, :6]), ValueError, r"^coef: expected shape"),
        "coef-nan": (lambda k: k["coef"].__setitem__((1, 2, 0), NAN), ValueError, r"^coef\[1\]: non-finite"),
        "coef-upper": (upper, ValueError, r"^coef\[1\]: the noise factor"),
        "step-range": (lambda k: k.update(step=3), IndexError, r"^step: 3 is out of range"),
        "step-float": (lambda k: k.update(step=1.0), TypeError, r"^step: expected a Python int"),
        "seed-device": (lambda k: k.update(seed=k["seed"].to(META)), ValueError, r"^seed: expected device"),
        "seed-dtype": (lambda k: k.update(seed=k["seed"].int()), TypeError, r"^seed: expected dtype torch.int64"),
        "seed-shape": (lambda k: k.update(seed=torch.tensor([1, 2, 3])), ValueError, r"^seed: expected shape"),
        "out-over-eps_hat": (lambda k: k.update(out=k["buf"][:60].view(2, 6, 5), eps_hat=k["buf"][1:21].view(2, 2, 5)),
                             ValueError, r"^out: overlaps eps_hat"),
        "out-over-z": (lambda k: k.update(out=k["buf"][:60].view(2, 6, 5), z=k["buf"][1:61].view(2, 6, 5)),
                       ValueError, r"^out: overlaps z without"),
    }


def _perturb_bad_cases():
    other = {torch.float64: torch.float32}
    return {
        "z0-int": (lambda k: k.update(z0=k["z0"].long()), TypeError, r"^z0: expected a floating dtype"),
        "z0-channels": (lambda k: k.update(mean_mat=torch.zeros(2, 3, 3, dtype=F64)), ValueError,
                        r"^z0: channel count 2 is not a multiple of the order n = 3"),
        "mean_mat-device": (lambda k: k.update(mean_mat=k["mean_mat"].to(META)), ValueError,
                            r"^mean_mat: expected device"),
        "mean_mat-dtype": (lambda k: k.update(mean_mat=k["mean_mat"].float()), TypeError,
                           r"^mean_mat: expected dtype torch.float64"),
        "mean_mat-m": (lambda k: k.update(mean_mat=torch.zeros(2, 3, 2, dtype=F64)), ValueError, r"^mean_mat: .*m in"),
        "mean_mat-nan": (lambda k: k["mean_mat"].__setitem__((1, 0, 0), NAN), ValueError, r"^mean_mat: non-finite"),
        "chol-device": (lambda k: k.update(chol=k["chol"].to(META)), ValueError, r"^chol: expected device"),
        "chol-shape": (lambda k: k.update(chol=k["chol"][:, :2]), ValueError, r"^chol: expected shape"),
        "chol-inf": (lambda k: k["chol"].__setitem__((0, 2, 1), math.inf), ValueError, r"^chol: non-finite"),
        "noise-device": (lambda k: k.update(noise=k["out"].to(META)), ValueError, r"^noise: expected device"),
        "noise-shape": (lambda k: k.update(noise=k["z0"]), ValueError, r"^noise: expected shape"),
        "noise-dtype": (lambda k: k.update(noise=k["out"].to(other.get(k["z0"].dtype, F64))), TypeError,
                        r"^noise: expected dtype"),
        "out-device": (lambda k: k.update(out=k["out"].to(META)), ValueError, r"^out: expected device"),
        "out-shape": (lambda k: k.update(out=k["out"][:, :4]), ValueError, r"^out: expected shape"),
        "out-dtype": (lambda k: k.update(out=k["out"].to(other.get(k["z0"].dtype, F64))), TypeError,
                      r"^out: expected dtype"),
        "eps_out-device": (lambda k: k.update(eps_out=k["eps_out"].to(META)), ValueError, r"^eps_out: expected device"),
        "eps_out-shape": (lambda k: k.update(eps_out=k["out"]), ValueError, r"^eps_out: expected shape"),
        "eps_out-dtype": (lambda k: k.update(eps_out=k["eps_out"].to(other.get(k["z0"].dtype, F64))), TypeError,
                          r"^eps_out: expected dtype"),
        "step-negative": (lambda k: k.update(step=-1), ValueError, r"^step: expected a Python int"),
        "step-large": (lambda k: k.update(step=2**32), ValueError, r"^step: expected a Python int"),
        "seed-device": (lambda k: k.update(seed=k["seed"].to(META)), ValueError, r"^seed: expected device"),
        "seed-shape": (lambda k: k.update(seed=torch.tensor([1, 2, 3])), ValueError, r"^seed: expected shape"),
        "eps_out-over-out": (lambda k: k.update(eps_out=k["out"][:, :2]), ValueError, r"^out: overlaps eps_out"),
    }


def _check_refused(call, kw, exc, match):
    before = {k: (v, v.clone()) for k, v in kw.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(exc, match=match):
        call(kw)
    for k, (now, then) in before.items():
        assert torch.equal(now.nan_to_num(), then.nan_to_num()), f"{k} was written by a call that raised"


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(_transition_bad_cases()), ids=str)
def test_transition_bad_input_names_it_and_writes_nothing(cpu_backend, dtype, case):
    mutate, exc, match = _transition_bad_cases()[case]
    kw = {"z": make_tensor((2, 6, 5), dtype, seed=1), "eps_hat": make_tensor((2, 2, 5), dtype, seed=2),
          "coef": random_hold_table(3), "step": 1, "seed": torch.tensor([3], dtype=torch.int64),
          "out": torch.full((2, 6, 5), 7.0, dtype=dtype), "buf": make_tensor((61,), dtype, seed=3)}
    mutate(kw)

    def call(k):
        args = {a: v for a, v in k.items() if a != "buf"}
        hold_transition(args.pop("z"), args.pop("eps_hat"), args.pop("coef"), args.pop("step"), backend=cpu_backend,
                        **args)

    _check_refused(call, kw, exc, match)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(_perturb_bad_cases()), ids=str)
def test_perturb_bad_input_names_it_and_writes_nothing(cpu_backend, dtype, case):
    mutate, exc, match = _perturb_bad_cases()[case]
    z0, mean_mat, chol = perturb_inputs(2, 3, 1, 2, (4,), dtype, seed=12)
    kw = {"z0": z0, "mean_mat": mean_mat, "chol": chol, "seed": torch.tensor([3], dtype=torch.int64), "step": 0,
          "out": torch.full((2, 6, 4), 7.0, dtype=dtype), "eps_out": torch.full((2, 2, 4), 7.0, dtype=dtype)}
    mutate(kw)

    def call(k):
        args = dict(k)
        hold_perturb(args.pop("z0"), args.pop("mean_mat"), args.pop("chol"), backend=cpu_backend, **args)

    _check_refused(call, kw, exc, match)


def test_perturb_out_over_shared_matrix_is_refused(cpu_backend):
    """An output over mean_mat or chol (read by every element of a sample) is refused; neither is written."""
    n, B = 2, 2
    z0, mean_mat, chol = perturb_inputs(B, n, 1, 1, (), F64, seed=13)  # out (B, n) has the shape of mean_mat[..., 0]
    for name, mat in (("mean_mat", mean_mat), ("chol", chol)):
        kw = {"z0": z0, "mean_mat": mean_mat, "chol": chol, "out": mat[..., 0]}
        _check_refused(lambda k: hold_perturb(k["z0"], k["mean_mat"], k["chol"], out=k["out"], backend=cpu_backend),
                       kw, ValueError, rf"^out: overlaps {name}, which every element reads")

#----------------------------------------------------------------------------
# The C++ ops themselves (callable without the front-end) refuse naming the argument, writing nothing.

needs_cpp = pytest.mark.skipif("cpp" not in usable_backends("cpu"), reason="needs the C++ extension")


def _cpp_refuses(fn, args, match, outs):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)
    assert all((o == 7.0).all() for o in outs), f"{match}: an output was written"


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_cpp_ops_refuse_and_write_nothing(dtype):
    """Through torch.ops.diffkern (the CPU binding) and, for device mismatches, through the binding's checks
    (diffkern._C.check_hold_*, which the CUDA bindings share): a call with a meta tensor among its arguments
    is dispatched to the op's fake kernel, never to the CPU binding."""
    from diffkern import _C
    z, eps, table = make_tensor((2, 6, 5), dtype, seed=1), make_tensor((2, 2, 5), dtype, seed=2), random_hold_table(3)
    seed, other = torch.tensor([3], dtype=torch.int64), F64 if dtype != F64 else torch.float32
    out = torch.full((2, 6, 5), 7.0, dtype=dtype)
    op = torch.ops.diffkern.hold_transition
    _cpp_refuses(op, (z, eps, None, table, 0, seed, out.to(other)), r"out: expected dtype \w+ \(that of z\)", [out])
    _cpp_refuses(op, (z, eps, None, table, 0, seed, noncontiguous(out)), r"out: expected a contiguous tensor", [out])
    _cpp_refuses(op, (z, eps[:, :1].contiguous(), None, table, 0, seed, out), r"eps_hat: expected shape", [out])
    _cpp_refuses(_C.check_hold_transition, (z, eps.to(META), None, table, 0, seed, out), r"eps_hat: expected device",
                 [out])
    _cpp_refuses(_C.check_hold_transition, (z, eps, None, table.to(META), 0, seed, out), r"coef: expected device",
                 [out])
    _cpp_refuses(_C.check_hold_transition, (z, eps, None, table, 0, seed, out.to(META)), r"out: expected device",
                 [out])
    z0, mean_mat, chol = perturb_inputs(2, 3, 1, 2, (4,), dtype, seed=4)
    out, eps_out = torch.full((2, 6, 4), 7.0, dtype=dtype), torch.full((2, 2, 4), 7.0, dtype=dtype)
    op, outs = torch.ops.diffkern.hold_perturb, [out, eps_out]
    _cpp_refuses(op, (z0, mean_mat, chol, None, 0, seed, out.to(other), eps_out),
                 r"out: expected dtype \w+ \(that of z0\)", outs)
    _cpp_refuses(op, (z0, mean_mat, chol, None, 0, seed, out[:, :3].contiguous(), eps_out), r"out: expected shape",
                 outs)
    _cpp_refuses(op, (z0, mean_mat, chol, None, 0, seed, out, eps_out.to(other)), r"eps_out: expected dtype", outs)
    _cpp_refuses(op, (z0, mean_mat, chol, None, 0, seed, out, eps_out[:, :1].contiguous()), r"eps_out: expected shape",
                 outs)
    check = _C.check_hold_perturb
    _cpp_refuses(check, (z0, mean_mat.to(META), chol, None, 0, seed, out, eps_out), r"mean_mat: expected device", outs)
    _cpp_refuses(check, (z0, mean_mat, chol, None, 0, seed, out, eps_out.to(META)), r"eps_out: expected device", outs)
    _cpp_refuses(check, (z0, mean_mat, chol, None, 0, seed.to(META), out, eps_out), r"seed: expected device", outs)
