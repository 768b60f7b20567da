"""diffkern.diffusers.DDIMInverseScheduler (Level 1 DDIM inversion) against diffusers' ``DDIMInverseScheduler``.

Oracle and tolerance, as in test_diffusers_schedulers.py: the truth is diffusers' own class run in float64
(``diffusers_float64``: its betas, alpha-bars and step arithmetic in float64), the yardstick diffusers in float32, and
ours (float32) must satisfy the project rule ``max|ours - truth| <= 2*max|diffusers32 - truth| + 2e-6*max(1,
max|truth|)`` at every step on the truth's states; ours in float64 must reach the float64 floor (1e-12 relative).
Independent of diffusers: a textbook float64 inversion loop written here, and an inversion round trip (invert x0 with
ours, sample back with diffkern's DDIMScheduler) on the exact denoiser of a Gaussian mixture, whose error must shrink
like 1/N, as a first-order method's.
"""
import re
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffusers.schedulers.scheduling_ddim_inverse as INV  # noqa: E402

import diffkern.diffusers as dd  # noqa: E402
from diffkern.testing import SHAPES, assert_matches_reference, make_tensor  # noqa: E402
from dropin_conformance import check_saved_scheduler  # noqa: E402
from test_diffusers_schedulers import SHAPE, diffusers_float64  # noqa: E402

F64 = torch.float64
NAME = "DDIMInverseScheduler"
STEP_COUNTS = (1, 2, 10, 50)
# Stable Diffusion 1.x's scheduler_config.json (a PNDM config), as on the hub
SD_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def three(config, n):
    """(truth, eager, ours) after ``set_timesteps(n)``: diffusers in float64, in float32, ours from the latter's
    config; ours' timesteps are diffusers', exactly."""
    with diffusers_float64(INV):
        truth = diffusers.DDIMInverseScheduler(**config)
        truth.set_timesteps(n)
    eager = diffusers.DDIMInverseScheduler(**config)
    eager.set_timesteps(n)
    ours = dd.DDIMInverseScheduler.from_config(eager.config)
    ours.set_timesteps(n)
    assert ours.timesteps.dtype == torch.int64 and torch.equal(ours.timesteps, eager.timesteps), config
    assert ours.num_inference_steps == n and ours.order == 1 and ours.init_noise_sigma == 1.0
    return truth, eager, ours


def parity(config, n, *, shape=SHAPE, contiguous=True, backend=None, what=""):
    """Every step of ``n``: float32 ours within the rule (prev_sample and pred_original_sample) and float64 ours at
    the floor, on the truth's states and fresh model outputs (``contiguous=False``: transposed-storage views)."""
    truth, eager, ours = three(config, n)
    ours64 = dd.DDIMInverseScheduler.from_config(eager.config)
    ours64.set_timesteps(n)
    ours.backend = ours64.backend = backend
    what = f"{what} {config} N={n}"
    x = make_tensor(shape, F64, seed=11)
    for k, t in enumerate(eager.timesteps):
        m = make_tensor(shape, F64, seed=100 + k)
        with diffusers_float64(INV):
            ref = truth.step(m, truth.timesteps[k], x)
        m32 = make_tensor(shape, seed=100 + k, contiguous=contiguous)
        x32 = x.float() if contiguous else make_tensor(shape, seed=0, contiguous=False).copy_(x)
        out = eager.step(m32, t, x32)
        got = ours.step(m32, ours.timesteps[k], x32)
        got64 = ours64.step(m, ours64.timesteps[k], x)
        for field in ("prev_sample", "pred_original_sample"):
            assert_matches_reference(getattr(got, field), getattr(ref, field), getattr(out, field),
                                     f"{what} step {k} {field}")
            assert_matches_reference(getattr(got64, field), getattr(ref, field), getattr(ref, field),
                                     f"{what} step {k} {field} float64")
        x = ref.prev_sample
    assert ours.step_index == n


#----------------------------------------------------------------------------
# Step-by-step parity.


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("alpha_one", [True, False], ids=["alpha1", "alpha0"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_matches_diffusers(prediction_type, spacing, alpha_one, clip):
    for n in STEP_COUNTS:
        for offset in (0, 1):
            config = {"prediction_type": prediction_type, "timestep_spacing": spacing, "set_alpha_to_one": alpha_one,
                      "clip_sample": clip, "steps_offset": offset}
            if prediction_type == "sample" and alpha_one:  # refused: see test_sample_from_alpha_one_is_refused
                continue
            parity(config, n)


EXTRA = [
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "clip_sample_range": 0.5},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},  # ends at alpha-bar 0: eps only, finite
    {"num_train_timesteps": 37, "timestep_spacing": "trailing", "set_alpha_to_one": False},
    {"num_train_timesteps": 999, "steps_offset": 2, "prediction_type": "sample", "set_alpha_to_one": False},
    {"trained_betas": torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 100).pow(2).tolist(), "num_train_timesteps": 100,
     "clip_sample_range": 3.0},
]


