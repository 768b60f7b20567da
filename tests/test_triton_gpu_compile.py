"""Every ``@triton.jit`` kernel of ``diffkern.kernels`` compiles for the GPU (sm_90, a subset for sm_80).

The rest of the suite runs Triton under its interpreter, which compiles nothing, so a kernel that does
not lower for a GPU would first fail in a (scarce) GPU session. Here a subprocess with TRITON_INTERPRET
unset, where ``@triton.jit`` gives real ``JITFunction`` objects, replaces ``JITFunction.run`` with a
recorder, calls every op's Triton launcher (``kernels/<op>.py``'s ``*_launch``) on small CPU tensors for
each state dtype and the flag combinations the front-ends use, turns each recorded launch into the
signature, constexprs, attributes and options a GPU launch specialises to (:func:`specialization`), and
compiles each unique one with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``: no GPU is needed,
Triton ships ptxas. Nothing is launched; compile times are reported, never asserted.

Run as a script (``python tests/test_triton_gpu_compile.py [SHARD SHARDS]``) it prints the JSON report the
test reads (the test runs one shard per core).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                torch.bool: "i1"}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DIVISIBLE = [["tt.divisibility", 16]]
SM90, BOTH = (90,), (90, 80)
# sm_80 compiles one case per kernel and state dtype among these (both compute dtypes, and bfloat16, whose
# conversions differ most between the two architectures): the other cases would add little.
SM80_STATES = (torch.float32, torch.float64, torch.bfloat16)


def _archs(state_dtype, also_sm80: bool) -> tuple:
    return BOTH if also_sm80 and state_dtype in SM80_STATES else SM90

#----------------------------------------------------------------------------
# A recorded launch -> what Triton compiles for it on a GPU.


def specialization(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """``(signature, constexprs, attrs, options)`` of the launch ``fn[grid](*args, **kwargs)``.

    Follows ``JITFunction.run``'s specialisation: a tensor is a pointer to its dtype (``*fp32``, ...); an
    int is ``i32``/``i64``/``u64`` by range, except that 1 becomes a constexpr; a float is ``fp32``; None
    and ``tl.constexpr`` parameters are constexprs. Pointers whose address and ints whose value are
    multiples of 16 get ``tt.divisibility`` 16 (what enables vector accesses). Keywords that are not
    parameters (num_warps, num_stages, enable_fp_fusion) are the compile options.
    """
    names = list(fn.arg_names)
    if len(args) > len(names):
        raise TypeError(f"{fn.__name__}: {len(args)} positional arguments for {len(names)} parameters")
    bound = dict(zip(names, args))
    options = {}
    for k, v in kwargs.items():
        if k in names:
            bound[k] = v
        else:
            options[k] = v
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{fn.__name__}: no value for parameters {missing}")
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, name) in enumerate(zip(fn.params, names)):
        value = bound[name]
        specialize = not param.do_not_specialize
        if param.is_constexpr or value is None or (specialize and type(value) is int and value == 1):
            signature[name], constexprs[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            if value.dtype not in TRITON_TYPES:
                raise TypeError(f"{fn.__name__}: argument {name}: no Triton pointer type for {value.dtype}")
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif isinstance(value, bool):
            signature[name], aligned = "u1", False
        elif isinstance(value, int):
            signature[name] = ("i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64")
            aligned = value % 16 == 0
        elif isinstance(value, float):
            signature[name], aligned = "fp32", False
        else:
            raise TypeError(f"{fn.__name__}: argument {name}: cannot specialise a {type(value).__name__}")
        if aligned and specialize and not param.do_not_specialize_on_alignment:
            attrs[(i,)] = DIVISIBLE
    return signature, constexprs, attrs, options


def spec_key(fn, spec) -> str:
    """A hashable identity of one compilation (kernel and its specialisation)."""
    signature, constexprs, attrs, options = spec
    return repr((fn.module, fn.__name__, sorted(signature.items()), sorted((k, repr(v)) for k, v in constexprs.items()),
                 sorted(attrs.items()), sorted(options.items())))


class Recorder:
    """Context manager: while active, ``JITFunction.run`` records ``(fn, args, kwargs)`` and launches nothing."""

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self.launches, self._cls, self._run = [], JITFunction, JITFunction.run

        def record(fn, *args, grid, warmup, **kwargs):
            self.launches.append((fn, args, kwargs))

        JITFunction.run = record
        return self

    def __exit__(self, *exc):
        self._cls.run = self._run

#----------------------------------------------------------------------------
# Launcher calls: every op's Triton launcher as the front-ends call it.


def _t(shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _seed(batch: int, per_sample: bool):
    return torch.arange(batch if per_sample else 1, dtype=torch.int64)


# Shapes: an image-sized state (several programs per sample at the GPU block size) and an odd one (one
# program, sizes that are not multiples of 16).
BIG, ODD = (2, 3, 32, 32), (3, 5, 7)
# Flags (uncond, history, noise, x0_out, history_out) of sampler_step: every pair of flags takes all four
# on/off combinations (a strength-2 covering array), so each front-end combination is covered pairwise;
# the last row is k-diffusion's CFG multistep step with a callback (everything but explicit noise), with the
# second history of the third-order samplers.
STEP_FLAGS = ((0, 0, 0, 0, 0), (1, 1, 0, 0, 1), (1, 0, 1, 0, 1), (1, 0, 0, 1, 0), (0, 1, 1, 1, 1), (0, 1, 1, 1, 0),
              (1, 1, 0, 1, 1))


def _sampler_step_cases(k):
    from diffkern.ops import coefs

    coef = torch.zeros(8, coefs.NCOEF, dtype=torch.float64)
    for s in DTYPES:
        # float32/float64 (the two compute dtypes): every row; 16-bit states: every tensor present, both noises.
        rows = STEP_FLAGS if s in (torch.float32, torch.float64) else ((1, 1, 0, 1, 1), (1, 1, 1, 1, 1))
        for j, (u, h, n, x0, ho) in enumerate(rows):
            m = DTYPES[(j + DTYPES.index(s)) % len(DTYPES)]  # every model dtype with every compute dtype
            shape, per_sample, step = (ODD, False, 1) if j == 3 else (BIG, j % 2 == 0, (0, 5, 7)[j % 3])
            x = _t(shape, s)

            def opt(flag, dtype=s, x=x):
                return torch.zeros_like(x, dtype=dtype) if flag else None

            label = f"sampler_step {TRITON_TYPES[s]}/{TRITON_TYPES[m]} flags={u}{h}{n}{x0}{ho}"
            yield label, _archs(s, j == len(rows) - 1), lambda a=(
                x, opt(1, m), opt(u, m), opt(h), opt(n), coef, step, _seed(shape[0], per_sample), x, opt(x0),
                opt(ho), opt(h and j == len(rows) - 1)): k.sampler_step_launch(*a)


def _iadb_cases(k):
    for s in DTYPES:
        for target, alpha in ((True, torch.float32), (False, s)):
            a = (_t(BIG, s), _t(BIG, s), _t(BIG[0], alpha), _t(BIG, s), _t(BIG, s) if target else None)
            yield f"iadb_blend {TRITON_TYPES[s]} target={target}", _archs(s, target), \
                lambda a=a: k.iadb_blend_launch(*a)


def _philox_cases(k):
    from diffkern.hold_sampling import PRIOR_STEP

    for s in DTYPES:
        # (step, offset, per-sample seeds): a table row, HOLD's prior draw (an i64 step) at a 64-bit offset, and an
        # offset that is not a multiple of 4 (blocks not on groups of four: the elementwise stream, ALIGNED=False).
        variants = ((0, 0, True), (PRIOR_STEP, 2**40, False), (2, 2**40 + 6, True)) \
            if s in (torch.float32, torch.float64) else ((3, 0, True),)
        for i, (step, offset, per_sample) in enumerate(variants):
            a = (_seed(BIG[0], per_sample), step, offset, _t(BIG, s))
            yield f"philox_normal {TRITON_TYPES[s]} step={step} offset={offset}", _archs(s, i == 0), \
                lambda a=a: k.philox_normal_launch(*a)


def _hold_cases(k):
    from diffkern.ops.hold import MAX_ORDER

    C, rest = 2, (16, 16)
    # (state dtype, eps_hat dtype, n, explicit noise, per-sample seeds, sm_80 too): the orders of the
    # published HOLD models in float32, the largest in float64, 16-bit states once each, and last positions
    # per component that are not a multiple of 4 (the elementwise stream, ALIGNED=False).
    transitions = [(torch.float32, torch.float32, n, False, True, n == 6) for n in (1, 2, 3, 6)] + [
        (torch.float64, torch.float64, 6, False, True, True), (torch.float32, torch.float16, 3, True, False, False),
        (torch.bfloat16, torch.float32, 2, True, True, True), (torch.float16, torch.float16, 3, False, False, False),
        (torch.float32, torch.float32, MAX_ORDER, False, True, False),
        (torch.float32, torch.float32, 2, False, False, False)]
    for i, (s, e, n, noise, per_sample, sm80) in enumerate(transitions):
        spatial = (3, 5) if i == len(transitions) - 1 else rest
        z = _t((2, n * C, *spatial), s)
        a = (z, _t((2, C, *spatial), e), torch.zeros_like(z) if noise else None,
             torch.zeros(4, n, 2 * n + 1, dtype=torch.float64), (1, 2, 0)[i % 3], _seed(2, per_sample), z)
        yield (f"hold_transition {TRITON_TYPES[s]}/{TRITON_TYPES[e]} n={n} noise={noise} {spatial}",
               BOTH if sm80 else SM90, lambda a=a: k.hold_transition_launch(*a))
    # (state dtype, n, m, explicit noise, eps_out, per-sample seeds, sm_80 too)
    perturbs = ((torch.float32, 1, 1, False, True, True, False), (torch.float32, 6, 6, True, False, False, False),
                (torch.float32, 3, 1, False, True, True, True), (torch.float64, 3, 1, False, True, True, True),
                (torch.bfloat16, 2, 2, False, False, False, True), (torch.float16, 3, 1, True, True, True, False))
    for i, (s, n, m, noise, eps_out, per_sample, sm80) in enumerate(perturbs):
        out = _t((2, n * C, *rest), s)
        a = (_t((2, m * C, *rest), s), torch.zeros(2, n, m, dtype=torch.float64),
             torch.zeros(2, n, n, dtype=torch.float64), torch.zeros_like(out) if noise else None, i % 2,
             _seed(2, per_sample), out, _t((2, C, *rest), s) if eps_out else None)
        yield (f"hold_perturb {TRITON_TYPES[s]} n={n} m={m} noise={noise} eps_out={eps_out}",
               BOTH if sm80 else SM90, lambda a=a: k.hold_perturb_launch(*a))


def _likelihood_cases(k):
    from diffkern.ops.likelihood import acc_dtype

    for s in DTYPES:
        # diffkern.likelihood's call: per-sample sigma, cv and seeds, one weight, the Philox eps; then explicit
        # noise, and (float32) one stream over samples of a size that is not a multiple of 4 (ALIGNED=False).
        per = (True, False, True, True, False)  # sigma, weight, cv, seed, explicit noise
        variants = (per, (False, True, False, False, True)) if s in (torch.float32, torch.float64) else (per,)
        if s == torch.float32:
            variants += ((True, False, True, False, False),)
        for i, (sig, w, cv, seed, noise) in enumerate(variants):
            y = _t(ODD if i == 2 else BIG, s)
            batch = y.shape[0]
            a = (y, torch.zeros_like(y), torch.zeros_like(y) if noise else None,
                 *(torch.ones(batch if p else 1, dtype=torch.float64) for p in (sig, w, cv)), 2,
                 _seed(batch, seed), torch.zeros(batch, dtype=acc_dtype(s)))
            yield f"likelihood_accum {TRITON_TYPES[s]} noise={noise} {tuple(y.shape)}", _archs(s, i == 0), \
                lambda a=a: k.likelihood_accum_launch(*a)


def _as_on_an_h100(call):
    """Run ``call`` with torch's device query answering as an H100 (132 SMs): the launcher sizes its grid
    from it, and torch here may have no CUDA at all."""
    saved = torch.cuda.current_device, torch.cuda.get_device_properties
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_properties = lambda device: SimpleNamespace(multi_processor_count=132)
    try:
        call()
    finally:
        torch.cuda.current_device, torch.cuda.get_device_properties = saved


def _optimal_denoiser_cases(k):
    # (x dtype, batch, N, D, config, sm_80 too): the launcher's own GPU configuration (None) on shapes
    # with full tiles (EVEN_* true) and without, float16 once (its dots are bfloat16's), and for bfloat16
    # the benchmark's sweep (bench/bench_optimal_denoiser.py runs it on the GPU).
    even, odd = (128, 512, 256), (5, 300, 100)
    cases = [(s, *shape, None, shape == odd) for s in (torch.float32, torch.bfloat16) for shape in (even, odd)]
    cases += [(torch.float16, *odd, None, False)] + [(torch.bfloat16, *even, cfg, False) for cfg in k.SWEEP_CONFIGS]
    for s, b, n, d, cfg, sm80 in cases:
        a = (_t((b, d), s), _t((n, d), s), _t(n), _t(b), _t((b, d), s), cfg)
        yield (f"optimal_denoiser {TRITON_TYPES[s]} B={b} N={n} D={d} cfg={cfg}", _archs(s, sm80),
               lambda a=a: _as_on_an_h100(lambda: k.optimal_denoiser_launch(*a)))


def launcher_cases():
    """``(label, archs, call)`` for each launcher call (imports the kernels: TRITON_INTERPRET must be unset)."""
    from diffkern.kernels import hold, iadb_blend, likelihood, optimal_denoiser, philox_normal, sampler_step

    for make, mod in ((_sampler_step_cases, sampler_step), (_iadb_cases, iadb_blend), (_philox_cases, philox_normal),
                      (_hold_cases, hold), (_likelihood_cases, likelihood),
                      (_optimal_denoiser_cases, optimal_denoiser)):
        yield from make(mod)

#----------------------------------------------------------------------------
# Coverage, compilation and the report.


def all_kernels() -> dict:
    """Every JITFunction defined in a module of ``diffkern.kernels``, by qualified name."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import diffkern.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction) and obj.module == mod.__name__:
                found[f"{obj.module}.{obj.__name__}"] = obj
    return found


