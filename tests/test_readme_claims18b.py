"""README.md's "Drop-in for diffusers" claims that can drift from the code: each refusal the Level 1 and Level 2
sections list raises a ValueError/TypeError naming the option (and the README still lists it), the Level 2 mapping
table names the sampler that ``loop_spec`` picks, the "trailing" overshoot counts are diffusers', the schedule held
before ``set_timesteps`` is the stock class's, saved configs record the package, and ``accelerate``'s quoted
signature. The Level 1 class list is ``tests/test_readme_journey.py``'s. No pipeline runs a loop here.
"""
import inspect
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffkern.diffusers as dkd  # noqa: E402
from diffkern.diffusers.loop_spec import diffkern_scheduler, loop_spec  # noqa: E402

TEXT = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
LEVEL1 = TEXT[TEXT.index("### Level 1"):TEXT.index("### Level 2")]
LEVEL2 = TEXT[TEXT.index("### Level 2"):TEXT.index("\n## ", TEXT.index("### Level 2"))]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _scheduler(name: str, steps: int = 10, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = getattr(dkd, name)(**config)
        ours.set_timesteps(steps)
    return ours

#----------------------------------------------------------------------------
# Level 1: each listed refusal raises, naming the option; the README still lists it.

# (README phrase, class, config, the option named in the error)
REFUSED_CONFIGS = [
    ("Refused: `solver_p`", "UniPCMultistepScheduler", {"solver_p": "DDIMScheduler"}, "solver_p"),
    ("Refused: `solver_p`, thresholding", "UniPCMultistepScheduler", {"thresholding": True}, "thresholding"),
    ("beta/flow sigmas", "UniPCMultistepScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("beta/flow sigmas", "UniPCMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("and flow prediction", "UniPCMultistepScheduler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("(`predict_x0=False`, bh1", "UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "zero"},
     "predict_x0"),
    ("(`predict_x0=False`, bh1", "UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "zero"},
     "solver_type"),
    ("`lower_order_final=False` with `final_sigmas_type=\"zero\"`", "UniPCMultistepScheduler",
     {"lower_order_final": False, "final_sigmas_type": "zero"}, "lower_order_final"),
    ("Refused: thresholding, `solver_order` above 3", "DEISMultistepScheduler", {"thresholding": True},
     "thresholding"),
    ("`solver_order` above 3", "DEISMultistepScheduler", {"solver_order": 4}, "solver_order"),
    ("flow prediction without flow sigmas", "DEISMultistepScheduler", {"prediction_type": "flow_prediction"},
     "prediction_type"),
    ("flow sigmas with a Karras/exponential/beta conversion, and orders >= 2", "DEISMultistepScheduler",
     {"use_flow_sigmas": True, "use_karras_sigmas": True}, "use_flow_sigmas"),
    ("orders >= 2 on a schedule that repeats a sigma", "DEISMultistepScheduler",
     {"num_train_timesteps": 20, "timestep_spacing": "leading", "steps_offset": 1}, "timestep_spacing"),
    ("Refused: thresholding, `predictor_order=4`", "SASolverScheduler", {"thresholding": True}, "thresholding"),
    ("`predictor_order=4`", "SASolverScheduler", {"predictor_order": 4}, "predictor_order"),
    ("learned variances. Level 2 runs it", "SASolverScheduler", {"variance_type": "learned"}, "variance_type"),
    ("Refused: thresholding, flow prediction with \"dpmsolver\"", "DPMSolverSinglestepScheduler",
     {"thresholding": True}, "thresholding"),
    ("flow prediction with \"dpmsolver\"", "DPMSolverSinglestepScheduler",
     {"prediction_type": "flow_prediction", "algorithm_type": "dpmsolver", "use_flow_sigmas": True,
      "final_sigmas_type": "sigma_min"}, "prediction_type"),
    ("flow sigmas with a Karras/exponential/beta conversion, and a group", "DPMSolverSinglestepScheduler",
     {"use_flow_sigmas": True, "use_karras_sigmas": True}, "use_flow_sigmas"),
    ("`clip_sample` is refused", "LCMScheduler", {"clip_sample": True}, "clip_sample"),
    ("Refused: `thresholding` (DPM", "EDMDPMSolverMultistepScheduler", {"thresholding": True}, "thresholding"),
    ("`prediction_type=\"sample\"`, a third-order SDE", "EDMEulerScheduler", {"prediction_type": "sample"},
     "prediction_type"),
    ("`prediction_type=\"sample\"`, a third-order SDE", "EDMDPMSolverMultistepScheduler",
     {"prediction_type": "sample"}, "prediction_type"),
    ("a third-order SDE step", "EDMDPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "solver_order"),
    ("the SDE with `final_sigmas_type=\"sigma_min\"`", "EDMDPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
    ("Refused: \"linspace\" spacing", "DDIMInverseScheduler", {"timestep_spacing": "linspace"}, "timestep_spacing"),
    ("`trained_betas` refused", "IPNDMScheduler", {"trained_betas": [0.01] * 1000}, "trained_betas"),
    # the list of unsupported options after the class bullets
    ("These include `thresholding`", "DDIMScheduler", {"thresholding": True}, "thresholding"),
    ("learned DDPM variances", "DDPMScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("the non-++ DPM-Solvers", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
    ("beta sigmas (LMS, DEIS", "EulerDiscreteScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("beta sigmas (LMS, DEIS", "DPMSolverMultistepScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("Lu and flow sigmas", "DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("Lu and flow sigmas", "DPMSolverMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("`lambda_min_clipped` with \"trailing\" spacing", "DPMSolverMultistepScheduler",
     {"lambda_min_clipped": -5.0, "timestep_spacing": "trailing"}, "lambda_min_clipped"),
    ("`interpolation_type=\"log_linear\"`", "EulerDiscreteScheduler", {"interpolation_type": "log_linear"},
     "interpolation_type"),
    ("zero terminal SNR with epsilon prediction on a DDIM/DDPM schedule", "DDIMScheduler",
     {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, "rescale_betas_zero_snr"),
    ("zero terminal SNR with epsilon prediction on a DDIM/DDPM schedule", "DDPMScheduler",
     {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, "rescale_betas_zero_snr"),
    ("(KDPM2: `prediction_type=\"sample\"`", "KDPM2DiscreteScheduler", {"prediction_type": "sample"},
     "prediction_type"),
]


@pytest.mark.parametrize("phrase, name, config, option", REFUSED_CONFIGS,
                         ids=[f"{c[1]}-{c[3]}" for c in REFUSED_CONFIGS])
def test_level1_listed_refusal_raises_naming_the_option(phrase, name, config, option):
    assert phrase in _flat(LEVEL1), f"README.md's Level 1 no longer says {phrase!r}"
    if config.get("solver_p") == "DDIMScheduler":
        config = dict(config, solver_p=diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match=re.escape(option)):
        _scheduler(name, steps=25 if "steps_offset" in config else 10, **config)


def test_singlestep_group_over_a_repeated_sigma_raises():
    assert "a group spanning a repeated sigma (diffusers divides by 0)" in _flat(LEVEL1)
    _scheduler("DPMSolverSinglestepScheduler", steps=30, num_train_timesteps=20, solver_order=1)  # no group: runs
    with pytest.raises(ValueError, match="num_inference_steps=30.*repeated sigma"):
        _scheduler("DPMSolverSinglestepScheduler", steps=30, num_train_timesteps=20, solver_order=2)


def test_level1_step_time_refusals():
    x = torch.randn(1, 4, 4, 4)
    flow = _scheduler("FlowMatchEulerDiscreteScheduler", steps=4)
    assert "`per_token_timesteps`, and `s_churn`/`s_noise` other than their defaults" in _flat(LEVEL1)
    for kwargs, option in (({"per_token_timesteps": torch.ones(1, 16)}, "per_token_timesteps"),
                           ({"s_churn": 0.5}, "s_churn"), ({"s_noise": 0.5}, "s_noise")):
        with pytest.raises(ValueError, match=option):
            flow.step(torch.randn_like(x), flow.timesteps[0], x, **kwargs)
    assert "(1 to 4; above 4 raises)" in LEVEL1
    lms = _scheduler("LMSDiscreteScheduler", steps=4)
    with pytest.raises(ValueError, match="order"):
        lms.step(torch.randn_like(x), lms.timesteps[0], x, order=5)
    assert "ours raises, naming eta" in _flat(LEVEL1)
    ddim = _scheduler("DDIMScheduler")
    with pytest.raises(ValueError, match="^eta"):
        ddim.step(torch.randn_like(x), ddim.timesteps[0], x, eta=1.5)
    assert "Heun and KDPM2 refuse an odd `set_begin_index`" in _flat(LEVEL1)
    for name in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler"):
        _scheduler(name).set_begin_index(2)
        with pytest.raises(ValueError, match="begin_index"):
            _scheduler(name).set_begin_index(3)


def test_trailing_overshoot_counts_are_diffusers():
    """The step counts where diffusers' float "trailing" arange makes N + 1 timesteps: the README's first ones and
    its total; the drop-ins keep N, diffusers' first N."""
    said = re.search(r"\(T = 1000:\s+(\d+) step counts, N = ([\d, ]+), \.\.\.\)", LEVEL1)
    assert said, "README.md's trailing-overshoot sentence changed"
    over = []
    for n in range(1, 1001):
        stock = diffusers.DDIMScheduler(timestep_spacing="trailing")
        stock.set_timesteps(n)
        if len(stock.timesteps) != n:
            over.append(n)
    listed = [int(v) for v in said.group(2).split(",") if v.strip()]
    assert int(said.group(1)) == len(over) and over[:len(listed)] == listed
    n = over[0]
    stock = diffusers.DDIMScheduler(timestep_spacing="trailing")
    stock.set_timesteps(n)
    assert torch.equal(_scheduler("DDIMScheduler", steps=n, timestep_spacing="trailing").timesteps,
                       stock.timesteps[:n])
    with pytest.raises(ValueError, match="timestep_spacing"):
        _scheduler("DDIMInverseScheduler", steps=n, timestep_spacing="trailing")


def test_schedule_before_set_timesteps_is_the_stock_classes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls in dkd.SCHEDULERS.items():
            if not hasattr(diffusers, name):  # GE, IADB
                continue
            stock, ours = getattr(diffusers, name)().timesteps, cls().timesteps
            if stock is None:
                assert ours is None, name
                continue
            stock, ours = torch.as_tensor(stock), torch.as_tensor(ours)
            assert stock.dtype == ours.dtype and torch.equal(stock, ours), name


def test_saved_config_records_the_package(tmp_path):
    assert '`["diffkern.diffusers", "<ClassName>"]`' in LEVEL1
    dkd.HeunDiscreteScheduler().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "HeunDiscreteScheduler"
    assert all(cls.__module__ == "diffkern.diffusers" for cls in dkd.SCHEDULERS.values())

#----------------------------------------------------------------------------
# Level 2: the mapping table against loop_spec, the refusals, the quoted signature.

# (the start of the table row's scheduler cell, scheduler, config, eta, the method loop_spec must pick)
MAPPING = [
    ("DDIM (eta = 0", "DDIMScheduler", {"clip_sample": False}, 0.0, "euler"),
    ("DDIM (eta = 0", "DDIMScheduler", {"clip_sample": False}, 0.5, "euler_ancestral"),
    ("DDPM (", "DDPMScheduler", {"clip_sample": False}, 0.0, "euler_ancestral"),
    ("DPM-Solver++ 2M (midpoint", "DPMSolverMultistepScheduler", {}, 0.0, "dpmpp_2m"),
    ("DPM-Solver++ 2M (midpoint", "DPMSolverMultistepScheduler", {"solver_type": "heun"}, 0.0, "dpmpp_2m_sde"),
    ("DPM-Solver++ 2M (midpoint", "DPMSolverMultistepScheduler", {"solver_order": 1}, 0.0, "euler"),
    ("DPM-Solver++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 0.0,
     "dpmpp_2m_sde"),
    ("DPM-Solver++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 1},
     0.0, "sde"),
    ("DPM-Solver++ 3M", "DPMSolverMultistepScheduler", {"solver_order": 3}, 0.0, "dpmsolver_3m"),
    ("DPM-Solver++ 2M with `final_sigmas_type", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"},
     0.0, "dpmsolver_3m"),
    ("DPM-Solver++ 2M with `final_sigmas_type", "DPMSolverMultistepScheduler",
     {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True, "euler_at_final": True}, 0.0, "dpmpp_2m"),
    ("Euler, Euler-ancestral", "EulerDiscreteScheduler", {}, 0.0, "euler"),
    ("Euler, Euler-ancestral", "EulerAncestralDiscreteScheduler", {}, 0.0, "euler_ancestral"),
    ("Euler, Euler-ancestral", "HeunDiscreteScheduler", {}, 0.0, "heun"),
    ("Euler, Euler-ancestral", "GEScheduler", {"clip_sample": False}, 0.0, "ge"),
    ("UniPC", "UniPCMultistepScheduler", {}, 0.0, "unipc"),
    ("LMS", "LMSDiscreteScheduler", {}, 0.0, "lms"),
    ("SA-Solver", "SASolverScheduler", {}, 0.0, "sa_solver"),
    ("PNDM", "PNDMScheduler", {"skip_prk_steps": True}, 0.0, "plms"),
    ("DEIS", "DEISMultistepScheduler", {}, 0.0, "deis"),
    ("DPM-Solver singlestep", "DPMSolverSinglestepScheduler", {}, 0.0, "dpmsolver_single"),
    ("DPM-Solver singlestep", "DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                               "solver_order": 1}, 0.0, "sde"),
    ("FlowMatchEulerDiscrete (", "FlowMatchEulerDiscreteScheduler", {}, 0.0, "euler"),
    ("FlowMatchEulerDiscrete (", "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, 0.0, "lcm"),
    ("FlowMatchHeunDiscrete", "FlowMatchHeunDiscreteScheduler", {}, 0.0, "heun_flow"),
    ("LCM", "LCMScheduler", {}, 0.0, "lcm"),
    ("KDPM2, KDPM2-ancestral", "KDPM2DiscreteScheduler", {}, 0.0, "dpm_2"),
    ("KDPM2, KDPM2-ancestral", "KDPM2AncestralDiscreteScheduler", {}, 0.0, "dpm_2_ancestral"),
    ("DPM-Solver SDE", "DPMSolverSDEScheduler", {}, 0.0, "dpmpp_sde"),
    ("EDM Euler", "EDMEulerScheduler", {}, 0.0, "euler"),
    ("EDM Euler", "EDMDPMSolverMultistepScheduler", {}, 0.0, "dpm"),  # "as DPM-Solver++ above"
]


def _table_row(start: str) -> str:
    rows = [line for line in LEVEL2.splitlines() if line.startswith("| " + start)]
    assert len(rows) == 1, f"README.md's Level 2 table has {len(rows)} rows starting {start!r}"
    return rows[0].split("|")[2]


@pytest.mark.parametrize("start, name, config, eta, method", MAPPING,
                         ids=[f"{m[1]}-{m[4]}-{i}" for i, m in enumerate(MAPPING)])
def test_level2_table_names_loop_specs_method(start, name, config, eta, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = getattr(diffusers, name)(**config) if hasattr(diffusers, name) else getattr(dkd, name)(**config)
        ours = diffkern_scheduler(stock)
        ours.set_timesteps(10)
        spec = loop_spec(ours, eta=eta)
    cell = _table_row(start)
    if method == "dpm":  # EDM DPM: "as DPM-Solver++ above"
        assert spec.method == "dpmpp_2m" and "as DPM-Solver++ above" in cell
    else:
        assert spec.method == method
        assert re.search(rf"`{method}[`(]", cell), f"row {start!r} does not name `{method}`: {cell}"


# (README phrase, scheduler, config, the option or class named in the error)
LEVEL2_REFUSED = [
    ("`clip_sample=True` but in DDIM, DDPM and GE", "LCMScheduler", {"clip_sample": True}, "clip_sample"),
    ("with `set_alpha_to_one=False` ending at t = 0", "DDIMScheduler",
     {"clip_sample": True, "set_alpha_to_one": False}, "set_alpha_to_one"),
    ("a DDIM spacing whose steps skip timesteps", "DDIMScheduler",
     {"clip_sample": False, "timestep_spacing": "linspace"}, "timestep_spacing"),
    ("UniPC with Karras/exponential sigmas and `final_sigmas_type=\"sigma_min\"`", "UniPCMultistepScheduler",
     {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
    ("Level 2 refuses TCD", "TCDScheduler", {}, "TCDScheduler"),
    ("Level 1 only", "IPNDMScheduler", {}, "IPNDMScheduler"),
    ("and Level 2 (it is not a sampling loop)", "DDIMInverseScheduler", {}, "DDIMInverseScheduler"),
    ("SA-Solver (VP sigmas; not Karras", "SASolverScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("PNDM (`skip_prk_steps=True`, epsilon prediction", "PNDMScheduler", {"skip_prk_steps": False},
     "skip_prk_steps"),
    ("PNDM (`skip_prk_steps=True`, epsilon prediction", "PNDMScheduler",
     {"skip_prk_steps": True, "prediction_type": "v_prediction"}, "prediction_type"),
    ("DEIS (orders 1-3; VP sigmas, not `use_flow_sigmas`)", "DEISMultistepScheduler",
     {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, "use_flow_sigmas"),
    ("\"sde-dpmsolver++\" only at `solver_order=1`", "DPMSolverSinglestepScheduler",
     {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("EDM DPM's `final_sigmas_type=\"sigma_min\"` is refused", "EDMDPMSolverMultistepScheduler",
     {"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
]


@pytest.mark.parametrize("phrase, name, config, option", LEVEL2_REFUSED,
                         ids=[f"{c[1]}-{c[3]}" for c in LEVEL2_REFUSED])
def test_level2_listed_refusal_raises(phrase, name, config, option):
    assert phrase in _flat(TEXT), f"README.md no longer says {phrase!r}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = getattr(diffusers, name)(**config)
        with pytest.raises(ValueError, match=re.escape(option)):
            ours = diffkern_scheduler(stock)
            ours.set_timesteps(10)
            loop_spec(ours)


def test_accelerate_signature_is_the_quoted_one():
    quoted = re.search(r"`accelerate\((pipe, [^`]*)\)`", LEVEL2).group(1)
    assert f"({quoted})" == str(inspect.signature(dkd.accelerate)).split(" ->")[0].replace("'", '"')


def test_ddim_pipeline_eta_with_a_step_that_takes_none_raises():
    """DDIMPipeline hands ``eta`` to ``step()``: the stock loop raises for Euler, and so does the fused one; ``fast.
    scheduler = ...`` sets the pipeline's scheduler."""
    assert "`eta` where the scheduler's `step()` takes none, in `DDIMPipeline`" in _flat(LEVEL2)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=False))
    fast = dkd.accelerate(pipe)
    fast.scheduler = diffusers.EulerDiscreteScheduler()
    assert isinstance(pipe.scheduler, diffusers.EulerDiscreteScheduler)
    with pytest.raises(TypeError, match="eta"):
        fast(num_inference_steps=2, eta=0.5, output_type="np")
    with pytest.raises(RuntimeError if not torch.cuda.is_available() else ValueError, match="graph"):
        dkd.accelerate(pipe, graph=True if not torch.cuda.is_available() else "yes")
