"""The core samplers' orders and knob errors (the second half of test_sampler_formula_review.py's review):

* (ii) on a Gaussian (where every deterministic sampler is a linear map), the end distribution converges to the
  data's (smoothed to the last sigma) at the method's order;
* knob validation names the knob.
"""
import math

import numpy as np
import pytest
import torch

from diffkern import analytic, schedules
from diffkern.sampling import sample
from test_sampler_formula_review import F64, REF, SCHEDULES, _gmm, _start

#----------------------------------------------------------------------------
# (ii) Convergence of the end distribution on a Gaussian, where every deterministic sampler is linear in x - m.


def _end_std_error(method, n, knobs, stds=(0.3, 1.5), sigma_min=0.02, sigma_max=20.0):
    """Relative error of the per-dimension end std against the data's smoothed to sigma_min, N(m, s^2 + smin^2),
    starting from the exact N(m, s^2 + smax^2): each dimension's map is x - m -> K (x - m), so one point gives K."""
    s = torch.tensor(stds, dtype=F64)
    m = torch.tensor([[1.0, -2.0]], dtype=F64)
    gmm = analytic.GaussianMixture([1.0], m, s[None])
    sig = schedules.loglinear(n, sigma_min, sigma_max).tolist()[:-1]
    x = torch.cat([m + (s * s + sigma_max ** 2).sqrt(), m])
    out = sample(gmm, x, sig, method, backend=REF, **knobs)
    assert float((out[1] - m[0]).abs().max()) < 1e-12  # the mean is a fixed point of every step
    end_std = out[0] - m[0]
    return float((end_std / (s * s + sigma_min ** 2).sqrt() - 1).abs().max())


@pytest.mark.parametrize("method,knobs,order", [
    ("euler", {}, 1), ("heun", {}, 2), ("dpmpp_2m", {}, 2), ("euler_ancestral", {"eta": 0.0}, 1),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2), ("ge", {"gamma": 1.0}, 1), ("ge", {"gamma": 2.0}, 1),
    ("sde", {"lam": 0.0}, 1), ("sde", {"lam": 0.0, "integrator": "euler_maruyama"}, 1)])
def test_gaussian_end_distribution_converges_at_order(method, knobs, order):
    ns = [32, 64, 128]
    errs = [_end_std_error(method, n, knobs) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert errs[-1] < errs[0]
    assert abs(slope - order) < 0.15, f"{method} {knobs}: errors {errs}, fitted order {slope:.3f}"

#----------------------------------------------------------------------------
# Knob validation names the knob.


@pytest.mark.parametrize("method,knobs,name", [
    ("euler_ancestral", {"eta": -0.1}, "eta"), ("dpmpp_2m_sde", {"eta": -1.0}, "eta"),
    ("euler", {"s_churn": -1.0}, "s_churn"), ("heun", {"s_churn": -0.5}, "s_churn"),
    ("heun", {"s_noise": -1.0}, "s_noise"), ("euler", {"s_tmin": -1.0}, "s_tmin"),
    ("sde", {"lam": -0.5}, "lam"), ("sde", {"integrator": "rk4"}, "integrator"),
    ("ge", {"mu": 1.0}, "mu"), ("ge", {"mu": -0.1}, "mu"), ("ge", {"gamma": math.inf}, "gamma"),
    ("ge", {"gamma": math.nan}, "gamma"), ("ge", {"gamma": True}, "gamma"), ("sde", {"lam": math.inf}, "lam"),
    ("sde", {"lam": torch.tensor(0.5)}, "lam"), ("euler_ancestral", {"eta": math.inf}, "eta"),
    ("dpmpp_2m_sde", {"solver_type": "rk"}, "solver_type")])
def test_bad_knobs_name_the_knob(method, knobs, name):
    gmm, sig = _gmm(), SCHEDULES["karras_to0"]()
    with pytest.raises((ValueError, TypeError), match=name):
        sample(gmm, _start(sig[0], n=2), sig, method, backend=REF, **knobs)
