"""NumPy scalars at the diffusers drop-ins (the rest of the public API: ``test_numpy_scalars.py``, whose rule this
follows: each call with numpy scalars gives bitwise what it gives with the equal Python scalars). Level 1: every
scheduler's set_timesteps, its config given as numpy scalars (the config then holds Python scalars and serialises),
step knobs and set_begin_index; Level 2: ``accelerate`` pipelines' step count, eta and guidance."""
import inspect
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import diffkern.diffusers as dd  # noqa: E402
from test_diffusers_pipelines import tiny_sd, tiny_unet  # noqa: E402,F401  (tiny_sd: the fixture)
from test_numpy_scalars import ARRAY, check, f32, i64  # noqa: E402

#----------------------------------------------------------------------------
# Level 1: schedulers (set_timesteps, config, step knobs, set_begin_index).


def _loop(sched, steps, begin=None, **step_kw):
    """timesteps and the final state of a short loop of ``sched`` on a fixed stand-in for the network."""
    sched.set_timesteps(steps)
    if begin is not None:
        sched.set_begin_index(begin)
    sched.set_seed(3)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = x * float(getattr(sched, "init_noise_sigma", 1.0))  # flow matching has none
    for t in sched.timesteps[begin or 0:]:
        x = sched.step(torch.tanh(sched.scale_model_input(x, t)) * 0.5, t, x, return_dict=False, **step_kw)[0]
    return sched.timesteps, x


def _numeric_config(cls):
    """Every numeric default of ``cls.__init__`` as a numpy scalar: ints as np.int64, floats as np.float32."""
    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if not isinstance(p.default, bool) and isinstance(p.default, (int, float)):
            out[name] = np.int64(p.default) if isinstance(p.default, int) else np.float32(p.default)
    return out


@pytest.mark.parametrize("name", sorted(dd.SCHEDULERS))
def test_level1_schedulers(name):
    cls = dd.SCHEDULERS[name]
    check(lambda n: _loop(cls(), n), i64(4))
    config = _numeric_config(cls)
    check(lambda **c: _loop(cls(**c), 4), **config)
    sched = cls(**config)
    assert not [k for k, v in sched.config.items() if isinstance(v, np.generic)]
    json.loads(sched.to_json_string())  # numpy scalars would not serialise
    for bad in (np.True_, ARRAY):
        with pytest.raises(ValueError, match=r"num_inference_steps"):
            cls().set_timesteps(bad)


@pytest.mark.parametrize("name, kw", [("DDIMScheduler", {"eta": f32(0.3)}),
                                      ("EulerDiscreteScheduler", {"s_churn": f32(0.5), "s_noise": f32(0.9)}),
                                      ("LMSDiscreteScheduler", {"order": i64(2)}),
                                      ("DPMSolverSDEScheduler", {"s_noise": f32(0.9)}),
                                      ("EDMEulerScheduler", {"s_churn": f32(0.5), "s_tmax": f32(50.0)}),
                                      ("TCDScheduler", {"eta": f32(0.3)}),
                                      ("EulerAncestralDiscreteScheduler", {}), ("HeunDiscreteScheduler", {})])
def test_level1_step_knobs_and_begin_index(name, kw):
    cls = dd.SCHEDULERS[name]
    check(lambda begin, **k: _loop(cls(), 6, begin, **k), i64(2), **kw)
    with pytest.raises(ValueError, match=r"begin_index: expected"):
        cls().set_begin_index(np.True_)


@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler"])
def test_level1_warnings_still_name_the_caller(name):
    # set_timesteps runs inside FusedScheduler's numpy-scalar wrapper: its warnings must still point here
    with pytest.warns(UserWarning, match="not on the original") as record:
        dd.SCHEDULERS[name]().set_timesteps(timesteps=[i64(999), 700, 90])
    assert record[0].filename == __file__


#----------------------------------------------------------------------------
# Level 2: accelerate's pipelines.


def test_level2_unconditional():
    import diffusers
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    fast = dd.accelerate(pipe)
    check(lambda b, n, e: fast(batch_size=b, num_inference_steps=n, eta=e, generator=torch.Generator().manual_seed(0),
                               output_type="pt").images, i64(2), i64(3), f32(0.5))
    for bad in (np.True_, ARRAY):
        with pytest.raises(ValueError, match=r"^num_inference_steps: expected an int >= 1"):
            fast(num_inference_steps=bad)


def test_level2_text2image(tiny_sd):  # noqa: F811
    fast = dd.accelerate(tiny_sd(dd.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                            beta_end=0.012)))
    check(lambda n, w, r: fast(["a cat"], num_inference_steps=n, guidance_scale=w, guidance_rescale=r,
                               generator=torch.Generator().manual_seed(0), output_type="pt").images,
          i64(3), f32(4.5), f32(0.3))
