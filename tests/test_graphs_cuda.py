"""The CUDA-graph runner on real CUDA graphs (``@pytest.mark.cuda``; skipped without a GPU): graph output
bitwise equal to eager, fresh noise per seed, no host sync in the loop, bounded memory, low-precision and
compiled models, guidance, clean capture failures. The CPU tests of the runner are in ``test_graphs.py``.
"""
import pytest
import torch

from diffkern import graphs, hold, hold_sampling, schedules
from diffkern.graphs import GraphCaptureError, GraphFallbackWarning
from diffkern.sampling import sample, sample_iadb
from test_graphs import EVERY, fresh_cache, gmm3, start  # noqa: F401  (fresh_cache: autouse fixture)
from test_graphs_iadb_hold import _iadb_models


CUDA_BACKENDS = ["cuda", "triton"]


class TinyNet(torch.nn.Module):
    """A small conv denoiser with a sigma embedding (random weights): cuDNN, GroupNorm and cuBLAS in the loop."""

    def __init__(self, channels=3, width=32):
        super().__init__()
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.emb = torch.nn.Linear(1, width)
        self.norm = torch.nn.GroupNorm(8, width)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, sigma):
        h = self.inp(x) + self.emb(torch.log(sigma.to(x.dtype))[:, None])[:, :, None, None]
        return x - sigma.to(x.dtype)[:, None, None, None] * self.out(torch.nn.functional.silu(self.norm(h))) * 0.1


