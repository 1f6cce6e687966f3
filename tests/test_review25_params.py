"""Review round 25: what round 24 left open. A factor carrying a torch parametrization (registered on an adapter layer
after attach) is a computed value, not the tensor that trains (``parametrizations.<factor>.original``):
``check_finite_grads`` read the computed value's ``.grad`` (``None``) and missed a NaN, LoRA+ put the computed value in
its fast group (the optimizer refused it, the real factor trained at the slow rate), RAC-LoRA refused the right
optimizer ("does not hold adapter parameter"), a parametrized sketch was silently never resampled, and EDoRA's norm,
kept from its stored ``A``, disagreed with a parametrized one. A parameter a user registered on an adapter layer while
attached was lost at ``detach`` / ``delete`` (round 23 handed over buffers only)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import LinearStack, Negate
from torch import nn
from torch.nn.utils import parametrize

import rankwise
from rankwise.methods.raclora import compress_chain, end_link

SLOTS = [f"layers.{i}" for i in range(3)]


def _x() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).sum()


def _adapted(config: rankwise.AdapterConfig, names: tuple[str, ...] = ("default",)) -> LinearStack:
    torch.manual_seed(0)
    model = LinearStack(3, 6)
    for name in names:
        rankwise.attach(model, config, name=None if name == "default" else name,
                        calibration=[_x()], loss_fn=_loss)  # calibration: GoRA's, ignored by the others
    return model


def _original(layer: nn.Module, factor: str) -> torch.Tensor:
    return getattr(layer.parametrizations, factor).original


CONFIGS = {
    "lora": rankwise.LoraConfig(r=2, alpha=4, target_modules="all-linear"),
    "dora": rankwise.DoraConfig(r=2, alpha=4, target_modules="all-linear"),
    "gora": rankwise.GoraConfig(r=2, alpha=4, target_modules="all-linear", n_steps=1, r_min=1, r_max=4),
}


# ---------------------------------------------------------------------------- parametrized factors
@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_nan_gradient_of_a_parametrized_factor_is_caught(method: str) -> None:
    """``lora_b`` of layers.1 parametrized after attach; a NaN in the gradient of the tensor that trains (its
    ``original``) is named by ``check_finite_grads``. Before: it read the computed value's ``.grad`` (always ``None``:
    not a leaf) and passed, with only torch's non-leaf warning."""
    model = _adapted(CONFIGS[method])
    layer = model.layers[1]
    parametrize.register_parametrization(layer, "lora_b", Negate())
    _loss(model, _x()).backward()
    _original(layer, "lora_b").grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'layers\.1\.lora_b'"):
        rankwise.check_finite_grads(model)


def test_lora_plus_gives_a_parametrized_b_its_rate_and_trains_it() -> None:
    """LoRA+ groups with ``lora_b`` of layers.1 parametrized: its ``original`` is in ``lora_plus_b`` (ratio x lr) and
    nowhere else, the optimizer builds and a step moves it. Before: the computed value went into ``lora_plus_b`` (AdamW
    refused "can't optimize a non-leaf Tensor") and the original into ``base_lr``."""
    model = _adapted(CONFIGS["lora"])
    layer = model.layers[1]
    parametrize.register_parametrization(layer, "lora_b", Negate())
    original = _original(layer, "lora_b")
    groups = rankwise.lora_plus_param_groups(model, lr=1e-2, ratio=4)
    holding = [g["name"] for g in groups if any(p is original for p in g["params"])]
    assert holding == ["lora_plus_b"]
    assert all(p.is_leaf for g in groups for p in g["params"])
    optimizer = torch.optim.SGD(groups, lr=1e-2)
    before = original.detach().clone()
    _loss(model, _x()).backward()
    optimizer.step()
    assert not torch.equal(original, before)


def _chain(frozen: str = "A") -> LinearStack:
    return _adapted(rankwise.RacLoraConfig(r=2, alpha=4, target_modules="all-linear", link_steps=1, frozen=frozen, seed=0))


def _train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    _loss(model, _x()).backward()
    optimizer.step()
    optimizer.zero_grad()
    rankwise.step(model, optimizer)


@pytest.mark.parametrize("factor", ["lora_b", "lora_a"], ids=["trained-B", "sketch-A"])
def test_a_raclora_chain_with_a_parametrized_factor_is_refused_naming_the_fix(factor: str) -> None:
    """RAC-LoRA (``frozen="A"``, a link per step) with layers.1's trained ``B`` or its sketch ``A`` parametrized: a
    link end would zero / resample the computed value, not the tensor behind it (the link counted twice, or the same
    sketch kept). Refused before any link ends, naming ``remove_parametrizations``; after that call (keeping the
    value) the chain trains and a link end keeps the outputs. Before: trained ``B`` was refused as "the optimizer does
    not hold adapter parameter layers.1.lora_b" (it did); the sketch was silently never resampled."""
    model = _chain()
    layer = model.layers[1]
    with torch.no_grad():
        layer.lora_b.normal_()  # a link with a product, so a link end has something to move
    parametrize.register_parametrization(layer, factor, Negate())
    optimizer = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=1e-2)
    sketch = layer.lora_a.detach().clone()  # the value the forward uses
    with pytest.raises((ValueError, TypeError), match=rf"{factor}.*remove_parametrizations"):
        _train_one_step(model, optimizer)
    with pytest.raises((ValueError, TypeError), match="remove_parametrizations"):
        end_link(model, optimizer)
    with pytest.raises((ValueError, TypeError), match="remove_parametrizations"):
        compress_chain(model, 2)
    assert int(layer.links) == 0 and layer.chain_a.shape[0] == 0
    parametrize.remove_parametrizations(layer, factor, leave_parametrized=True)
    assert torch.equal(layer.lora_a, sketch)  # the value the forward used, kept
    _loss(model, _x()).backward()  # the same optimizer: a trained factor stays the same object
    optimizer.step()
    with torch.no_grad():
        before = model(_x())
    rankwise.step(model, optimizer)  # a link end
    assert int(layer.links) == 1 and not torch.equal(layer.lora_a, sketch) and not torch.equal(layer.lora_a, -sketch)
    with torch.no_grad():
        assert torch.allclose(model(_x()), before, atol=1e-6)


