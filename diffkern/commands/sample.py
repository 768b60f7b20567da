"""``diffkern sample``: sample a grid of images with any sampler, by default from the built-in digits model."""
from __future__ import annotations

import contextlib
import os

from . import (MAX_IMAGE_STEPS, MAX_SAMPLE_BATCH, check_common, check_count, check_method, check_product, check_seed,
               check_steps, knob_flags)

DTYPES = ("float32", "float64", "float16", "bfloat16")


def _check_out(path: str, suffix: str = ".png") -> None:
    """Fail before any work when ``path`` cannot be written (nothing is created on failure)."""
    if not path.lower().endswith(suffix):
        raise ValueError(f"--out: expected a {suffix} file name, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"--out: {path!r} is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.isdir(probe):  # the nearest existing ancestor must be writable to create the rest
        if os.path.exists(probe):
            raise ValueError(f"--out: {probe!r} exists and is not a directory")
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"--out: cannot write {path!r} (permission denied)")
    # os.access says yes to root everywhere, and /proc or a read-only mount refuse files anyway: create and remove
    # the temporary file the atomic write will need, where it will need it (the nearest existing folder).
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(suffix=".tmp", prefix=".diffkern-", dir=probe)
    except OSError as exc:
        raise ValueError(f"--out: cannot create files in {probe!r} ({exc.strerror or exc})") from None
    os.close(fd)
    os.remove(tmp)


@contextlib.contextmanager
def _writing_out(path: str):
    """Name --out when the final write fails anyway (a disk filling up while sampling)."""
    try:
        yield
    except OSError as exc:
        raise OSError(f"--out: cannot write {path!r} ({exc.strerror or exc})") from None


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch reports no CUDA device")
    return torch.device(name)