def _cuda_x(n=4, dtype=torch.float32):
    return start(n, dim=2, dtype=dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("method,kw", EVERY, ids=[f"{m}-{kw}" for m, kw in EVERY])
def test_cuda_graph_equals_eager_bitwise(method, kw, backend):
    gmm, sig = gmm3(), schedules.karras(6, 0.05, 10.0)
    for i, seed in enumerate((1, 2)):
        x = start(64, seed=i, dtype=torch.float32, device="cuda")
        y, traj = sample(gmm, x, sig, method, backend=backend, seed=seed, record=True, graph=True, **kw)
        y_eager, traj_eager = sample(gmm, x, sig, method, backend=backend, seed=seed, record=True, **kw)
        assert torch.equal(y, y_eager) and all(torch.equal(traj[k], traj_eager[k]) for k in traj)
    assert graphs.info()["captures"] == 1


@pytest.mark.cuda
def test_cuda_seeds():
    gmm, x, sig = gmm3(), _cuda_x(64), schedules.karras(6, 0.05, 10.0)
    a = sample(gmm, x, sig, "euler_ancestral", seed=1, graph=True)
    assert not torch.equal(a, sample(gmm, x, sig, "euler_ancestral", seed=2, graph=True))
    assert torch.equal(a, sample(gmm, x, sig, "euler_ancestral", seed=1, graph=True))
    assert not torch.equal(sample(gmm, x, sig, "euler_ancestral", seed=None, graph=True),
                           sample(gmm, x, sig, "euler_ancestral", seed=None, graph=True))
    seeds = torch.arange(64, dtype=torch.int64, device="cuda") * 7919
    full = sample(gmm, x, sig, "euler_ancestral", seed=seeds, graph=True)
    assert torch.equal(full, sample(gmm, x, sig, "euler_ancestral", seed=seeds))
    part = sample(gmm, x[10:20], sig, "euler_ancestral", seed=seeds[10:20], graph=True)
    torch.testing.assert_close(full[10:20], part, rtol=1e-5, atol=1e-5)  # other batch: other reduction sizes


@pytest.mark.cuda
def test_cuda_replay_and_schedule_rewrite_have_no_host_sync():
    model, x = TinyNet().cuda(), torch.randn(8, 3, 16, 16, device="cuda")
    sig_a, sig_b = schedules.karras(8, 0.05, 10.0), schedules.loglinear(8, 0.1, 8.0)
    sample(model, x, sig_a, "dpmpp_2m", graph=True)  # capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [sample(model, x, sig, "dpmpp_2m", seed=s, graph=True) for s, sig in enumerate((sig_a, sig_b, sig_a))]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert graphs.info()["captures"] == 1 and graphs.info()["table_writes"] == 4
    assert torch.equal(outs[1], sample(model, x, sig_b, "dpmpp_2m", seed=1))


@pytest.mark.cuda
def test_cuda_eager_iadb_and_hold_loops_have_no_host_sync():
    x0 = torch.randn(16, 3, 8, 8, device="cuda")
    proc = hold.HOLD(order=2)
    iadb_model = lambda x, a: torch.tanh(x) * a[:, None, None, None]  # noqa: E731
    hold_model = lambda z, t: torch.tanh(z[:, :3]) * t  # noqa: E731
    sample_iadb(iadb_model, x0, steps=4, variant="stochastic")  # warm up: first-use loads, allocations
    hold_sampling.sample(hold_model, proc, (16, 3, 8, 8), num_steps=5, device="cuda")
    state = []

    def syncing_from_first_call(model):
        def f(*args):
            if not state:
                state.append(True)
                torch.cuda.set_sync_debug_mode("error")  # from the first model call on: set-up is done
            return model(*args)
        return f

    try:
        sample_iadb(syncing_from_first_call(iadb_model), x0, steps=6, variant="stochastic")
        torch.cuda.set_sync_debug_mode("default")
        state.clear()
        hold_sampling.sample(syncing_from_first_call(hold_model), proc, (16, 3, 8, 8), num_steps=5, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_memory_does_not_grow():
    model, x, sig = TinyNet().cuda(), torch.randn(8, 3, 16, 16, device="cuda"), schedules.karras(10, 0.05, 10.0)
    for _ in range(2):
        sample(model, x, sig, "euler_ancestral", seed=None, graph=True, record=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(100):
        y, traj = sample(model, x, sig if i % 2 else schedules.loglinear(10, 0.1, 9.0), "euler_ancestral",
                         seed=None, graph=True, record=True)
    del y, traj
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert graphs.info()["captures"] == 1


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["euler", "two_head", "stochastic"])
def test_cuda_iadb_graph_equals_eager(variant):
    model = _iadb_models("cuda")[variant]
    x0 = start(64, sigma_max=1.0, dtype=torch.float32, device="cuda")
    for alphas, seed in ((None, 1), ([0.0, 0.2, 0.4, 0.6, 0.85, 0.97, 1.0], 2)):
        g = sample_iadb(model, x0, alphas, variant, steps=6, seed=seed, record=True, graph=True)
        e = sample_iadb(model, x0, alphas, variant, steps=6, seed=seed, record=True)
        assert torch.equal(g[0], e[0]) and all(torch.equal(g[1][k], e[1][k]) for k in e[1])


@pytest.mark.cuda
@pytest.mark.parametrize("sampler", hold_sampling.SAMPLERS)
def test_cuda_hold_graph_equals_eager(sampler):
    proc = hold.HOLD(order=3)
    model = lambda z, t: torch.tanh(z[:, :3] * (0.5 + t)) - 0.1 * z[:, 3:6]  # noqa: E731
    for seed in (1, 2):
        g = graphs.sample_hold(model, proc, (8, 3, 8, 8), sampler=sampler, num_steps=10, seed=seed, device="cuda")
        e = hold_sampling.sample(model, proc, (8, 3, 8, 8), sampler=sampler, num_steps=10, seed=seed, device="cuda")
        assert torch.equal(g, e)
    assert graphs.info()["captures"] == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_model(dtype):
    model = TinyNet().cuda().to(dtype)
    x, sig = torch.randn(8, 3, 16, 16, device="cuda", dtype=dtype), schedules.karras(8, 0.05, 10.0)
    for method in ("heun", "euler_ancestral"):
        y = sample(model, x, sig, method, seed=3, graph=True)
        assert y.dtype == dtype and torch.equal(y, sample(model, x, sig, method, seed=3))


@pytest.mark.cuda
def test_cuda_torch_compiled_model():
    model = torch.compile(TinyNet().cuda())  # default mode: Inductor kernels, no CUDA graphs of its own
    x, sig = torch.randn(8, 3, 16, 16, device="cuda"), schedules.karras(6, 0.05, 10.0)
    y = sample(model, x, sig, "dpmpp_2m", graph=True)
    assert torch.equal(y, sample(model, x, sig, "dpmpp_2m"))
    assert torch.equal(sample(model, x * 0.5, sig, "dpmpp_2m", graph=True), sample(model, x * 0.5, sig, "dpmpp_2m"))


@pytest.mark.cuda
def test_cuda_classifier_free_guidance_unet():
    diffusers = pytest.importorskip("diffusers")
    from diffkern.wrappers import DiffusersUNetDenoiser

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 num_class_embeds=11).cuda().eval()
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000)
    model = DiffusersUNetDenoiser(unet, sched, guidance_scale=3.0).cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda") * 10
    labels = torch.tensor([1, 2, 3, 4], device="cuda")
    extra = {"class_labels": labels, "uncond_class_labels": torch.full_like(labels, 10)}
    sig = schedules.karras(8, 0.05, 10.0)
    for lab in (labels, labels.flip(0)):
        extra["class_labels"] = lab
        y = sample(model, x, sig, "dpmpp_2m", extra_args=extra, graph=True)
        assert torch.equal(y, sample(model, x, sig, "dpmpp_2m", extra_args=extra))
    assert graphs.info()["captures"] == 1


