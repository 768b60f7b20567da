"""``hold_transition`` and ``hold_perturb`` on every usable backend against the float64 reference.

Tolerance: ``diffkern.testing.assert_matches_reference`` (a backend's error is at most twice the
error of the reference run in the low dtype, plus a per-dtype floor). opcheck of both ops is in
tests/test_opcheck.py.
"""
import math

import pytest
import torch

import diffkern.ops as dops
from diffkern.hold import HOLD
from diffkern.ops import philox
from diffkern.ops.hold import (MAX_ORDER, hold_perturb, hold_perturb_reference, hold_transition,
                               hold_transition_reference, transition_table)
from diffkern.testing import DTYPES, assert_matches_reference, make_tensor, noncontiguous, usable_backends

F64 = torch.float64
FAST = "cpp" if "cpp" in usable_backends("cpu") else "reference"


def _id(v):
    return str(v).replace("torch.", "")


def random_hold_table(n: int, rows: int = 3, *, seed: int = 0, zero_noise_col: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    K = torch.rand(rows, n, n, generator=gen, dtype=F64) * 2 - 1
    k = torch.rand(rows, n, generator=gen, dtype=F64) * 2 - 1
    C = torch.tril(torch.rand(rows, n, n, generator=gen, dtype=F64) * 2 - 1)
    if zero_noise_col is not None:
        C[:, :, zero_noise_col] = 0.0
    return transition_table(K, k, C)


def check_transition(backend, z, eps_hat, coef, step, *, seed=None, noise=None, out=None, what=""):
    """Run the op on ``backend`` (output pre-filled with NaN) and check it against the float64 reference."""
    seed = torch.tensor([12345], dtype=torch.int64) if seed is None and noise is None else seed
    ref64 = hold_transition_reference(z.double(), eps_hat.double(), coef, step, seed=seed,
                                      noise=None if noise is None else noise.double())
    eager = hold_transition_reference(z, eps_hat, coef, step, seed=seed, noise=noise)
    out = torch.full_like(z, math.nan) if out is None else out.fill_(math.nan)
    assert hold_transition(z, eps_hat, coef, step, seed=seed, noise=noise, out=out, backend=backend) is out
    assert_matches_reference(out, ref64, eager, f"{what} [{backend}]")
    return out

def check_perturb(backend, z0, mean_mat, chol, n_channels, *, seed=None, noise=None, step=0, out=None, eps_out=None,
                  what=""):
    """Run hold_perturb on ``backend`` (``out`` and ``eps_out`` pre-filled with NaN: the given buffers, else new
    ones; neither may be z0) and check both against the float64 reference; returns that reference's
    (z_t, eps_n)."""
    ref64, eps64 = hold_perturb_reference(z0.double(), mean_mat, chol, n_channels, seed=seed, step=step,
                                          noise=None if noise is None else noise.double())
    eager, eps_e = hold_perturb_reference(z0, mean_mat, chol, n_channels, seed=seed, step=step, noise=noise)
    out = torch.full_like(eager, math.nan) if out is None else out.fill_(math.nan)
    eps_out = torch.full_like(eps_e, math.nan) if eps_out is None else eps_out.fill_(math.nan)
    res = hold_perturb(z0, mean_mat, chol, seed=seed, noise=noise, step=step, out=out, eps_out=eps_out,
                       backend=backend)
    assert res is out
    assert_matches_reference(out, ref64, eager, f"{what} out [{backend}]")
    assert_matches_reference(eps_out, eps64, eps_e, f"{what} eps_out [{backend}]")
    return ref64, eps64

#----------------------------------------------------------------------------
# hold_transition: dtypes, awkward shapes, orders.


STATE_SHAPES = ((2, 3, 5, 7), (1, 1, 1, 1), (0, 3, 4, 4), (3, 1025), (1, 123, 1), (4, 2, 9, 17))


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("data_shape", STATE_SHAPES + ("noncontiguous",), ids=_id)
def test_transition_matches_reference(cpu_backend, dtype, data_shape):
    n = 3
    contiguous = data_shape != "noncontiguous"
    data_shape = (4, 2, 9, 17) if not contiguous else data_shape
    state = (data_shape[0], n * data_shape[1], *data_shape[2:])
    z = make_tensor(state, dtype, seed=1, contiguous=contiguous)
    eps = make_tensor(data_shape, dtype, seed=2, contiguous=contiguous)
    check_transition(cpu_backend, z, eps, random_hold_table(n), 2, what=f"{state} {dtype}")


@pytest.mark.parametrize("n", (1, 2, 4, 5, 6, MAX_ORDER))
@pytest.mark.parametrize("per_sample_seed", (False, True), ids=("seed1", "seedB"))
def test_transition_every_order(cpu_backend, n, per_sample_seed):
    z, eps = make_tensor((3, n * 2, 5, 3), seed=n), make_tensor((3, 2, 5, 3), seed=n + 1)
    seed = torch.tensor([7, 8, 9] if per_sample_seed else [7], dtype=torch.int64)
    check_transition(cpu_backend, z, eps, random_hold_table(n, seed=n), 1, seed=seed, what=f"n={n}")


@pytest.mark.parametrize("model_dtype", (torch.float32, torch.bfloat16, torch.float64), ids=_id)
def test_transition_model_dtype_differs(cpu_backend, model_dtype):
    z, eps = make_tensor((2, 6, 33), torch.float16), make_tensor((2, 2, 33), model_dtype, seed=1)
    check_transition(cpu_backend, z, eps, random_hold_table(3), 0, what=f"eps {model_dtype}")


def test_transition_in_place_and_noncontiguous_out(cpu_backend):
    z, eps, table = make_tensor((3, 6, 65)), make_tensor((3, 2, 65), seed=1), random_hold_table(3)
    seed = torch.tensor([5], dtype=torch.int64)
    ref64 = hold_transition_reference(z.double(), eps.double(), table, 1, seed=seed)
    eager = hold_transition_reference(z, eps, table, 1, seed=seed)
    assert hold_transition(z, eps, table, 1, seed=seed, out=z, backend=cpu_backend) is z
    assert_matches_reference(z, ref64, eager, "out=z")
    z2 = make_tensor((3, 6, 7, 9))
    check_transition(cpu_backend, z2, make_tensor((3, 2, 7, 9), seed=1), table, 1,
                     out=noncontiguous(torch.empty(3, 6, 7, 9)), what="noncontiguous out")

#----------------------------------------------------------------------------
# Noise: the documented mapping onto the Philox stream, explicit noise, skipped columns.


@pytest.mark.parametrize("per_sample_seed", (False, True), ids=("seed1", "seedB"))
def test_noise_is_the_stream_of_the_state_entries(cpu_backend, per_sample_seed):
    """K = 0, k = 0, C = I: the result is eta, i.e. philox.noise_like(z): eta_k of element (b, c, ...) is the
    normal at the index of state entry (b, k*C + c, ...)."""
    n, rows = 3, 4
    eye = torch.eye(n, dtype=F64).repeat(rows, 1, 1)
    table = transition_table(torch.zeros(rows, n, n, dtype=F64), torch.zeros(rows, n, dtype=F64), eye)
    z = make_tensor((3, 3 * n, 5))
    seed = torch.tensor([3, 1, 4] if per_sample_seed else [31], dtype=torch.int64)
    out = hold_transition(z, make_tensor((3, 3, 5)), table, 3, seed=seed, backend=cpu_backend)
    assert_matches_reference(out, philox.noise_like(z.double(), seed, 3), philox.noise_like(z, seed, 3), "eta")


def test_explicit_noise_equals_stream(cpu_backend):
    z, eps, table = make_tensor((2, 9, 17)), make_tensor((2, 3, 17), seed=1), random_hold_table(3)
    seed = torch.tensor([77], dtype=torch.int64)
    drawn = hold_transition(z, eps, table, 2, seed=seed, backend=cpu_backend)
    given = hold_transition(z, eps, table, 2, noise=philox.noise_like(z, seed, 2), backend=cpu_backend)
    torch.testing.assert_close(given, drawn)
    check_transition(cpu_backend, z, eps, table, 2, noise=make_tensor(z.shape, seed=9), what="explicit noise")


def test_zero_noise_column_is_not_read(cpu_backend):
    """A column of C that is all zero: eta_j is not drawn, so a NaN there (explicit noise) cannot leak."""
    n = 3
    table = random_hold_table(n, zero_noise_col=1)
    z, eps = make_tensor((2, 3 * n, 8)), make_tensor((2, 3, 8), seed=1)
    noise = make_tensor(z.shape, seed=2)
    noise[:, 3:6] = math.nan  # component 1
    out = check_transition(cpu_backend, z, eps, table, 1, noise=noise, what="nan in unused eta")
    assert torch.isfinite(out).all()
    no_noise = transition_table(table[:, :, :n], table[:, :, n], torch.zeros(3, n, n, dtype=F64))
    a = hold_transition(z, eps, no_noise, 0, seed=torch.tensor([1]), backend=cpu_backend)
    b = hold_transition(z, eps, no_noise, 0, seed=torch.tensor([2]), backend=cpu_backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_per_sample_seeds_independent_of_batch(cpu_backend):
    z, eps, table = make_tensor((4, 6, 5, 3)), make_tensor((4, 2, 5, 3), seed=1), random_hold_table(3)
    seed = torch.tensor([11, 12, 13, 14], dtype=torch.int64)
    batch = hold_transition(z, eps, table, 2, seed=seed, backend=cpu_backend)
    for b in range(4):
        alone = hold_transition(z[b:b + 1], eps[b:b + 1], table, 2, seed=seed[b:b + 1], backend=cpu_backend)
        torch.testing.assert_close(alone, batch[b:b + 1])


def test_table_is_read_at_launch(cpu_backend):
    z, eps, table = make_tensor((2, 6, 40)), make_tensor((2, 2, 40), seed=1), random_hold_table(3)
    check_transition(cpu_backend, z, eps, table, 1, what="before")
    table.copy_(random_hold_table(3, seed=5))
    check_transition(cpu_backend, z, eps, table, 1, what="after")

#----------------------------------------------------------------------------
# hold_perturb.


def perturb_inputs(B, n, m, C, rest, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mean_mat = torch.rand(B, n, m, generator=gen, dtype=F64) * 2 - 1
    chol = torch.tril(torch.rand(B, n, n, generator=gen, dtype=F64)) + torch.eye(n, dtype=F64)
    return make_tensor((B, m * C, *rest), dtype, seed=seed), mean_mat, chol


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n,m,B,C,rest", [(3, 1, 2, 2, (5, 7)), (3, 3, 3, 1, (33,)), (1, 1, 4, 3, ()),
                                          (6, 1, 1, 1, (1,)), (2, 2, 0, 3, (4,)), (5, 5, 2, 3, (17,))])
def test_perturb_matches_reference(cpu_backend, dtype, n, m, B, C, rest):
    z0, mean_mat, chol = perturb_inputs(B, n, m, C, rest, dtype)
    per_sample_seed = B % 2 == 1  # B = 3 and B = 1 take per-sample streams, the others one stream
    seed = torch.arange(B, dtype=torch.int64) + 100 if per_sample_seed else torch.tensor([9], dtype=torch.int64)
    step = 3
    ref64, eps64 = check_perturb(cpu_backend, z0, mean_mat, chol, n * C, seed=seed, step=step,
                                 what=f"perturb n={n} m={m}")
    full = philox.noise_like(ref64, seed, step).reshape(B, n, C * math.prod(rest))[:, n - 1].reshape(eps64.shape)
    torch.testing.assert_close(eps64, full, rtol=0, atol=0)


def test_perturb_explicit_noise_and_noncontiguous(cpu_backend):
    z0, mean_mat, chol = perturb_inputs(3, 3, 1, 2, (5, 4), torch.float32)
    noise = make_tensor((3, 6, 5, 4), seed=3, contiguous=False)
    check_perturb(cpu_backend, noncontiguous(z0), mean_mat, chol, 6, noise=noise,
                  out=noncontiguous(torch.empty(3, 6, 5, 4)), what="explicit noise, non-contiguous")


def test_forward_perturbation_moments():
    """``math-hold.md`` 10.5 #2: z_t = E(t)(x0, 0, ...) + L_t eps has mean E(t) e_1 x0 and covariance Sigma_t + delta I.

    Monte Carlo on the fastest usable backend (the others are tied to it by the reference tests)."""
    proc, t, x0 = HOLD(3, L=2.0, alpha=0.08), 0.4, 0.7
    samples = 100_000
    z, eps_n = proc.perturb(torch.full((1, 1, samples), x0, dtype=F64), torch.tensor([t], dtype=F64),
                            seed=torch.tensor([2024]), backend=FAST)
    zs = z.reshape(3, samples)
    mean_ref = proc.transition(t)[:, 0] * x0
    cov_ref = proc.cov(t, jitter=True)
    se_mean = torch.sqrt(torch.diagonal(cov_ref) / samples)
    assert ((zs.mean(1) - mean_ref).abs() <= 4 * se_mean).all()
    cov = torch.cov(zs)
    se_cov = torch.sqrt((cov_ref**2 + torch.outer(torch.diagonal(cov_ref), torch.diagonal(cov_ref))) / samples)
    assert ((cov - cov_ref).abs() <= 4 * se_cov).all(), (cov, cov_ref)
    torch.testing.assert_close(eps_n, philox.noise_like(z, torch.tensor([2024]), 0).reshape(1, 3, -1)[:, 2:])

#----------------------------------------------------------------------------
# Bad input: clear errors, nothing written.


def _bad(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_transition_bad_input():
    table, z, eps = random_hold_table(3), make_tensor((2, 6, 5)), make_tensor((2, 2, 5))
    _bad(lambda: hold_transition(make_tensor((2, 7, 5)), eps, table, 0), ValueError, "multiple of the order n = 3")
    _bad(lambda: hold_transition(make_tensor((6,)), eps, table, 0), ValueError, "at least 2 dims")
    _bad(lambda: hold_transition(z, make_tensor((2, 3, 5)), table, 0), ValueError, "eps_hat: expected shape")
    _bad(lambda: hold_transition(z, eps, table.float(), 0), TypeError, "coef: expected dtype torch.float64")
    _bad(lambda: hold_transition(z, eps, table[:, :, :5], 0), ValueError, r"coef: expected shape \(N, n, 2n\+1\)")
    _bad(lambda: hold_transition(z, eps, table, 3), IndexError, "step")
    _bad(lambda: hold_transition(z, eps, table, 0, seed=torch.tensor([1.0])), TypeError, "seed")
    _bad(lambda: hold_transition(z, eps, table, 0, seed=torch.tensor([1, 2, 3])), ValueError, "seed")
    _bad(lambda: hold_transition(z.long(), eps, table, 0), TypeError, "z: expected a floating dtype")
    _bad(lambda: hold_transition(z, eps, table, 0, out=torch.empty(2, 6, 5, dtype=F64)), TypeError, "out")
    big = torch.zeros(1, 12, 25, dtype=F64)  # n > 8 runs on reference only (tests/test_hold_high_order.py)
    _bad(lambda: hold_transition(make_tensor((1, 13, 2)), make_tensor((1, 1, 2)), big, 0), ValueError,
         "multiple of the order n = 12")
    nan_table = table.clone()
    nan_table[1, 0, 0] = math.nan
    _bad(lambda: hold_transition(z, eps, nan_table, 1), ValueError, "non-finite")
    upper = table.clone()
    upper[0, 0, 3 + 1 + 2] = 1.0  # C[0, 2]
    _bad(lambda: hold_transition(z, eps, upper, 0), ValueError, "lower triangular")
    buf = torch.zeros(2 * 6 * 5 + 1)
    z_in = buf[1:].view(2, 6, 5)
    z_in.copy_(z)
    _bad(lambda: hold_transition(z_in, eps, table, 0, out=buf[:-1].view(2, 6, 5)), ValueError, "overlaps")
    assert torch.equal(z_in, z), "a failed call must write nothing"
    _bad(lambda: transition_table(torch.zeros(2, 3, 3), torch.zeros(2, 2), torch.zeros(2, 3, 3)), ValueError, "k:")


def test_perturb_bad_input():
    z0, mean_mat, chol = perturb_inputs(2, 3, 1, 2, (4,), torch.float32)
    _bad(lambda: hold_perturb(z0, mean_mat.float(), chol), TypeError, "mean_mat: expected dtype torch.float64")
    _bad(lambda: hold_perturb(z0, mean_mat[:1], chol), ValueError, "mean_mat: expected shape")
    _bad(lambda: hold_perturb(z0, torch.zeros(2, 3, 2, dtype=F64), chol), ValueError, "m in")
    _bad(lambda: hold_perturb(z0, mean_mat, chol[:, :2]), ValueError, "chol: expected shape")
    _bad(lambda: hold_perturb(make_tensor((2, 5, 4)), torch.zeros(2, 3, 3, dtype=F64), chol), ValueError,
         "multiple of the order")
    _bad(lambda: hold_perturb(z0, mean_mat, chol, eps_out=torch.empty(2, 6, 4)), ValueError, "eps_out")
    _bad(lambda: hold_perturb(z0, mean_mat, chol, out=torch.empty(2, 2, 4)), ValueError, "out: expected shape")
    bad = chol.clone()
    bad[0, 1, 1] = math.inf
    _bad(lambda: hold_perturb(z0, mean_mat, bad), ValueError, "chol: non-finite")
    _bad(lambda: hold_perturb(z0, mean_mat, chol, step=-1), ValueError, "step")


@pytest.mark.skipif("cpp" not in usable_backends("cpu"), reason="needs the C++ extension")
def test_cpp_op_checks_its_arguments():
    """The torch op itself validates (it can be called without the front-end)."""
    table, eps = random_hold_table(3), make_tensor((2, 2, 5))
    with pytest.raises(RuntimeError, match="not a multiple of the order n = 3"):
        torch.ops.diffkern.hold_transition(make_tensor((2, 7, 5)), eps, None, table, 0, torch.zeros(1, dtype=torch.int64),
                                           torch.empty(2, 7, 5))
    z0, mean_mat, chol = perturb_inputs(2, 3, 1, 2, (4,), torch.float32)
    with pytest.raises(RuntimeError, match="chol: expected shape"):
        torch.ops.diffkern.hold_perturb(z0, mean_mat, chol[:, :2].contiguous(), None, 0,
                                        torch.zeros(1, dtype=torch.int64), torch.empty(2, 6, 4), None)


def test_ops_are_registered():
    assert {"hold_transition", "hold_perturb"} <= set(dops.ops())

#----------------------------------------------------------------------------
# On a GPU: the CUDA and Triton kernels against the reference (which runs on any device).

CUDA_BACKENDS = [b for b in ("cuda", "triton") if b in usable_backends("cuda")]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n", (1, 3, 6, MAX_ORDER))
def test_transition_cuda(backend, dtype, n):
    for seed in (torch.tensor([5]), torch.tensor([5, 6, 7])):
        z = make_tensor((3, n * 5, 33, 7), dtype, device="cuda")
        eps = make_tensor((3, 5, 33, 7), dtype, seed=1, device="cuda")
        check_transition(backend, z, eps, random_hold_table(n, zero_noise_col=0).cuda(), 2, seed=seed.cuda(),
                         what=f"cuda n={n} {dtype}")
    z = make_tensor((2, n * 3, 1000), dtype, device="cuda")
    check_transition(backend, z, make_tensor((2, 3, 1000), dtype, seed=1, device="cuda"), random_hold_table(n).cuda(),
                     1, noise=make_tensor(z.shape, dtype, seed=2, device="cuda"), what="explicit noise")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n", (1, 2, 3, 4, 5, MAX_ORDER))
def test_transition_cuda_whole_groups(backend, dtype, n):
    """P % 4 == 0: the CUDA kernel takes four elements per thread and one Philox group per component (float
    compute), compiled for the order for n = 2, 3, 4 and for any order otherwise; an input one element off
    16-byte alignment, or P % 4 != 0, takes the one-element kernel."""
    for seed in (torch.tensor([5]), torch.tensor([5, 6, 7])):
        z = make_tensor((3, n * 4, 8, 5), dtype, device="cuda")  # P = 160
        eps = make_tensor((3, 4, 8, 5), dtype, seed=1, device="cuda")
        table = random_hold_table(n).cuda()
        check_transition(backend, z, eps, table, 2, seed=seed.cuda(), what=f"P % 4 == 0, n={n} {dtype}")
        ref64 = hold_transition_reference(z.double(), eps.double(), table, 2, seed=seed.cuda())
        eager = hold_transition_reference(z, eps, table, 2, seed=seed.cuda())
        assert hold_transition(z, eps, table, 2, seed=seed.cuda(), out=z, backend=backend) is z
        assert_matches_reference(z, ref64, eager, f"out=z, P % 4 == 0 [{backend}]")
    flat = make_tensor((2 * n * 40 + 1,), dtype, device="cuda")
    z = flat[1:].view(2, n * 4, 2, 5)  # P = 40, the pointer one element past an aligned one
    check_transition(backend, z, make_tensor((2, 4, 2, 5), dtype, seed=1, device="cuda"), random_hold_table(n).cuda(),
                     1, seed=torch.tensor([9], device="cuda"), what="misaligned z")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n,m", [(3, 1), (4, 4), (MAX_ORDER, 1)])
def test_perturb_cuda(backend, dtype, n, m):
    z0, mean_mat, chol = perturb_inputs(3, n, m, 2, (9, 17), dtype)
    z0, mean_mat, chol = z0.cuda(), mean_mat.cuda(), chol.cuda()
    seed = torch.tensor([1, 2, 3], device="cuda")
    check_perturb(backend, z0, mean_mat, chol, n * 2, seed=seed, step=7, what="cuda perturb")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n", (1, 2, 3, 4, 5, MAX_ORDER))
def test_perturb_cuda_whole_groups(backend, dtype, n):
    """P % 4 == 0: four elements per thread, one Philox group per component, the kernel of the order for n = 2,
    3, 4 (as hold_transition); explicit noise; a misaligned eps_out takes the one-element kernel."""
    for m, seed in ((1, torch.tensor([5])), (n, torch.tensor([5, 6, 7]))):
        z0, mean_mat, chol = (t.cuda() for t in perturb_inputs(3, n, m, 4, (8, 5), dtype))  # P = 160
        check_perturb(backend, z0, mean_mat, chol, n * 4, seed=seed.cuda(), step=2,
                      what=f"perturb P % 4 == 0, n={n} m={m}")
    noise = make_tensor((3, n * 4, 8, 5), dtype, seed=3, device="cuda")
    check_perturb(backend, z0, mean_mat, chol, n * 4, noise=noise, what=f"perturb explicit noise n={n}")
    flat = torch.empty((3 * 4 * 40 + 1,), dtype=dtype, device="cuda")
    check_perturb(backend, z0, mean_mat, chol, n * 4, seed=seed.cuda(), step=2, eps_out=flat[1:].view(3, 4, 8, 5),
                  what=f"perturb misaligned eps_out (one element past an aligned pointer) n={n}")


@pytest.mark.cuda
def test_cuda_noise_free_step_is_bitwise_the_cpu_step():
    """No FMA on either side (csrc/common/hd.h): a row without noise rounds identically on CPU and GPU."""
    if "cpp" not in usable_backends("cpu") or "cuda" not in CUDA_BACKENDS:
        pytest.skip("needs the cpp and cuda backends")
    table = transition_table(random_hold_table(3)[:, :, :3], random_hold_table(3)[:, :, 3], torch.zeros(3, 3, 3, dtype=F64))
    z, eps = make_tensor((2, 9, 333)), make_tensor((2, 3, 333), seed=1)
    cpu = hold_transition(z, eps, table, 1, backend="cpp")
    gpu = hold_transition(z.cuda(), eps.cuda(), table.cuda(), 1, backend="cuda")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
