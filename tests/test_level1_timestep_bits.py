"""Level-1 ``timesteps`` bit for bit against diffusers 0.42.1: every drop-in with a diffusers class of its name, over
N = 1..60 and the spacing / steps_offset / Karras-exponential-beta options it takes, gives the same ``timesteps``
tensor (dtype, shape, values). Timesteps are labels: the network's input and the key of ``index_for_timestep``,
``add_noise`` and ``step``'s check, so a user passing diffusers' values (or mixing a diffusers scheduler's timesteps
with ours) must hit. The sigmas that build the coefficient tables stay diffkern's float64 ones (checked below).

Configs a drop-in refuses by name (documented as unsupported) are listed in ``REFUSED`` and checked to raise.
"""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from diffkern.diffusers import timestep_labels  # noqa: E402
from test_diffusers_schedulers import diffusers_class  # noqa: E402

STEPS = range(1, 61)
SPACINGS = ("linspace", "leading", "trailing")
CONVERSIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# (class, option): refused by our drop-in, by name, where diffusers' class takes it
REFUSED = {(name, "use_beta_sigmas") for name in (
    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler")}


def _configs(name):
    """The grid of configs of diffusers' class ``name`` (the keys its __init__ takes)."""
    import inspect
    keys = inspect.signature(diffusers_class(name).__init__).parameters
    out = [{}]
    if "timestep_spacing" in keys:
        out += [{"timestep_spacing": s, **({"steps_offset": 1} if "steps_offset" in keys else {})} for s in SPACINGS]
    if "beta_schedule" in keys:
        out += [{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                {"beta_schedule": "squaredcos_cap_v2"}]
    for option in CONVERSIONS:
        if option in keys:
            for s in SPACINGS if "timestep_spacing" in keys else (None,):
                out.append({option: True, **({"timestep_spacing": s} if s else {})})
            if "beta_schedule" in keys:
                out.append({option: True, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    if "sigma_schedule" in keys:
        out.append({"sigma_schedule": "exponential"})
    if "final_sigmas_type" in keys:
        out.append({"final_sigmas_type": "sigma_min"})
    if "shift" in keys:
        out.append({"shift": 3.0})
    return out


CASES = [(name, cfg) for name in sorted(dd.SCHEDULERS) if diffusers_class(name) is not None
         for cfg in _configs(name)]


def assert_same_timesteps(stock, ours, what):
    a, b = stock.timesteps, ours.timesteps
    assert b.dtype == a.dtype and b.shape == a.shape, \
        f"{what}: {b.dtype} {tuple(b.shape)} != {a.dtype} {tuple(a.shape)}"
    diff = (a != b).nonzero().flatten().tolist()
    assert not diff, f"{what}: positions {diff[:8]} differ: ours {b[diff[:4]].tolist()} != {a[diff[:4]].tolist()}"


@pytest.mark.parametrize("name, config", CASES, ids=lambda v: str(v)[:60])
def test_timesteps_bitwise(name, config):
    stock = diffusers_class(name)(**config)
    refused = [key for key in config if (name, key) in REFUSED]
    if refused:
        with pytest.raises(ValueError, match=refused[0]):
            getattr(dd, name).from_config(stock.config).set_timesteps(10)
        return
    ours = getattr(dd, name).from_config(stock.config)
    checked = stock_ok = 0
    for n in STEPS:
        try:
            stock.set_timesteps(n)
        except (ValueError, ZeroDivisionError):  # diffusers refuses this N (or divides by 0): nothing to match
            continue
        stock_ok += 1
        if stock.timesteps.is_floating_point() and stock.timesteps.isnan().any():
            continue  # diffusers' NaN timesteps (ours refuses those schedules by name)
        try:
            ours.set_timesteps(n)
        except ValueError as e:  # ours refuses schedules that repeat a timestep (documented): the message says so
            assert "repeat" in str(e) or "length 0" in str(e), f"{name} {config} N={n}: {e}"
            continue
        assert_same_timesteps(stock, ours, f"{name} {config} N={n}")
        checked += 1
    if stock_ok == 0:  # a config diffusers refuses at every N (DDIMInverse's "linspace"): ours refuses it too
        with pytest.raises(ValueError):
            ours.set_timesteps(10)
    else:
        assert checked >= 30, f"{name} {config}: only {checked} step counts compared"


FLOW_CONFIGS = [({"shift": 3.0}, {}), ({"shift": 3}, {}), ({"use_dynamic_shifting": True}, {"mu": 0.7}),
                ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.3}),
                ({"shift": 3.0, "shift_terminal": 0.1}, {}), ({"invert_sigmas": True}, {}),
                ({"shift": 2.0, "use_karras_sigmas": True}, {}),
                ({"use_dynamic_shifting": True, "shift_terminal": 0.02, "use_exponential_sigmas": True}, {"mu": 0.5}),
                ({"shift": 1.5, "use_beta_sigmas": True}, {})]


@pytest.mark.parametrize("config, kw", FLOW_CONFIGS, ids=str)
@pytest.mark.parametrize("custom", [(), ("sigmas",), ("timesteps",), ("sigmas", "timesteps")], ids=str)
def test_flow_timesteps_bitwise(config, kw, custom):
    """Flow matching: shifts, dynamic shifting, terminal stretch, inversion, conversions; custom sigmas and/or
    timesteps (which diffusers casts to float32 first). N = 1 with a terminal stretch is left out: diffusers divides
    by 0 there (NaN timesteps), ours gives the stretch's limit."""
    for n in range(2 if config.get("shift_terminal") else 1, 61):
        given = {"sigmas": np.linspace(1.0, 1.0 / n, n).tolist(), "timesteps": np.linspace(997.3, 1000.0 / n, n)}
        call = dict(kw, **{key: given[key] for key in custom}) if custom else dict(kw, num_inference_steps=n)
        stock = diffusers.FlowMatchEulerDiscreteScheduler(**config)
        stock.set_timesteps(**call)
        ours = dd.FlowMatchEulerDiscreteScheduler.from_config(stock.config)
        ours.set_timesteps(**call)
        assert_same_timesteps(stock, ours, f"flow {config} {kw} custom={custom} N={n}")


@pytest.mark.parametrize("name, config", [("KDPM2DiscreteScheduler", {}),
                                          ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
                                          ("HeunDiscreteScheduler", {"use_exponential_sigmas": True}),
                                          ("EDMEulerScheduler", {}), ("IPNDMScheduler", {}),
                                          ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})], ids=str)
def test_stock_timesteps_drive_ours(name, config):
    """The user's case: a loop driven by a diffusers scheduler's timestep values runs ours call by call (every
    value found by index_for_timestep), and add_noise takes them."""
    stock = diffusers_class(name)(**config)
    stock.set_timesteps(18)
    ours = getattr(dd, name).from_config(stock.config)
    ours.set_timesteps(18)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(stock.timesteps):
        if name != "IPNDMScheduler":
            assert ours.index_for_timestep(t) == stock.index_for_timestep(t), f"{name} call {k} t={float(t)!r}"
        x = ours.step(torch.randn_like(x), t, x).prev_sample
    assert ours.step_index == len(stock.timesteps)
    if hasattr(stock, "add_noise") and name != "IPNDMScheduler":
        ours.set_timesteps(18)
        t = stock.timesteps[5:6]
        torch.testing.assert_close(ours.add_noise(x, x, t), stock.add_noise(x, x, t), rtol=1e-5, atol=1e-5)


def test_tables_keep_float64_sigmas():
    """Only the labels follow diffusers' float32 arithmetic: the sigmas the tables are built from stay float64
    (Euler's Karras sigma_max is the float64 table's last sigma, not diffusers' float32 one)."""
    stock = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True)
    stock.set_timesteps(12)
    ours = dd.EulerDiscreteScheduler.from_config(stock.config)
    ours.set_timesteps(12)
    assert torch.equal(ours.timesteps, stock.timesteps)
    f64 = float(ours.train_sigmas[-1])
    assert abs(ours.sigmas_host[0] - f64) <= 1e-14 * f64
    assert abs(float(stock.sigmas[0]) - f64) > 1e-9 * f64  # (diffusers' float32 value is farther off)


@pytest.mark.parametrize("config", [{}, {"beta_schedule": "scaled_linear"}, {"beta_schedule": "squaredcos_cap_v2"},
                                    {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
                                    {"rescale_betas_zero_snr": True, "beta_schedule": "scaled_linear"},
                                    {"rescale_betas_zero_snr": True, "beta_schedule": "squaredcos_cap_v2"}], ids=str)
def test_alphas_cumprod32(config):
    """diffusers' float32 training table, repeated bit for bit (the source of every derived label)."""
    stock = diffusers.EulerDiscreteScheduler(**config)
    ours = dd.EulerDiscreteScheduler.from_config(stock.config)
    assert torch.equal(timestep_labels.alphas_cumprod32(ours), stock.alphas_cumprod)