def reached(launched) -> set:
    """Qualified names of the launched kernels and of every @triton.jit function they call (transitively)."""
    from triton.runtime.jit import JITFunction

    seen, todo = set(), list(launched)
    while todo:
        fn = todo.pop()
        name = f"{fn.module}.{fn.__name__}"
        if name in seen:
            continue
        seen.add(name)
        for ref in fn.fn.__code__.co_names:
            callee = fn.fn.__globals__.get(ref)
            if isinstance(callee, JITFunction):
                todo.append(callee)
    return seen


def compile_spec(fn, spec, arch: int):
    """Compile for ``sm_<arch>``; returns None, or the error's message (its tail)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = spec
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    except Exception as exc:  # noqa: BLE001 - every failure is reported with its kernel and specialisation
        return f"{type(exc).__name__}: {exc}"[-3000:]
    return None


def main(shard: int = 0, shards: int = 1) -> dict:
    """Record every launcher call and compile shard ``shard`` of ``shards`` of the unique (specialisation,
    architecture) pairs; returns the report (every shard checks the coverage)."""
    jobs = {}  # spec key -> [fn, spec, label, archs]
    with Recorder() as rec:
        for label, archs, call in launcher_cases():
            start = len(rec.launches)
            call()
            if len(rec.launches) == start:
                raise RuntimeError(f"{label}: the launcher launched nothing")
            for fn, args, kwargs in rec.launches[start:]:
                spec = specialization(fn, args, kwargs)
                job = jobs.setdefault(spec_key(fn, spec), [fn, spec, label, set()])
                job[3].update(archs)
    kernels = all_kernels()
    covered = reached({job[0] for job in jobs.values()})
    report = {"uncovered": sorted(set(kernels) - covered), "failed": [], "compiled": 0, "slowest": []}
    units = [(job, arch) for job in jobs.values() for arch in sorted(job[3], reverse=True)]
    times = []
    for (fn, spec, label, _), arch in units[shard::shards]:
        start = time.perf_counter()
        err = compile_spec(fn, spec, arch)
        times.append((time.perf_counter() - start, f"sm_{arch} {label}"))
        if err is None:
            report["compiled"] += 1
        else:
            report["failed"].append({"kernel": fn.__name__, "arch": arch, "case": label,
                                     "signature": spec[0], "constexprs": {k: repr(v) for k, v in spec[1].items()},
                                     "error": err})
    report["slowest"] = [f"{t:.1f}s {what}" for t, what in sorted(times, reverse=True)[:5]]
    report["kernels"] = sorted(kernels)
    return report

#----------------------------------------------------------------------------
# Tests.


def test_specialization_follows_triton():
    """The rules of :func:`specialization` on one launch (a pure-Python JITFunction: nothing compiles)."""
    from triton.runtime.jit import JITFunction

    import triton.language as tl

    def kern(a_ptr, b_ptr, n, big, one, neg, scale, flag, maybe, BLOCK: tl.constexpr):
        pass

    fn = JITFunction(kern)
    a, b = torch.zeros(8, dtype=torch.bfloat16), torch.zeros(9, dtype=torch.int64)[1:]  # b: 8-byte aligned
    sig, cx, attrs, opts = specialization(fn, (a, b, 32, 2**40 + 3, 1, -5, 0.5, True),
                                          dict(maybe=None, BLOCK=64, num_warps=4, enable_fp_fusion=False))
    assert sig == dict(a_ptr="*bf16", b_ptr="*i64", n="i32", big="i64", one="constexpr", neg="i32", scale="fp32",
                       flag="u1", maybe="constexpr", BLOCK="constexpr")
    assert cx == dict(one=1, maybe=None, BLOCK=64)
    assert attrs == {(0,): DIVISIBLE, (2,): DIVISIBLE}
    assert opts == dict(num_warps=4, enable_fp_fusion=False)
    with pytest.raises(TypeError, match="BLOCK"):
        specialization(fn, (a, b, 32, 2**40, 1, -5, 0.5, True, None), {})


def test_every_kernel_compiles_for_the_gpu(tmp_path):
    """Each launcher's specialisations compile for sm_90 (and a subset for sm_80); every kernel is covered."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold compile, and nothing left in the user's cache
    # The compilations are independent and single-threaded: shard them over the cores (at most 4).
    shards = max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(shards)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(shards)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        reports.append(json.loads(out))
    report = dict(reports[0], compiled=sum(r["compiled"] for r in reports),
                  failed=[f for r in reports for f in r["failed"]])
    assert not report["uncovered"], f"kernels no launcher case reaches: {report['uncovered']}"
    assert not report["failed"], "GPU compilation failed:\n" + "\n\n".join(
        f"{f['kernel']} sm_{f['arch']} ({f['case']})\n{f['signature']}\n{f['constexprs']}\n{f['error']}"
        for f in report["failed"])
    assert report["compiled"] > 0 and len(report["kernels"]) >= 10, report


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: under the interpreter @triton.jit gives no compilable JITFunction")
    json.dump(main(*map(int, sys.argv[1:3])), sys.stdout)
