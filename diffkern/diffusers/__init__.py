"""diffkern as a drop-in for HuggingFace diffusers (``docs/diffusers.md``).

Level 1, schedulers whose ``step()`` is one fused op::

    pipe.scheduler = diffkern.diffusers.DDIMScheduler.from_config(pipe.scheduler.config)

Level 2, the whole denoising loop in diffkern (:func:`diffkern.sampling.sample`)::

    fast = diffkern.diffusers.accelerate(pipe)
    images = fast(num_inference_steps=30, generator=torch.Generator().manual_seed(0)).images

Importing this package imports diffusers (``import diffkern`` alone does not).
"""
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (see below)

from .accelerate import AcceleratedPipeline, accelerate
from .schedulers import FusedScheduler, FusedSchedulerOutput
from .schedulers_ddim_inverse import DDIMInverseScheduler
from .schedulers_deis import DEISMultistepScheduler
from .schedulers_dpmsolver_sde import DPMSolverSDEScheduler
from .schedulers_edm import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from .schedulers_flow import FlowMatchEulerDiscreteScheduler
from .schedulers_flow_heun import FlowMatchHeunDiscreteScheduler
from .schedulers_ge import GEScheduler, IADBScheduler
from .schedulers_ipndm import IPNDMScheduler
from .schedulers_k import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from .schedulers_kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from .schedulers_lcm import LCMScheduler
from .schedulers_lms import LMSDiscreteScheduler
from .schedulers_pndm import PNDMScheduler
from .schedulers_sasolver import SASolverScheduler
from .schedulers_singlestep import DPMSolverSinglestepScheduler
from .schedulers_tcd import TCDScheduler
from .schedulers_unipc import UniPCMultistepScheduler
from .schedulers_vp import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

SCHEDULERS = {c.__name__: c for c in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                                      EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
                                      KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, GEScheduler,
                                      IADBScheduler, LCMScheduler, FlowMatchEulerDiscreteScheduler,
                                      UniPCMultistepScheduler, TCDScheduler, EDMEulerScheduler,
                                      EDMDPMSolverMultistepScheduler, DEISMultistepScheduler,
                                      PNDMScheduler, LMSDiscreteScheduler, DPMSolverSinglestepScheduler,
                                      SASolverScheduler, DDIMInverseScheduler, DPMSolverSDEScheduler,
                                      FlowMatchHeunDiscreteScheduler, IPNDMScheduler)}

# A pipeline's save_pretrained records a third-party scheduler as (its __module__, its name), and from_pretrained
# imports that module and looks the class and SchedulerMixin up in it. Recording this package (rather than the
# file that defines the class) keeps saved pipelines loadable whatever the internal layout.
for _cls in SCHEDULERS.values():
    _cls.__module__ = __name__

__all__ = ["AcceleratedPipeline", "DDIMInverseScheduler", "DDIMScheduler", "DDPMScheduler",
           "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler",
           "DPMSolverSinglestepScheduler",
           "EDMDPMSolverMultistepScheduler", "EDMEulerScheduler", "EulerAncestralDiscreteScheduler",
           "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
           "DEISMultistepScheduler", "FusedScheduler", "FusedSchedulerOutput",
           "GEScheduler", "HeunDiscreteScheduler", "IADBScheduler", "IPNDMScheduler", "KDPM2AncestralDiscreteScheduler",
           "KDPM2DiscreteScheduler", "LCMScheduler", "LMSDiscreteScheduler", "PNDMScheduler", "SASolverScheduler",
           "SCHEDULERS",
           "TCDScheduler",
           "UniPCMultistepScheduler",
           "accelerate"]
