"""``torch.library.opcheck`` on every ``torch.ops.diffkern.*`` op whose backend is usable here, and
``torch.compile(fullgraph=True)`` through the ops.

The op arguments of each case are the exact ones a public front-end launches with: the front-end is
called with a recording launcher in place of the registry's (so the cases follow the front-ends).
Executable rule: every schema in ``diffkern.ops._lib.SCHEMAS`` has a case here.
"""
import pytest
import torch

import diffkern.ops as dops
from diffkern.ops import _lib, coefs, registry
from diffkern.testing import make_tensor, random_table, sampler_step_inputs, usable_backends

OP_BACKENDS = ("cpp", "triton")  # the backends implemented as torch.ops (reference and cuda are not checked here)
SEED = torch.tensor([1234], dtype=torch.int64)


def _sampler_step_cases():
    full = sampler_step_inputs((2, 3, 5), noise="explicit", history2=True, history3=True)
    philox = sampler_step_inputs((3, 7), torch.bfloat16, model_dtype=torch.float32, per_sample_seed=True)
    return {
        "minimal": lambda: dops.sampler_step(make_tensor((2, 9)), make_tensor((2, 9), seed=1), random_table(2, c=0.0), 1),
        "all-outputs": lambda: dops.sampler_step(**full, x0_out=torch.empty(2, 3, 5), history_out=torch.empty(2, 3, 5)),
        "philox-mixed-dtypes": lambda: dops.sampler_step(**philox, x0_out=torch.empty(3, 7, dtype=torch.bfloat16)),
    }


def _hold_cases():
    from diffkern.ops import hold

    n, steps = 2, 3
    gen = torch.Generator().manual_seed(0)
    K = torch.rand(steps, n, n, generator=gen, dtype=torch.float64)
    k = torch.rand(steps, n, generator=gen, dtype=torch.float64)
    C = torch.tril(torch.rand(steps, n, n, generator=gen, dtype=torch.float64))
    table = hold.transition_table(K, k, C)
    mean_mat = torch.rand(2, n, 1, generator=gen, dtype=torch.float64)
    chol = torch.tril(torch.rand(2, n, n, generator=gen, dtype=torch.float64)) + torch.eye(n, dtype=torch.float64)
    z, eps_hat, z0 = make_tensor((2, n * 3, 5)), make_tensor((2, 3, 5), seed=1), make_tensor((2, 3, 5), seed=2)
    return {
        "hold_transition": {
            "philox": lambda: dops.hold_transition(z, eps_hat, table, 2, seed=SEED),
            "explicit-noise": lambda: dops.hold_transition(z, eps_hat, table, 1, noise=make_tensor(z.shape, seed=3)),
        },
        "hold_perturb": {
            "philox": lambda: dops.hold_perturb(z0, mean_mat, chol, seed=SEED, step=4),
            "eps-out": lambda: dops.hold_perturb(z0, mean_mat, chol, noise=make_tensor(z.shape, seed=4),
                                                 eps_out=torch.empty(2, 3, 5)),
        },
    }


