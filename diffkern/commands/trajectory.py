"""``diffkern trajectory``: the sampling and denoising trajectories of a sampler on the 2-D demo mixture
(Chen et al., ``math-samplers.md`` 4.1-4.6), plotted to PNG.

The sampling trajectory is the state ``x_n`` after each step; the denoising trajectory is the denoised
estimate ``D(x_n, sigma_n)`` of each step (``diffkern.sample(..., record=True)``). ODE-jump (4.6) stops
at step ``--jump`` and returns ``D(x_jump, sigma_jump)`` as the sample. The mixture's denoiser is exact,
so the pictures show the sampler alone.
"""
from __future__ import annotations

import numbers

from .._files import atomic_write
from . import MAX_TRAJECTORIES, check_common, check_count, check_method, check_seed, check_steps, knob_flags
from .sample import _check_out, _writing_out


def trajectories(method: str = "euler", steps: int = 20, n: int = 16, *, seed: int = 0, jump=None,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, backend=None, **knobs) -> dict:
    """Sample ``n`` points of the demo mixture with ``method`` over a Karras schedule, recording both
    trajectories. Returns float64 CPU tensors ``x`` (steps+1, n, 2), ``denoised`` (steps, n, 2),
    ``sigmas`` (steps+1,), the ODE-jump samples ``jump_samples`` (n, 2) = ``denoised[jump]``, and
    per-step means over the points: ``dist_x`` = ||x_i - x_N||, ``dist_denoised`` = ||D_i - x_N||,
    ``deviation`` = distance of x_i from the chord x_0 -> x_N (Chen et al.'s straightness measure);
    plus mean log-densities of the final, ODE-jump and exact samples.
    """
    import torch

    from .. import analytic, schedules
    from ..sampling import sample

    gmm = analytic.GaussianMixture.demo_2d()
    sigmas = schedules.karras(steps, sigma_min, sigma_max)  # validates steps (numpy ints too)
    if jump is None:
        jump = max(0, int(steps) - max(1, int(steps) // 4))  # three quarters in: sigma ~ 0.1 for 20 Karras steps
    # A negative index would pick a denoised estimate but label it with the wrong sigma (sigmas[-1] = 0).
    if isinstance(jump, bool) or not isinstance(jump, numbers.Integral) or not 0 <= jump < steps:  # numpy ints too
        raise ValueError(f"jump: expected an int step in [0, {steps - 1}] (steps = {steps}), got {jump!r}")
    jump = int(jump)
    # manual_seed refuses a numpy int; other values reach it (and sample's seed check) as given
    gen = torch.Generator().manual_seed(int(seed) if isinstance(seed, numbers.Integral) else seed)
    x0 = (torch.randn(n, 2, generator=gen, dtype=torch.float64) * sigma_max).float()
    _, rec = sample(gmm, x0, sigmas, method, backend=backend, seed=seed, record=True, **knobs)
    xs, ds = rec["x"].double().cpu(), rec["denoised"].double().cpu()
    final = xs[-1]
    chord = final - xs[0]
    unit = chord / chord.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    rel = final[None] - xs                                                  # (steps+1, n, 2)
    perp = rel - (rel * unit[None]).sum(-1, keepdim=True) * unit[None]
    return {"method": method, "steps": steps, "n": n, "jump": jump, "sigmas": torch.as_tensor(sigmas).double().cpu(),
            "x": xs, "denoised": ds, "jump_samples": ds[jump],
            "dist_x": (xs - final).norm(dim=-1).mean(1), "dist_denoised": (ds - final).norm(dim=-1).mean(1),
            "deviation": perp.norm(dim=-1).mean(1), "chord_length": chord.norm(dim=-1).mean(),
            "log_p_final": float(gmm.log_prob(final).mean()), "log_p_jump": float(gmm.log_prob(ds[jump]).mean()),
            "log_p_exact": float(gmm.log_prob(gmm.sample(max(n, 256), generator=gen)).mean()), "gmm": gmm}


def plot(res: dict, out: str) -> None:
    """Three panels: sampling trajectories, denoising trajectories (ODE-jump points marked) over the
    density, and the distances to the end point against sigma. Written atomically to ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    lim = 3.0
    grid = torch.linspace(-lim, lim, 240, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    dens = res["gmm"].log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).exp().reshape(gx.shape)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    xs, ds, jump = res["x"].numpy(), res["denoised"].numpy(), res["jump"]
    panels = ((axes[0], xs, "sampling trajectories x_n"), (axes[1], ds, "denoising trajectories D(x_n)"))
    for ax, paths, title in panels:
        ax.imshow(dens.numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="Greys", alpha=0.6)
        for j in range(paths.shape[1]):
            ax.plot(paths[:, j, 0], paths[:, j, 1], "-", lw=0.9, color=plt.cm.viridis(j / max(1, paths.shape[1] - 1)))
        ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=14, color="tab:red", zorder=3, label="final samples")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title)
    axes[1].scatter(ds[jump, :, 0], ds[jump, :, 1], marker="x", s=30, color="tab:blue", zorder=4,
                    label=f"ODE-jump at step {jump} (sigma {float(res['sigmas'][jump]):.3g})")
    axes[1].legend(loc="lower left", fontsize=8)
    sig = res["sigmas"].numpy()
    # The last denoised estimate is x_N itself (the last step goes to sigma = 0) and x_0 is on its chord.
    axes[2].loglog(sig[:-1], res["dist_x"].numpy()[:-1], "o-", label="||x_n - x_N|| (sampling)")
    axes[2].loglog(sig[:-2], res["dist_denoised"].numpy()[:-1], "s-", label="||D(x_n) - x_N|| (denoising)")
    axes[2].loglog(sig[1:-1], res["deviation"].numpy()[1:-1], "^-", label="distance of x_n from its chord")
    axes[2].invert_xaxis()
    axes[2].set_xlabel("sigma_n")
    axes[2].set_title(f"{res['method']}, {res['steps']} steps: mean over {res['n']} points")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # no half-written PNG on failure
    finally:
        plt.close(fig)


def _check_args(args) -> dict:
    from .. import schedules

    for flag in ("steps", "n"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag}: expected an integer >= 1, got {getattr(args, flag)}")
    check_steps(args.steps)
    check_count(args.n, "--n", MAX_TRAJECTORIES)
    if args.jump is not None and not 0 <= args.jump < args.steps:
        raise ValueError(f"--jump: expected a step in [0, {args.steps - 1}] (--steps {args.steps}), got {args.jump}")
    check_common(args)
    check_seed(args.seed)
    _check_out(args.out)
    chosen, labels = knob_flags.collect(args, args.method, check_method(args.method))
    from ..samplers_adaptive import EAGER_ONLY  # after check_method, which imports the samplers first
    if args.method in EAGER_ONLY:  # record=True would refuse it: a trajectory needs a fixed number of steps
        raise ValueError(f"--method: {args.method} decides its number of steps as it runs, so it has no trajectory "
                         f"of --steps steps to record and plot; choose a method with a fixed schedule (e.g. euler)")
    knob_flags.check(args.method, chosen, labels, schedules.karras(args.steps, args.sigma_min, args.sigma_max))
    return chosen


def _run(args) -> int:
    chosen = _check_args(args)
    res = trajectories(args.method, args.steps, args.n, seed=args.seed, jump=args.jump, sigma_min=args.sigma_min,
                       sigma_max=args.sigma_max, backend=args.backend, **chosen)
    with _writing_out(args.out):
        plot(res, args.out)
    bend = float(res["deviation"].max() / res["chord_length"])
    print(f"{args.method}, {args.steps} Karras steps, {args.n} trajectories on the 2-D demo mixture")
    print(f"mean log-density: final samples {res['log_p_final']:.3f}, ODE-jump at step {res['jump']} "
          f"(sigma {float(res['sigmas'][res['jump']]):.3g}) {res['log_p_jump']:.3f}, exact samples "
          f"{res['log_p_exact']:.3f}")
    print(f"sampling trajectories leave their chord by at most {100 * bend:.2f}% of its length")
    print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("trajectory", help="plot sampling and denoising trajectories on a 2-D mixture (PNG)",
                       description="Sample points of the 2-D demo mixture with its exact denoiser and plot the "
                                   "sampling and denoising trajectories (Chen et al.) as a PNG.")
    p.add_argument("--method", default="euler", help="any diffkern.sample method: euler, heun, dpmpp_2m, "
                                                      "ge, sde, ... (default euler, as in Chen et al.)")
    p.add_argument("--steps", type=int, default=20, help="number of Karras steps (default 20)")
    p.add_argument("--n", type=int, default=16, help="number of trajectories (default 16)")
    p.add_argument("--jump", type=int, default=None, help="ODE-jump step: its denoised estimate is marked "
                                                          "(default: three quarters of the steps)")
    p.add_argument("--sigma-min", type=float, default=0.002, help="smallest nonzero sigma (default 0.002)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="initial sigma (default 80)")
    p.add_argument("--gamma", type=float, help="ge: gradient-estimation weight")
    p.add_argument("--mu", type=float, help="ge: stochasticity in [0, 1)")
    p.add_argument("--lam", type=float, help="sde: McAllester noise level")
    p.add_argument("--eta", type=float,
                   help="the ancestral and SDE samplers, dpm_fast, res_multistep, dpmsolver_3m: noise scale")
    p.add_argument("--s-churn", dest="s_churn", type=float, help="euler / heun / dpm_2: EDM churn")
    knob_flags.add_knob_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="reference | cpp | triton | cuda | auto")
    p.add_argument("--out", default="out/trajectory.png", help="PNG to write (default out/trajectory.png)")
    p.set_defaults(func=_run)
