"""User-journey review of HOLD sampling (``diffkern.hold_sampling.sample``) as the README presents it.

The model is the exact score of Gaussian(-mixture) data (``GaussianMixtureScore``). The oracle is written here in
float64 from the README's definitions: F (critical damping, gamma_j), G = sqrt(2 xi / L) e_n, E(t) = expm(F t) and
Q(t) by Van Loan's block exponential (scipy), the textbook reverse-time Euler-Maruyama and probability-flow Euler
steps, and the data marginal N(a m0, s0^2 a a^T + E Sigma_0 E^T + Q), a = E e_1. The IADB half of the review is
``test_hold_iadb_journey_review.py``.
"""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from diffkern import graphs
from diffkern.hold import HOLD
from diffkern.hold_sampling import SAMPLERS, GaussianMixture, GaussianMixtureScore, prior, sample, time_grid
from diffkern.testing import assert_matches_reference
from test_hold_math_review import moment_check

F64 = torch.float64
REF = "reference"
M0, S0 = 0.5, 0.2  # Gaussian data N(M0, S0^2)
L, ALPHA, T, T_MIN = 2.0, 0.08, 5.0, 1e-3  # the README's defaults


def textbook_drift(n: int) -> np.ndarray:
    """F from the README: r = sqrt(2n-3) (1 for n = 1), xi = n r, gamma_j^2 = r^2 j(2n-j)/((2n-2j-1)(2n-2j+1))."""
    r = math.sqrt(2 * n - 3) if n > 1 else 1.0
    F = np.zeros((n, n))
    for j in range(1, n):
        g = r * math.sqrt(j * (2 * n - j) / ((2 * n - 2 * j - 1) * (2 * n - 2 * j + 1)))
        F[j - 1, j], F[j, j - 1] = g, -g
    F[n - 1, n - 1] = -n * r
    return F


class Oracle:
    """Textbook reverse-time steps for N(M0, S0^2) data under HOLD(n) with beta = 1 (b = t)."""

    def __init__(self, n: int):
        self.n, self.F = n, textbook_drift(n)
        self.gg = 2 * (-self.F[n - 1, n - 1]) / L  # (G G^T)_nn = 2 xi / L

    def score_affine(self, t: float):
        """(P, c) with s(z) = -P z + c: the exact score of the marginal at forward time t."""
        n, E = self.n, scipy.linalg.expm(self.F * t)
        GG = np.zeros((n, n))
        GG[n - 1, n - 1] = self.gg
        blk = scipy.linalg.expm(np.block([[-self.F, GG], [np.zeros((n, n)), self.F.T]]) * t)
        Q = blk[n:, n:].T @ blk[:n, n:]
        a = E[:, 0]
        V = S0 ** 2 * np.outer(a, a) + E @ np.diag([0.0] + [ALPHA / L] * (n - 1)) @ E.T + Q
        P = np.linalg.inv(V)
        return P, P @ a * M0

    def rows(self, grid, weight: float):
        """Affine maps z' = A z + c (+ sqrt(weight * gg * h) eta on z_n) of each step, then the denoising EM step."""
        n, out = self.n, []
        steps = list(zip(grid[:-1], grid[1:])) + [(grid[-1], 0.0)]
        for i, (s, s_next) in enumerate(steps):
            h, last = s - s_next, i == len(steps) - 1
            P, c = self.score_affine(s)
            w = 2.0 if last else weight  # the denoising step is EM's mean
            A = np.eye(n) - h * self.F
            A[n - 1] -= h * w / 2 * self.gg * P[n - 1]  # + h (w/2) gg s_n e_n
            shift = np.zeros(n)
            shift[n - 1] = h * w / 2 * self.gg * c[n - 1]
            out.append((A, shift, 0.0 if last else (weight - 1) * self.gg * h))
        return out


def gaussian_model(n, **kw):
    proc = HOLD(n, **kw)
    return proc, GaussianMixtureScore(proc, GaussianMixture([1.0], [[M0]], [S0]), elementwise=True)

#----------------------------------------------------------------------------
# The model protocol and the samplers against the textbook steps.


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_model_protocol(sampler):
    """The model gets the state (B, n*C, ...) in the requested dtype and a Python float forward time: the grid's
    first num_steps - 1 times, then t_min for the denoising call; it returns eps_hat of the data shape."""
    proc, seen = HOLD(2), []

    def model(z, t):
        seen.append((tuple(z.shape), z.dtype, type(t), t))
        return torch.tanh(z[:, 3:]) * 0.1
    x = sample(model, proc, (2, 3, 4), sampler=sampler, num_steps=5, dtype=F64)
    assert x.shape == (2, 3, 4) and x.dtype == F64 and torch.isfinite(x).all()
    grid = time_grid(proc, 4).tolist()
    assert seen == [((2, 6, 4), F64, float, t) for t in grid[:-1] + [grid[-1]]]