@pytest.mark.cuda
def test_cuda_capture_failures_are_clean():
    gmm, x, sig = gmm3(), _cuda_x(16), schedules.karras(4, 0.05, 10.0)
    syncing = lambda x, s: gmm.denoise(x, s) * (1.0 if s[0].item() > 0 else 2.0)  # noqa: E731

    def masking(x, s):
        d = gmm.denoise(x, s)
        return d[d.abs() < 1e9].reshape(d.shape)  # boolean indexing: nonzero, a data-dependent shape

    for model in (syncing, masking):
        with pytest.raises(GraphCaptureError, match="may not synchronise with the host"):
            sample(model, x, sig, "euler", graph=True)
        graphs.clear()  # forget the failure: graph="auto" attempts the capture again and says why it failed
        with pytest.warns(GraphFallbackWarning, match="graph='auto' runs eager: capturing"):
            y = sample(model, x, sig, "euler", graph="auto")
        assert torch.equal(y, sample(model, x, sig, "euler"))
    assert graphs.info()["entries"] == 0
    # The thread is back on its stream, torch's generator is out of capture mode, the next capture works.
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randn(1, device="cuda")
    y = sample(gmm, x, sig, "euler_ancestral", seed=5, graph=True)  # the device is fine after failed captures
    assert torch.equal(y, sample(gmm, x, sig, "euler_ancestral", seed=5))


@pytest.mark.cuda
def test_cuda_a_failed_capture_leaves_the_pool_usable_without_clear():
    """No graphs.clear() between a failed capture and the next one: the shared pool must not stay recording."""
    gmm, x, sig = gmm3(), _cuda_x(16), schedules.karras(4, 0.05, 10.0)
    with pytest.raises(GraphCaptureError):
        sample(lambda x, s: gmm.denoise(x, s) * float(s[0]), x, sig, "euler", graph=True)  # float(): a sync
    y = sample(gmm, x, sig, "heun", graph=True)
    assert torch.equal(y, sample(gmm, x, sig, "heun"))


@pytest.mark.cuda
def test_cuda_outputs_are_not_aliases():
    gmm, x, sig = gmm3(), _cuda_x(16), schedules.karras(4, 0.05, 10.0)
    y1 = sample(gmm, x, sig, "euler_ancestral", seed=1, graph=True)
    kept = y1.clone()
    sample(gmm, x, sig, "euler_ancestral", seed=2, graph=True)
    assert torch.equal(y1, kept)
    assert y1.data_ptr() != next(iter(graphs._cache.values())).x.data_ptr()