def _load_data(spec: str):
    """--data: 'digits' (the built-in training split) or a .pt / .npy file holding an (N, C, H, W) array."""
    import torch

    from ..models import builtin

    if spec == "digits":
        return builtin.digits("train")[0]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--data: no such file {spec!r} (or use 'digits')")
    if spec.endswith(".npy"):
        import numpy as np
        try:
            data = torch.from_numpy(np.load(spec))
        except (ValueError, TypeError) as exc:  # not an array of numbers (strings, objects, not a .npy at all)
            raise ValueError(f"--data: cannot read {spec!r} as an array of numbers ({exc})") from None
    elif spec.endswith(".pt"):
        import pickle
        try:
            data = torch.load(spec, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # not a torch.save file, or one holding more than tensors
            raise ValueError(f"--data: cannot load {spec!r} as a saved tensor ({str(exc).splitlines()[0]})") from None
    else:
        raise ValueError(f"--data: expected 'digits', a .pt or a .npy file, got {spec!r}")
    if isinstance(data, torch.Tensor) and (data.is_complex() or data.dtype == torch.bool):
        raise ValueError(f"--data: expected real-valued images, got dtype {data.dtype}")
    if not isinstance(data, torch.Tensor) or data.dim() != 4 or data.shape[1] not in (1, 3) or data.shape[0] < 1:
        raise ValueError(f"--data: expected an (N, 1 or 3, H, W) array, got "
                         f"{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}")
    return data.float()


def _model(args, device, dtype):
    """(model, image shape) for --model."""
    from ..models import builtin

    if args.model == "builtin":
        return builtin.load_builtin(device=device, dtype=dtype), builtin.IMAGE_SHAPE
    if args.model == "optimal":
        from ..analytic import EmpiricalDenoiser

        # Chen et al. 4.4: one fused softmax-weighted mean over the data per model call.
        data = _load_data(args.data).to(device=device, dtype=dtype)
        return EmpiricalDenoiser(data, backend="auto"), tuple(data.shape[1:])
    if not os.path.isfile(args.model):  # name the flag: a mistyped 'builtin' or path is the usual cause
        why = "a directory" if os.path.isdir(args.model) else "no such file"
        raise FileNotFoundError(f"--model: expected builtin, optimal or a weights file written by `diffkern train`, "
                                f"got {args.model!r} ({why})")
    model = builtin.load_denoiser(args.model, device=device, dtype=dtype)
    return model, (model.model.config["channels"],) + builtin.IMAGE_SHAPE[1:]


def _run(args) -> int:
    import time

    import torch

    from .. import ops
    from ..models import builtin
    from ..samplers_adaptive import EAGER_ONLY

    check_steps(args.steps)
    check_count(args.batch, "--batch", MAX_SAMPLE_BATCH)
    check_product({"--batch": args.batch, "--steps": args.steps}, MAX_IMAGE_STEPS, "image-steps")
    if args.nrow is not None and args.nrow < 1:
        raise ValueError(f"--nrow: expected an integer >= 1, got {args.nrow}")
    if args.score and args.batch < 2:  # checked now: the metric would fail after the grid is written
        raise ValueError(f"--score: the unbiased MMD needs --batch >= 2, got {args.batch}")
    check_common(args)
    check_seed(args.seed)
    chosen, labels = knob_flags.collect(args, args.method, check_method(args.method))
    sigmas = builtin.schedule(args.steps, args.schedule, args.sigma_min, args.sigma_max, args.rho)
    knob_flags.check(args.method, chosen, labels, sigmas)
    _check_out(args.out)
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    used, _ = ops.resolve("sampler_step", device.type, args.backend)  # unavailable backend: clear error now
    model, shape = _model(args, device, dtype)
    if args.score and tuple(shape) != builtin.IMAGE_SHAPE:
        raise ValueError(f"--score: the digits metric needs images of shape {builtin.IMAGE_SHAPE}, not {shape}")
    t0 = time.perf_counter()
    images = builtin.generate(model, args.batch, args.method, args.steps, shape=shape, seed=args.seed,
                              backend=args.backend, device=device, dtype=dtype, sigmas=sigmas,
                              progress=not args.no_progress, **chosen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if not torch.isfinite(images).all():
        raise RuntimeError("sampling produced non-finite values; nothing written (try more --steps)")
    with _writing_out(args.out):
        builtin.save_grid(images, args.out, nrow=args.nrow)
    knob_text = "".join(f", {k}={v:g}" if isinstance(v, float) else f", {k}={v}" for k, v in chosen.items())
    steps_text = f"{args.steps} {args.schedule} steps"
    if args.method in EAGER_ONLY:  # it reads only the schedule's range and picks its own steps
        steps_text = f"adaptive steps from sigma {float(sigmas[0]):g} to {float(sigmas[sigmas > 0][-1]):g}"
    print(f"sampled {args.batch} images of shape {tuple(shape)} from the {args.model} model with "
          f"{args.method}{knob_text}, {steps_text}, on {device.type} with backend {used}")
    print(f"time: {seconds:.3f} s in all (wall, first call included), {1e3 * seconds / args.batch:.2f} ms per image")
    if args.score:
        from ..quality import Scorer, nearest_train_distance

        s = Scorer()(images)
        print(f"quality vs held-out digits: MMD^2 pixels {s['mmd_pixels']:.5f}, MMD^2 features "
              f"{s['mmd_features']:.5f}, classifier confidence {s['confidence']:.3f}")
        print(f"memorisation: RMS distance to the nearest training image {nearest_train_distance(images):.3f} "
              f"(held-out digits: {nearest_train_distance(builtin.digits('heldout')[0]):.3f}, copies: 0)")
    print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample an image grid (default: the built-in digits model)",
                       description="Sample a grid of images with any sampler and write it as a PNG.")
    p.add_argument("--model", default="builtin",
                   help="builtin (default), optimal (the exact denoiser of --data: memorises it), "
                        "or a weights file written by `diffkern train`")
    p.add_argument("--data", default="digits", help="for --model optimal: digits (default), or a .pt/.npy (N,C,H,W)")
    p.add_argument("--method", default="ge", help="euler | euler_ancestral | heun | dpm_2 | dpm_2_ancestral | "
                   "dpmpp_2s_ancestral | dpmpp_2m | dpmpp_2m_sde | dpmpp_3m_sde | dpmpp_sde | dpmsolver_3m | lcm | ge | "
                   "sde | unipc | deis | plms | ipndm | lms | dpmsolver_single | ipndm_v | dpm_fast | res_multistep | "
                   "res_multistep_ancestral | er_sde | sa_solver | heun_flow | dpm_adaptive (default ge)")
    p.add_argument("--steps", type=int, default=20, help="number of sampler steps (default 20)")
    p.add_argument("--schedule", default="karras", choices=("karras", "loglinear"), help="sigma schedule")
    p.add_argument("--sigma-min", type=float, default=0.002, help="smallest nonzero sigma (default 0.002)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="initial sigma (default 80)")
    p.add_argument("--rho", type=float, default=7.0, help="Karras schedule exponent (default 7)")
    p.add_argument("--gamma", type=float, help="ge: gradient-estimation weight (default 2)")
    p.add_argument("--mu", type=float, help="ge: stochasticity in [0, 1) (default 0)")
    p.add_argument("--lam", type=float, help="sde: McAllester noise level (default 1)")
    p.add_argument("--eta", type=float, help="the ancestral and SDE samplers, dpm_fast, dpm_adaptive, res_multistep, "
                   "dpmsolver_3m: noise scale (default: the method's, 1 for the ancestral and SDE samplers, else 0)")
    p.add_argument("--s-churn", dest="s_churn", type=float, help="euler / heun / dpm_2: EDM churn (default 0)")
    knob_flags.add_knob_argument(p)
    p.add_argument("--backend", default=None,
                   help="reference | cpp | triton | cuda | auto (default: $DIFFKERN_BACKEND, else auto)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="state and network dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and the sampler's noise")
    p.add_argument("--batch", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square)")
    p.add_argument("--out", default="out/digits.png", help="PNG to write (default out/digits.png)")
    p.add_argument("--score", action="store_true", help="also print the quality metric against held-out digits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