def test_em_law_matches_the_textbook_sampler():
    """n = 3, 12 EM steps and the denoising step on the README's defaults, float32: the moments of the returned
    state (x and both velocities) are those of the textbook EM law from the N(0, I/L) prior, within 5 SE."""
    n, steps, S = 3, 12, 40000
    proc, model = gaussian_model(n)
    z = sample(model, proc, (1, 1, S), sampler="em", num_steps=steps + 1, seed=3, return_state=True)
    assert z.dtype == torch.float32 and z.shape == (1, n, S)
    mean, cov = np.zeros(n), np.eye(n) / L
    for A, c, noise in Oracle(n).rows(time_grid(proc, steps).tolist(), 2.0):
        mean, cov = A @ mean + c, A @ cov @ A.T
        cov[n - 1, n - 1] += noise
    moment_check(z.reshape(n, S), mean, cov)


@pytest.mark.parametrize("spacing", ["linear", "quadratic"])
def test_ode_is_the_textbook_probability_flow_euler(spacing):
    """n = 2, float64, a given prior state: the "ode" sampler's output state is the textbook Euler loop of the
    probability-flow ODE plus the denoising EM mean step, applied to the same state."""
    n, steps = 2, 9
    proc, model = gaussian_model(n)
    z0 = prior(proc, (1, n, 50), torch.tensor([4]), dtype=F64)
    got = sample(model, proc, (1, 1, 50), sampler="ode", num_steps=steps + 1, spacing=spacing, z=z0.clone(),
                 return_state=True)
    want = z0.reshape(n, 50).numpy()
    for A, c, _ in Oracle(n).rows(time_grid(proc, steps, spacing=spacing).tolist(), 1.0):
        want = A @ want + c[:, None]
    np.testing.assert_allclose(got.reshape(n, 50).numpy(), want, rtol=1e-10, atol=1e-10)


def test_readme_example_runs_as_written_at_small_size():
    """The README's 8-mode 2-D mixture through HOLD(3) and SSCS (fewer samples and steps): (B, 2) float32, every
    sample near a mode, and repeated calls are identical (seed=0)."""
    proc = HOLD(3)
    angle = torch.arange(8, dtype=F64) * (2 * math.pi / 8)
    mix = GaussianMixture(torch.arange(1, 9, dtype=F64) / 36, torch.stack([2 * angle.cos(), 2 * angle.sin()], 1),
                          torch.full((8,), 0.2))
    model = GaussianMixtureScore(proc, mix)
    x = sample(model, proc, (300, 2), sampler="sscs", num_steps=40, seed=0)
    assert x.shape == (300, 2) and x.dtype == torch.float32
    assert float(torch.cdist(x.double(), mix.means).min(1).values.max()) < 6 * 0.2
    assert torch.equal(x, sample(model, proc, (300, 2), sampler="sscs", num_steps=40, seed=0))

#----------------------------------------------------------------------------
# dtypes, shapes, seeds, the initial state, autograd, graph mode.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_dtypes_on_an_awkward_batch_of_one(sampler, dtype):
    """(1, 3, 5, 7) data, n = 2, each sampler: dtype and shape kept, and within the dtype rule of the float64 run of
    the same seed (eager: the reference backend at that dtype)."""
    proc, model = gaussian_model(2)
    kw = dict(sampler=sampler, num_steps=8, seed=6)
    got = sample(model, proc, (1, 3, 5, 7), dtype=dtype, **kw)
    assert got.shape == (1, 3, 5, 7) and got.dtype == dtype
    ref = sample(model, proc, (1, 3, 5, 7), dtype=F64, backend=REF, **kw)
    eager = sample(model, proc, (1, 3, 5, 7), dtype=dtype, backend=REF, **kw)
    assert_matches_reference(got, ref, eager, f"{sampler} {dtype}")


def test_seeds():
    """Same seed, same output; per-sample seeds do not depend on the rest of the batch (prior and steps); seed=None
    follows torch's global generator; different seeds differ."""
    proc, model = HOLD(3), GaussianMixtureScore(HOLD(3), GaussianMixture([0.4, 0.6], [[-1.0], [1.0]], [0.3, 0.2]))
    kw = dict(sampler="em", num_steps=6)
    a = sample(model, proc, (6, 1), seed=2, **kw)
    assert torch.equal(a, sample(model, proc, (6, 1), seed=2, **kw))
    assert not torch.equal(a, sample(model, proc, (6, 1), seed=3, **kw))
    per = torch.arange(20, 26)
    assert torch.equal(sample(model, proc, (6, 1), seed=per, **kw)[1:4],
                       sample(model, proc, (3, 1), seed=per[1:4], **kw))
    torch.manual_seed(0)
    b = sample(model, proc, (6, 1), seed=None, **kw)
    torch.manual_seed(0)
    assert torch.equal(b, sample(model, proc, (6, 1), seed=None, **kw))