def _cases():
    """{family: {case name: zero-argument call of the public front-end}}."""
    y = make_tensor((3, 2, 5))
    cases = {
        "sampler_step": _sampler_step_cases(),
        "iadb_blend": {
            "minimal": lambda: dops.iadb_blend(make_tensor((3, 11)), make_tensor((3, 11), seed=1), torch.rand(3)),
            "target-out": lambda: dops.iadb_blend(make_tensor((2, 3, 4), torch.float16), make_tensor((2, 3, 4), torch.float16),
                                                  torch.rand(2), target_out=torch.empty(2, 3, 4, dtype=torch.float16)),
        },
        "philox_normal": {
            "one-seed": lambda: dops.randn((2, 3, 5), SEED, step=3),
            "per-sample-64bit-offset": lambda: dops.randn((3, 8), torch.tensor([1, 2, 3]), offset=2**33 + 5,
                                                          dtype=torch.float64),
        },
        "likelihood_accum": {
            "philox": lambda: dops.likelihood_accum(y, make_tensor(y.shape, seed=1), torch.full((3,), 0.5, dtype=torch.float64),
                                                    torch.ones(1, dtype=torch.float64), torch.zeros(3), step=2, seed=SEED),
            "explicit-noise": lambda: dops.likelihood_accum(y, make_tensor(y.shape, seed=1),
                                                            torch.ones(1, dtype=torch.float64),
                                                            torch.ones(3, dtype=torch.float64), torch.zeros(3),
                                                            noise=make_tensor(y.shape, seed=2)),
        },
        "optimal_denoiser": {
            "scalar-sigma": lambda: dops.optimal_denoiser(make_tensor((3, 6)), make_tensor((5, 6), seed=1), 0.7),
            "per-sample-sigma": lambda: dops.optimal_denoiser(make_tensor((2, 2, 3)), make_tensor((4, 2, 3), seed=1),
                                                              torch.tensor([0.3, 2.0])),
        },
    }
    cases.update(_hold_cases())
    return cases


def _recorded_args(family, call):
    """The argument tuple the front-end passes to the op, captured with a recording launcher."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._OPS, family, registry.OpSpec(family, {"reference": lambda: lambda *a: calls.append(a)}))
        mp.setenv("DIFFKERN_BACKEND", "reference")
        call()
    assert len(calls) == 1, f"{family}: the front-end launched {len(calls)} times"
    return calls[0]


def _op_params():
    usable = [b for b in OP_BACKENDS if b in usable_backends("cpu")]
    return [pytest.param(family, name, backend, id=f"{backend}-{family}-{name}")
            for family, named in _cases().items() for name in named for backend in usable]


def _op(family, backend):
    """The torch op of ``family`` for ``backend`` (skips families without that backend)."""
    spec = registry._OPS[family]
    if backend not in spec.loaders:
        pytest.skip(f"{family} has no {backend} implementation")
    dops.resolve(family, "cpu", backend)  # binds the Triton launcher to its op on first use
    return getattr(torch.ops.diffkern, family if backend == "cpp" else family + "_triton")


@pytest.mark.parametrize("family,case,backend", _op_params())
def test_opcheck(family, case, backend):
    args = _recorded_args(family, _cases()[family][case])
    torch.library.opcheck(_op(family, backend), args)

@pytest.mark.cuda
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in usable_backends("cuda")])
def test_opcheck_cuda(backend):
    for family, named in _cases().items():
        if backend not in registry._OPS[family].loaders:
            continue
        dops.resolve(family, "cuda", backend)
        op = getattr(torch.ops.diffkern, family if backend == "cuda" else family + "_triton")
        for call in named.values():
            args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _recorded_args(family, call)]
            torch.library.opcheck(op, tuple(args))

#----------------------------------------------------------------------------
# The executable rule: no op without an opcheck case.


def test_every_schema_has_an_opcheck_case():
    assert set(_lib.SCHEMAS) <= set(_cases()), f"no opcheck case for {sorted(set(_lib.SCHEMAS) - set(_cases()))}"
    for family, named in _cases().items():
        assert named, f"{family}: no case"


def test_every_diffkern_op_comes_from_schemas():
    """Ops defined elsewhere (e.g. a TORCH_LIBRARY block in C++) would escape the rule above."""
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("diffkern::")}
    families = {n[: -len("_triton")] if n.endswith("_triton") else n for n in names}
    assert families <= set(_lib.SCHEMAS), f"ops without a schema in _lib.SCHEMAS: {sorted(families - set(_lib.SCHEMAS))}"


def test_cases_cover_none_optionals_and_outputs():
    """Among each family's cases, every optional argument is passed once as None and once as a tensor."""
    for family, named in _cases().items():
        schema = getattr(torch.ops.diffkern, family).default._schema
        optional = [i for i, a in enumerate(schema.arguments) if isinstance(a.type, torch.OptionalType)]
        seen_none, seen_tensor = set(), set()
        for call in named.values():
            args = _recorded_args(family, call)
            assert len(args) == len(schema.arguments), f"{family}: {len(args)} args for {schema}"
            for i in optional:
                (seen_none if args[i] is None else seen_tensor).add(i)
        names = [schema.arguments[i].name for i in optional]
        assert seen_none == set(optional), f"{family}: no case passes None for some of {names}"
        assert seen_tensor == set(optional), f"{family}: no case passes a tensor for some of {names}"