@pytest.mark.parametrize("config", EXTRA, ids=range(len(EXTRA)))
def test_matches_diffusers_other_configs(config):
    for n in (1, 3, 7, 10):
        parity(config, n)


def test_every_cpu_backend(cpu_backend):
    for config in ({"clip_sample": True}, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
                   {"prediction_type": "sample", "set_alpha_to_one": False, "clip_sample": False}):
        parity(config, 10, backend=cpu_backend, what=cpu_backend)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_awkward_shapes_and_strides(shape):
    for config in ({}, {"prediction_type": "v_prediction", "clip_sample": False}):
        parity(config, 2, shape=shape)
        if len(shape) > 1:
            parity(config, 2, shape=shape, contiguous=False, what="non-contiguous")


def test_mixed_dtypes_promote_as_diffusers():
    # a float16 sample with a float32 model output (and the reverse) steps in float32, as diffusers' arithmetic
    for sample_dtype, model_dtype in ((torch.float16, torch.float32), (torch.float32, torch.float16)):
        truth, eager, ours = three({"clip_sample": False}, 4)
        x = make_tensor(SHAPE, F64, seed=1).to(sample_dtype).double()
        for k, t in enumerate(eager.timesteps):
            m = make_tensor(SHAPE, F64, seed=20 + k).to(model_dtype).double()
            with diffusers_float64(INV):
                ref = truth.step(m, truth.timesteps[k], x).prev_sample
            out = eager.step(m.to(model_dtype), t, x.to(sample_dtype)).prev_sample
            got = ours.step(m.to(model_dtype), t, x.to(sample_dtype)).prev_sample
            assert got.dtype == out.dtype == torch.float32
            assert_matches_reference(got, ref, out, f"{sample_dtype}/{model_dtype} step {k}")
            x = ref.to(sample_dtype).double()