def test_given_state_is_updated_in_place_and_sets_dtype():
    proc, model = gaussian_model(2)
    z = prior(proc, (3, 2, 4), torch.tensor([1]), dtype=F64)
    start = z.clone()
    out = sample(model, proc, (3, 1, 4), num_steps=4, z=z, return_state=True)
    assert out is z and out.dtype == F64 and not torch.equal(z, start)
    again = sample(model, proc, (3, 1, 4), num_steps=4, z=start.clone(), dtype=torch.float32)  # z's dtype wins
    torch.testing.assert_close(again, z[:, :1], rtol=0, atol=0)


class LinearEps(torch.nn.Module):
    """A network with trainable weights: eps_hat from the state's components."""

    def __init__(self, n: int):
        super().__init__()
        self.lin = torch.nn.Linear(n, 1)

    def forward(self, z, t):
        return self.lin(z.movedim(1, -1)).movedim(-1, 1) * 0.1


def test_no_autograd_through_the_loop():
    """A module with trainable weights: no backend records the loop in autograd (the reference op did, chaining
    every step's activations and returning a tensor with a grad_fn), and the backends agree."""
    proc, net = HOLD(2), LinearEps(2).double()
    outs = {}
    for backend in (REF, None):
        outs[backend] = sample(net, proc, (2, 1, 3), num_steps=5, dtype=F64, backend=backend)
        assert not outs[backend].requires_grad and outs[backend].grad_fn is None
    torch.testing.assert_close(outs[None], outs[REF], rtol=1e-12, atol=1e-12)


def test_graph_mode_on_cpu():
    """graph=True refuses the CPU (naming CUDA); "auto" warns (GraphFallbackWarning) and is the eager sampler."""
    proc, model = gaussian_model(2)
    with pytest.raises(ValueError, match=r"^device: CUDA graphs need a CUDA device, got cpu"):
        graphs.sample_hold(model, proc, (2, 1, 3), num_steps=4, graph=True)
    z = torch.zeros(2, 2, 3)
    with pytest.raises(ValueError, match=r"^z: CUDA graphs need a CUDA device, got cpu"):
        graphs.sample_hold(model, proc, (2, 1, 3), num_steps=4, graph=True, z=z)
    graphs.clear()  # forgets earlier fallback warnings of this process
    with pytest.warns(graphs.GraphFallbackWarning, match="runs eager"):
        got = graphs.sample_hold(model, proc, (2, 1, 3), sampler="em", num_steps=4, seed=1, graph="auto")
    assert torch.equal(got, sample(model, proc, (2, 1, 3), sampler="em", num_steps=4, seed=1))

#----------------------------------------------------------------------------
# Bad input: errors name the argument, before any state is corrupted.


def test_bad_input_names_the_argument():
    proc, model = gaussian_model(2)
    with pytest.raises(TypeError, match="model: expected a callable"):
        sample(None, proc, (2, 1), num_steps=3)
    with pytest.raises(TypeError, match="proc: expected a diffkern.hold.HOLD process, got str"):
        sample(model, "HOLD", (2, 1), num_steps=3)
    with pytest.raises(TypeError, match="shape: expected the data shape .* got int"):
        sample(model, proc, 4, num_steps=3)
    with pytest.raises(ValueError, match=r"model: expected eps_hat of the data shape \(2, 1\).*got \(2, 2\)"):
        sample(lambda z, t: z * 1, proc, (2, 1), num_steps=3)
    with pytest.raises(TypeError, match="model: expected a floating tensor eps_hat"):
        sample(lambda z, t: 0.0, proc, (2, 1), num_steps=3)
    with pytest.raises(ValueError, match="model: returned a view of its input z"):
        sample(lambda z, t: z[:, 1:], proc, (2, 1), num_steps=3)
    z = prior(proc, (2, 2), torch.tensor([0]))
    before = z.clone()
    with pytest.raises(RuntimeError, match="model: modified its input z in place"):
        sample(lambda z, t: z.mul_(0.5)[:, 1:].clone(), proc, (2, 1), num_steps=3, z=z)
    torch.testing.assert_close(z, before * 0.5, rtol=0, atol=0)  # the model's write only: no step ran on it
