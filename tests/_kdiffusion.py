"""k-diffusion's own sampling module and model wrappers as test oracles (the released k-diffusion 0.1.1.post1,
installed with ``pip --no-deps`` from requirements-nodeps.txt, with torchsde and torchdiffeq, which its sampling
module imports).

The package's ``__init__`` imports its training stack (kornia, clean-fid, wandb, torchvision), which would replace
the CPU torch; only ``sampling.py``, ``external.py`` and the ``utils.py`` they read (``append_dims``) are loaded,
from their files, as the modules of a package named ``_kdiffusion_oracle``. ``utils.py`` imports torchvision's
transforms at the top for its image helpers only: an empty placeholder stands in while it loads and is removed again."""
import functools
import importlib.util
import os
import sys
import types

PACKAGE = "_kdiffusion_oracle"


def _exec(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def sampling() -> types.ModuleType:
    """k-diffusion's ``k_diffusion.sampling`` module (loaded once per process)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        raise RuntimeError("k-diffusion is a test dependency: pip install --no-deps -r requirements-nodeps.txt")
    root = os.path.dirname(spec.origin)
    package = types.ModuleType(PACKAGE)
    package.__path__ = [root]
    sys.modules[PACKAGE] = package
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    placed = [n for n in names if n not in sys.modules and importlib.util.find_spec(n.split(".")[0]) is None]
    for n in placed:
        sys.modules[n] = types.ModuleType(n)
    if placed:
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        package.utils = _exec(f"{PACKAGE}.utils", os.path.join(root, "utils.py"))
    finally:
        for n in placed:
            del sys.modules[n]
    package.sampling = _exec(f"{PACKAGE}.sampling", os.path.join(root, "sampling.py"))
    return package.sampling


@functools.lru_cache(maxsize=None)
def external() -> types.ModuleType:
    """k-diffusion's ``k_diffusion.external`` module (its model wrappers: VDenoiser, DiscreteEpsDDPMDenoiser,
    DiscreteVDDPMDenoiser), loaded once per process after :func:`sampling`, which it imports."""
    sampling()
    spec = importlib.util.find_spec("k_diffusion")
    module = _exec(f"{PACKAGE}.external", os.path.join(os.path.dirname(spec.origin), "external.py"))
    sys.modules[PACKAGE].external = module
    return module
