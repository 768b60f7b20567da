"""The per-model plan behind the CUDA-graph key (``diffkern.graph_keys._Plan``): a cached key is never stale.

Oracle: the key computed with the model's plan dropped (built from scratch by a walk of the model). After each
kind of change made behind a cached plan's back, the key must (1) differ from the key before the change, (2) equal
the key of a fresh plan, and (3) where the change is undone, equal the first key again (no needless capture).
"""
import gc
import weakref

import pytest
import torch

from diffkern import graph_keys


class _Proc:
    """A plain object a forward calls, as diffusers' attention processors."""

    def __init__(self, factor=1.0):
        self.factor = factor


class _OtherProc(_Proc):
    pass


class Block(torch.nn.Module):
    """A non-torch.nn module: its public attributes are keyed by value."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2, dtype=torch.float64)
        self.act = torch.nn.SiLU()
        self.register_buffer("offset", torch.zeros(2, dtype=torch.float64))
        self.scale, self.n, self.name, self.flag, self.opt = 0.0, 1, "a", True, None
        self.scaling, self.proc, self._private = {"default": 1.0}, _Proc(), 0


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.blocks = torch.nn.ModuleList([Block(), Block()])


def key(model):
    return graph_keys.model_key(model)


def fresh(model):
    graph_keys._PLANS.pop(id(model), None)
    return graph_keys.model_key(model)


def _check(model, mutate, undo=None):
    """Mutate ``model`` behind its cached plan: the key changes and equals a fresh plan's; ``undo`` restores the
    first key."""
    before = key(model)
    assert key(model) == before and id(model) in graph_keys._PLANS  # the plan path, cached
    mutate()
    after = key(model)
    assert after != before, mutate
    assert key(model) == after == fresh(model), mutate
    if undo is not None:
        key(model)  # a plan of the mutated model
        undo()
        assert key(model) == before, undo


def _setattr(obj, name, value):
    return lambda: setattr(obj, name, value)


def test_unchanged_model_keeps_its_key_and_plan():
    model = Net()
    first = key(model)
    plan = graph_keys._PLANS[id(model)]
    assert key(model) == first == fresh(model)
    assert graph_keys._PLANS[id(model)] is not plan  # fresh() built a new one: equal keys across plans
    hash(first)


@pytest.mark.parametrize("what", ["training", "int", "float", "negative zero", "str", "bool for int", "float for int",
                                  "None", "added", "removed", "private swapped for public", "processor number",
                                  "processor class", "dict item", "root training"])
def test_attribute_and_flag_changes(what):
    model = Net()
    b = model.blocks[0]
    cases = {
        "training": (lambda: b.lin.train(False), lambda: b.lin.train(True)),
        "int": (_setattr(b, "n", 2), _setattr(b, "n", 1)),
        "float": (_setattr(b, "scale", 0.5), _setattr(b, "scale", 0.0)),
        "negative zero": (_setattr(b, "scale", -0.0), _setattr(b, "scale", 0.0)),
        "str": (_setattr(b, "name", "b"), _setattr(b, "name", "a")),
        "bool for int": (_setattr(b, "n", True), _setattr(b, "n", 1)),
        "float for int": (_setattr(b, "n", 1.0), _setattr(b, "n", 1)),
        "None": (_setattr(b, "opt", 0), _setattr(b, "opt", None)),
        "added": (_setattr(b, "extra", 3), lambda: delattr(b, "extra")),
        "removed": (lambda: delattr(b, "name"), None),  # put back, it would come last: another key
        # the same number of __dict__ entries: a count would miss it
        "private swapped for public": (lambda: (delattr(b, "_private"), setattr(b, "extra", 0)),
                                       lambda: (delattr(b, "extra"), setattr(b, "_private", 0))),
        "processor number": (_setattr(b.proc, "factor", 0.25), _setattr(b.proc, "factor", 1.0)),
        "processor class": (_setattr(b, "proc", _OtherProc()), _setattr(b, "proc", _Proc())),
        "dict item": (lambda: b.scaling.__setitem__("default", 0.5), lambda: b.scaling.__setitem__("default", 1.0)),
        "root training": (lambda: model.train(False), lambda: model.train(True)),
    }
    _check(model, *cases[what])


def test_nan_keys_equal_itself():
    model = Net()
    model.blocks[0].scale = float("nan")
    first = key(model)
    model.blocks[0].scale = float("nan")  # another NaN object
    assert key(model) == first == fresh(model)


@pytest.mark.parametrize("what", ["parameter reassigned", "data replaced", "buffer reassigned", "parameter where None",
                                  "parameter registered", "buffer registered", "parameter removed", "cast",
                                  "parameters dict replaced"])
def test_tensor_changes(what):
    model = Net()
    lin, act = model.blocks[1].lin, model.blocks[0].act
    weight = lin.weight

    def data_replaced():
        weight.data = torch.ones(2, 2, dtype=torch.float64)  # the same Parameter object, new memory

    def replace_dict():
        lin._parameters = dict(lin._parameters)
        key(model)  # the same tensors: the plan reads the new dict...
        lin.weight = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))  # ...and sees this

    cases = {
        "parameter reassigned": (_setattr(lin, "weight", torch.nn.Parameter(weight.detach().clone())),
                                 _setattr(lin, "weight", weight)),
        "data replaced": (data_replaced, None),
        "buffer reassigned": (_setattr(model.blocks[0], "offset", torch.ones(2, dtype=torch.float64)), None),
        "parameter where None": (lambda: (lin.register_parameter("extra", None), key(model),
                                          setattr(lin, "extra", torch.nn.Parameter(torch.ones(1)))), None),
        "parameter registered": (lambda: act.register_parameter("w", torch.nn.Parameter(torch.ones(1))),
                                 lambda: delattr(act, "w")),
        "buffer registered": (lambda: act.register_buffer("b", torch.ones(1)), lambda: delattr(act, "b")),
        "parameter removed": (_setattr(lin, "bias", None), None),
        "cast": (lambda: model.float(), None),
        "parameters dict replaced": (replace_dict, None),
    }
    _check(model, *cases[what])


@pytest.mark.parametrize("what", ["forward hook", "pre hook", "global hook"])
def test_hooks(what):
    model = Net()
    lin = model.blocks[0].lin
    handles = []
    register = {"forward hook": lambda: lin.register_forward_hook(lambda m, a, o: o),
                "pre hook": lambda: lin.register_forward_pre_hook(lambda m, a: a),
                "global hook": lambda: torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: o)}[what]
    try:
        _check(model, lambda: handles.append(register()), lambda: handles.pop().remove())
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("what", ["layer class swapped", "module replaced", "module added", "module shared",
                                  "class assigned", "cycle", "child of a leaf"])
def test_tree_changes(what):
    model = Net()
    b0, b1 = model.blocks
    act = b0.act
    cases = {
        # a parameterless torch.nn layer of another class: no tensor, no attribute tells them apart
        "layer class swapped": (_setattr(b0, "act", torch.nn.GELU()), _setattr(b0, "act", act)),
        "module replaced": (_setattr(b1, "lin", torch.nn.Linear(2, 2, dtype=torch.float64)), None),
        "module added": (lambda: model.blocks.append(Block()), lambda: model.blocks.__delitem__(-1)),
        "module shared": (_setattr(b1, "act", act), None),
        "class assigned": (_setattr(act, "__class__", torch.nn.Tanh), _setattr(act, "__class__", torch.nn.SiLU)),
        "cycle": (_setattr(b0, "back", model), lambda: delattr(b0, "back")),
        "child of a leaf": (lambda: act.add_module("inner", torch.nn.Identity()), lambda: delattr(act, "inner")),
    }
    _check(model, *cases[what])


def test_other_dict_types_fall_back_to_the_walk():
    """A module whose parameters live in another mapping type than torch's dicts is read by the walk, which
    still sees a reassigned parameter."""

    class Params(dict):
        pass

    model = Net()
    lin = model.blocks[0].lin
    lin._parameters = Params(lin._parameters)
    first = key(model)
    assert id(model) not in graph_keys._PLANS and key(model) == first
    lin.weight = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    assert key(model) != first


@pytest.mark.parametrize("cycle", [False, True])
def test_a_plan_keeps_no_model_alive(cycle):
    model = Net()
    if cycle:
        model.blocks[0].back = model  # a submodule referring to the root
    key(model)
    ident, ref = id(model), weakref.ref(model)
    assert ident in graph_keys._PLANS
    del model
    gc.collect()
    assert ref() is None
    assert ident not in graph_keys._PLANS


def test_diffusers_unet_processors():
    """diffusers' attention processors: swapping in another class changes the key, the original class again
    restores it; the fresh-plan key always agrees."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    attentions = [m for m in unet.modules() if hasattr(m, "set_processor")]
    assert attentions

    def processors(cls):
        return lambda: [m.set_processor(cls()) for m in attentions]

    _check(unet, processors(AttnProcessor), processors(AttnProcessor2_0))
    _check(unet, lambda: unet.up_blocks[0].attentions[0].__setattr__("rescale_output_factor", 2.0))