def test_start_mid_schedule_and_out_of_order():
    # diffusers' step depends only on t: a loop may start at any timestep of the list (ours locates it on the host)
    truth, eager, ours = three({}, 10)
    x, m = make_tensor(SHAPE, seed=1), make_tensor(SHAPE, seed=2)
    for t in eager.timesteps[4:6]:
        with diffusers_float64(INV):
            ref = truth.step(m.double(), t, x.double()).prev_sample
        assert_matches_reference(ours.step(m, t, x).prev_sample, ref, eager.step(m, t, x).prev_sample, f"t={t}")
    with pytest.raises(ValueError, match="timestep: expected 600"):
        ours.step(m, 900, x)
    ours.set_timesteps(1)
    ours.step(m, 0, x)
    with pytest.raises(IndexError, match="past the end"):
        ours.step(m, 0, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        dd.DDIMInverseScheduler().step(m, 0, x)


def test_step_does_not_read_device_timesteps_and_outputs():
    sched = dd.DDIMInverseScheduler()
    sched.set_timesteps(4)
    x = make_tensor(SHAPE, seed=1)
    for k in range(4):
        out = sched.step(make_tensor(SHAPE, seed=k), torch.empty((), device="meta"), x, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == out[1].shape == x.shape
        x = out[0]
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="model_out"):
        sched.set_timesteps(2)
        sched.step(make_tensor((2, 3, 5, 6)), 0, x)


def test_api_before_set_timesteps():
    ours, theirs = dd.DDIMInverseScheduler(), diffusers.DDIMInverseScheduler()
    assert torch.equal(ours.timesteps, theirs.timesteps) and len(ours) == len(theirs) == 1000
    x = make_tensor(SHAPE, seed=1)
    assert ours.scale_model_input(x, 3) is x
    assert float(ours.initial_alpha_cumprod) == 1.0
    assert float(dd.DDIMInverseScheduler(set_alpha_to_one=False).initial_alpha_cumprod) == \
        pytest.approx(float(theirs.alphas_cumprod[0]), rel=1e-7)

#----------------------------------------------------------------------------
# Configs: refusals, loading, persistence.


@pytest.mark.parametrize("config, n, option", [
    ({"timestep_spacing": "linspace"}, 10, "timestep_spacing='linspace'"),
    ({"steps_offset": 1}, 1000, "steps_offset=1"),  # last timestep 1000: diffusers indexes past alpha-bar's end
    ({"timestep_spacing": "trailing"}, 61, "timestep_spacing='trailing'"),  # diffusers makes 62, the first -1
    ({"prediction_type": "sample"}, 10, "prediction_type='sample'"),  # from alpha-bar 1: diffusers divides by 0
])
def test_refusals_name_the_option(config, n, option):
    theirs = diffusers.DDIMInverseScheduler(**config)
    ours = dd.DDIMInverseScheduler(**config)
    with pytest.raises(ValueError, match=re.escape(option)):
        ours.set_timesteps(n)
    if config.get("timestep_spacing") == "linspace":  # diffusers refuses it too
        with pytest.raises(ValueError, match="linspace"):
            theirs.set_timesteps(n)
        return
    theirs.set_timesteps(n)  # diffusers accepts these, then fails or returns non-finite samples
    x = make_tensor(SHAPE, seed=1)
    try:
        out = theirs.step(x, theirs.timesteps[-1 if "steps_offset" in config else 0], x).prev_sample
    except IndexError:
        return
    if "timestep_spacing" in config:
        assert len(theirs.timesteps) == n + 1 and int(theirs.timesteps[0]) == -1
    else:
        assert not torch.isfinite(out).all()


@pytest.mark.parametrize("kw, option", [({"prediction_type": "flow"}, "prediction_type='flow'"),
                                        ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'")])
def test_unsupported_config_raises_at_construction(kw, option):
    with pytest.raises(ValueError, match=re.escape(option)):
        dd.DDIMInverseScheduler(**kw)


@pytest.mark.parametrize("n", [0, 1001, 2.5, True, None])
def test_bad_step_count_names_the_argument(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        dd.DDIMInverseScheduler().set_timesteps(n)


SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


@pytest.mark.parametrize("source", [SD_CONFIG, ("DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
                                    ("PNDMScheduler", {"set_alpha_to_one": False, "skip_prk_steps": True}),
                                    ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
                                    ("DDIMScheduler", {"thresholding": True, "prediction_type": "v_prediction"}),
                                    ("DPMSolverMultistepScheduler", {})], ids=range(6))
def test_from_config_as_diffusers(source):
    # configs users load (keys this class does not take are kept in the config and ignored, as diffusers does)
    config = source if isinstance(source, dict) else getattr(diffusers, source[0])(**SD_BETAS, **source[1]).config
    theirs = diffusers.DDIMInverseScheduler.from_config(config)
    ours = dd.DDIMInverseScheduler.from_config(config)
    assert _public(ours.config) == _public(theirs.config)
    assert float(ours.initial_alpha_cumprod) == pytest.approx(float(theirs.initial_alpha_cumprod), rel=1e-7)
    if ours.config.timestep_spacing == "linspace":  # a DPM-Solver config: both load it, both refuse its spacing
        for s in (ours, theirs):
            with pytest.raises(ValueError, match="linspace"):
                s.set_timesteps(10)
        return
    parity(_public(theirs.config), 10, what=str(source))
    assert ours.config.beta_schedule == "scaled_linear" and ours.config.steps_offset == 1


def test_stable_diffusion_ddim_config():
    # pipe.scheduler of a Stable Diffusion DDIM pipeline, then DDIMInverseScheduler.from_config of it
    ddim = diffusers.DDIMScheduler.from_config(SD_CONFIG)
    ours, theirs = (cls.from_config(ddim.config) for cls in (dd.DDIMInverseScheduler, diffusers.DDIMInverseScheduler))
    assert _public(ours.config) == _public(theirs.config)
    assert ours.config.set_alpha_to_one is False and ours.config.steps_offset == 1
    assert ours.config.beta_schedule == "scaled_linear" and ours.config.clip_sample is False
    parity(_public(theirs.config), 50, what="SD DDIM")


def test_deprecated_set_alpha_to_zero():
    for make in (lambda cls: cls(set_alpha_to_zero=False),
                 lambda cls: cls.from_config({"_class_name": NAME, "set_alpha_to_zero": False})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            theirs, ours = make(diffusers.DDIMInverseScheduler), make(dd.DDIMInverseScheduler)
        assert float(theirs.initial_alpha_cumprod) < 1
        assert float(ours.initial_alpha_cumprod) == pytest.approx(float(theirs.initial_alpha_cumprod), rel=1e-7)
        assert _public(ours.config) == _public(theirs.config)
    with pytest.warns(FutureWarning, match="set_alpha_to_zero"):
        dd.DDIMInverseScheduler(set_alpha_to_zero=True)


def test_save_and_load(tmp_path):
    sched = dd.DDIMInverseScheduler(timestep_spacing="trailing", prediction_type="v_prediction",
                                    set_alpha_to_one=False, clip_sample=False, beta_schedule="scaled_linear")
    expected = {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "set_alpha_to_one": False,
                "clip_sample": False, "beta_schedule": "scaled_linear"}
    check_saved_scheduler(sched, tmp_path / "s", expected)
    loaded = dd.DDIMInverseScheduler.from_pretrained(tmp_path / "s")
    assert type(loaded) is dd.DDIMInverseScheduler and loaded.__module__ == "diffkern.diffusers"
    parity(_public(loaded.config), 10, what="loaded")


def test_accelerate_refuses_by_name():
    from test_diffusers_pipelines import tiny_unet
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(diffusers.UNet2DModel), scheduler=dd.DDIMInverseScheduler())
    with pytest.raises(ValueError, match="DDIMInverseScheduler is not supported: an inverse scheduler"):
        dd.accelerate(pipe)