#----------------------------------------------------------------------------
# torch.compile(fullgraph=True). aot_eager traces through the fake kernels and functionalises the
# mutating ops without inductor's code generation (a cold inductor compile of one small pointwise
# graph took ~80 s on this 2-core CI-class CPU, so it is left to bench/).


def _compiled_equals_eager(fn, *args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), fn(*args), rtol=0, atol=0)


@pytest.mark.parametrize("backend", [b for b in OP_BACKENDS if b in usable_backends("cpu")])
def test_compile_fullgraph_through_the_op(backend):
    op = _op("sampler_step", backend)
    kw = sampler_step_inputs((2, 3, 5), noise="explicit")

    def step(x, model_out, uncond, history, noise, coef, seed):
        out, x0 = torch.empty_like(x), torch.empty_like(x)
        op(x, model_out, uncond, history, noise, coef, 2, seed, out, x0, None)
        return out * 2 + x0

    _compiled_equals_eager(step, kw["x"], kw["model_out"], kw["model_out_uncond"], kw["history"], kw["noise"],
                           kw["coef"], SEED)


@pytest.mark.parametrize("backend", [b for b in OP_BACKENDS if b in usable_backends("cpu")])
def test_compile_fullgraph_through_philox_op(backend):
    op = _op("philox_normal", backend)

    def draw(seed):
        out = torch.empty(3, 17)
        op(seed, 5, 2**32 + 1, out)
        return out.sum(1)

    _compiled_equals_eager(draw, SEED)


def test_compile_fullgraph_reference_function():
    """The float64-capable reference itself traces (no data-dependent Python control flow)."""
    kw = sampler_step_inputs((2, 3, 5), per_sample_seed=True)

    def step(x, model_out, uncond, history, coef, seed):
        return dops.sampler_step_reference(x, model_out, coef, 2, model_out_uncond=uncond, history=history, seed=seed)[0]

    _compiled_equals_eager(step, kw["x"], kw["model_out"], kw["model_out_uncond"], kw["history"], kw["coef"],
                           kw["seed"])


@pytest.mark.parametrize("backend", ["reference", None] + [b for b in OP_BACKENDS if b in usable_backends("cpu")])
def test_compile_fullgraph_front_end(backend):
    """The public front-end traces: its host-only checks (table values, overlaps) are skipped while compiling."""
    kw = sampler_step_inputs((2, 3, 5), noise="explicit")

    def step(x, model_out, uncond, history, coef, noise):
        return dops.sampler_step(x, model_out, coef, 2, model_out_uncond=uncond, history=history, noise=noise,
                                 backend=backend)

    _compiled_equals_eager(step, kw["x"], kw["model_out"], kw["model_out_uncond"], kw["history"], kw["coef"],
                           kw["noise"])


def test_fake_kernels_give_shapes_without_running():
    """Under FakeTensorMode the ops run their fake (shape-only) kernels: no backend is needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 5)
        out = torch.empty(2, 3, 5)
        torch.ops.diffkern.sampler_step(x, x, None, None, None, torch.empty(3, coefs.NCOEF, dtype=torch.float64), 1,
                                        torch.zeros(1, dtype=torch.int64), out, None, None)
        torch.ops.diffkern.philox_normal(torch.zeros(1, dtype=torch.int64), 0, 0, out)
        assert out.shape == (2, 3, 5)