def test_a_parametrization_on_edora_s_frozen_a_is_refused_at_the_forward() -> None:
    """EDoRA's norm terms (``W0 Aᵀ``, ``A Aᵀ``) are computed once from its frozen ``A``: with ``frozen_a`` parametrized
    the forward's norm was the stored ``A``'s while its update and ``merge`` used the parametrized one (outputs 0.18
    apart, silently). Refused at the forward, naming the tensor and ``remove_parametrizations``."""
    model = _adapted(rankwise.EdoraConfig(r=2, alpha=4, target_modules="all-linear", seed=0))
    layer = model.layers[1]
    parametrize.register_parametrization(layer, "frozen_a", Negate())
    with pytest.raises(TypeError, match=r"frozen_a.*remove_parametrizations"):
        model(_x())


def test_a_parametrization_on_edora_s_trained_core_is_honoured() -> None:
    """EDoRA's trained core ``R`` parametrized (the norm reads ``R`` at each call): the forward and the merged weight
    agree, the NaN check and LoRA+ see ``R``'s ``original`` (held: forward and merge agreed before too)."""
    model = _adapted(rankwise.EdoraConfig(r=2, alpha=4, target_modules="all-linear", seed=0))
    layer = model.layers[1]
    with torch.no_grad():
        layer.core.normal_()
    parametrize.register_parametrization(layer, "core", Negate())
    model.eval()
    with torch.no_grad():
        out = model(_x())
        rankwise.merge(model)
        assert torch.allclose(model(_x()), out, atol=1e-5)
        rankwise.unmerge(model)
    groups = rankwise.lora_plus_param_groups(model, lr=1e-2, ratio=4)
    assert [g["name"] for g in groups if any(p is _original(layer, "core") for p in g["params"])] == ["lora_plus_b"]


# ---------------------------------------------------------------------------- a user's parameters
def _leave(model: nn.Module, call: str) -> None:
    if call == "delete":
        rankwise.delete(model, "default")
    else:
        rankwise.detach(model, merge=call == "detach-merge")


@pytest.mark.parametrize("call", ["detach", "detach-merge", "delete"])
def test_a_parameter_registered_on_an_adapter_layer_while_attached_goes_to_the_module_put_back(call: str) -> None:
    """``model.layers[2].register_parameter("gain", p)`` while attached (trained), and a frozen one: after detach (or
    delete of its host's adapter) the module in the slot holds the same objects, ``requires_grad`` kept, and
    ``model.state_dict()`` keeps ``layers.2.gain``. Before, both were lost with the layer."""
    model = _adapted(CONFIGS["lora"], ("default", "b") if call == "delete" else ("default",))
    gain = nn.Parameter(torch.arange(6.0))
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    model.layers[2].register_parameter("gain", gain)
    model.layers[2].register_parameter("frozen", frozen)
    _leave(model, call)
    slot = model.layers[2]
    assert slot.gain is gain and slot.gain.requires_grad
    assert slot.frozen is frozen and not slot.frozen.requires_grad
    state = model.state_dict()
    assert torch.equal(state["layers.2.gain"], torch.arange(6.0)) and "layers.2.frozen" in state


@pytest.mark.parametrize("call", ["detach", "delete"])
def test_a_parameter_whose_name_the_base_module_holds_is_refused_before_anything_changes(call: str) -> None:
    """A parameter registered on layers.1 while attached under a name its base ``nn.Linear`` holds (its own
    ``gain``, from before attach) cannot go back with it: refused naming it, the slots and adapters as they were."""
    model = _adapted(CONFIGS["lora"], ("default", "b") if call == "delete" else ("default",))
    model.layers[1].base_layer().register_parameter("gain", nn.Parameter(torch.ones(6)))
    model.layers[1].register_parameter("gain", nn.Parameter(torch.zeros(6)))
    slots = {n: model.get_submodule(n) for n in SLOTS}
    state: dict[str, Any] = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'layers\.1'.*\['gain'\]"):
        _leave(model, call)
    assert all(model.get_submodule(n) is m for n, m in slots.items())
    assert rankwise.active_adapters(model) == (("default", "b") if call == "delete" else ("default",))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
