"""Review round 23: detach and delete, all or nothing; what a user put on an adapted module comes back. A parametrization
registered on an adapter layer's weight after attach made ``detach`` stop partway (a half-detached model); an error
while replacing the slots did the same; a buffer registered on an adapter layer while attached was lost at detach, and
its state-dict hooks, and a target's, silently; a handle of a hook on a submodule of a ``modules_to_save`` module did
not remove it from the trained copy."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import LinearStack, Negate, TinyMLP
from torch import nn
from torch.nn.utils import parametrize

import rankwise
import rankwise.slots

SLOTS = [f"layers.{i}" for i in range(6)]


def _x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


def _adapted(names: tuple[str, ...] = ("default",)) -> LinearStack:
    """A seeded :class:`conftest.LinearStack` (6 x Linear(4, 4)), LoRA on every layer for each adapter name, the updates moved off zero."""
    torch.manual_seed(0)
    model = LinearStack(6, 4)
    for i, name in enumerate(names):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=SLOTS, seed=i), name=name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    if len(names) > 1:
        rankwise.set_active(model, list(names))
    return model.eval()


def _counting_hooks(model: LinearStack) -> list[int]:
    """A forward pre-hook on each slot counting its calls (registered on what stands there now)."""
    calls = [0] * len(SLOTS)
    for i, slot in enumerate(SLOTS):
        def hook(_module: nn.Module, _args: Any, i: int = i) -> None:
            calls[i] += 1
        model.get_submodule(slot).register_forward_pre_hook(hook)
    return calls


def _picture(model: LinearStack) -> tuple[list[int], list[list[str]], list[bool], dict[str, torch.Tensor], Any]:
    """What a failed detach / delete must leave unchanged: the module objects in the slots, each slot's adapters in
    order, merge flags, every tensor of the state_dict and the adapter set."""
    slots = [model.get_submodule(s) for s in SLOTS]
    stacks = [[layer.adapter_name for layer in m.stack()] if isinstance(m, rankwise.AdapterLayer) else [] for m in slots]
    merged = [bool(getattr(m, "merged", False)) for m in slots]
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = getattr(model, "_rankwise", None)
    return [id(m) for m in slots], stacks, merged, tensors, adapters and (list(adapters.adapters), list(adapters.active))


def _assert_unchanged(model: LinearStack, before: Any, out_before: torch.Tensor) -> None:
    ids, stacks, merged, tensors, adapters = _picture(model)
    assert (ids, stacks, merged, adapters) == (before[0], before[1], before[2], before[4])
    assert tensors.keys() == before[3].keys()
    for k, v in tensors.items():
        assert torch.equal(v, before[3][k]), k
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), out_before, rtol=0, atol=0)


@pytest.mark.parametrize("call", ["detach", "detach-merge", "delete", "merge"])
def test_a_parametrization_on_an_adapter_layer_s_weight_is_refused_before_anything_changes(call: str) -> None:
    """A parametrization registered on layers.3's weight after attach: the forward, ``merge``, ``detach`` (also with
    merge) and ``delete`` are refused naming it, the model unchanged; once it is taken off keeping the stored W0,
    detach gives back the base model. Before, the adapted forward computed with ``-W0`` while ``disabled()`` and the
    module put back used ``W0``, and detach raised torch's "cannot assign" at layers.3 with layers 0-2 detached."""
    model = _adapted(("default", "b") if call == "delete" else ("default",))
    with torch.no_grad(), rankwise.disabled(model):
        base_out = model(_x())
    with torch.no_grad():
        out = model(_x())
    layer = model.layers[3]
    before = _picture(model)
    parametrize.register_parametrization(layer, "weight", Negate())
    with pytest.raises(TypeError, match=r"'weight': \['Negate'\].*remove_parametrizations"):
        model(_x())
    with pytest.raises(TypeError, match="parametrizations"):
        if call == "delete":
            rankwise.delete(model, "default")
        elif call == "merge":
            rankwise.merge(model)
        else:
            rankwise.detach(model, merge=call == "detach-merge")
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    _assert_unchanged(model, before, out)
    rankwise.detach(model)
    assert all(type(m) is nn.Linear for m in model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), base_out, rtol=0, atol=0)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("case", ["detach", "detach-merge", "detach-of-a-merged-model", "delete"])
def test_an_error_at_the_third_of_six_slot_replacements_leaves_the_model_as_it_was(case: str,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The slot's hook swap raises at the 3rd replacement of detach / delete: every slot holds its adapter layer (or
    host, its peers in order) again, merged as before, the state kept, each slot's hook running once per call; the
    same call then succeeds. Before, layers 0-1 were detached and the rest (with the state) kept."""
    model = _adapted(("default", "b") if case == "delete" else ("default",))
    if case == "detach-of-a-merged-model":
        rankwise.merge(model)
    calls = _counting_hooks(model)
    with torch.no_grad():
        out = model(_x())
    assert calls == [1] * 6
    before = _picture(model)
    real, seen = rankwise.slots.swap_hooks, [0]

    def third_fails(leaving: nn.Module, arriving: nn.Module) -> None:
        seen[0] += 1
        if seen[0] == 3:
            raise _Interrupted("the 3rd replacement")
        real(leaving, arriving)

    monkeypatch.setattr(rankwise.slots, "swap_hooks", third_fails)
    with pytest.raises(_Interrupted):
        if case == "delete":
            rankwise.delete(model, "default")
        else:
            rankwise.detach(model, merge=case == "detach-merge")
    monkeypatch.setattr(rankwise.slots, "swap_hooks", real)
    _assert_unchanged(model, before, out)
    assert calls == [2] * 6  # each hook ran once in that forward: on the module in its slot
    if case == "delete":
        rankwise.delete(model, "default")
        assert [m.adapter_name for m in model.layers] == ["b"] * 6  # type: ignore[union-attr]
    else:
        rankwise.detach(model, merge=case == "detach-merge")
        assert all(type(m) is nn.Linear for m in model.layers)
    with torch.no_grad():
        model(_x())
    assert calls == [3] * 6


@pytest.mark.parametrize("call", ["detach", "detach-merge", "delete"])
def test_a_buffer_registered_on_an_adapter_layer_while_attached_goes_to_the_module_put_back(call: str) -> None:
    """``model.layers[2].register_buffer("mask", m)`` while attached (persistent) and a non-persistent one: after
    detach (or delete of its host's adapter) the module in the slot holds both, ``model.state_dict()`` keeps the key
    ``layers.2.mask`` with its value and leaves the non-persistent one out. Before, both were lost with the layer."""
    model = _adapted(("default", "b") if call == "delete" else ("default",))
    mask = torch.arange(4.0)
    model.layers[2].register_buffer("mask", mask)
    model.layers[2].register_buffer("scratch", torch.ones(2), persistent=False)
    if call == "delete":
        rankwise.delete(model, "default")
    else:
        rankwise.detach(model, merge=call == "detach-merge")
    slot = model.layers[2]
    assert slot.mask is mask and torch.equal(slot.scratch, torch.ones(2))
    state = model.state_dict()
    assert torch.equal(state["layers.2.mask"], torch.arange(4.0)) and "layers.2.scratch" not in state


def test_a_buffer_whose_name_the_base_module_holds_is_refused_before_anything_changes() -> None:
    """A buffer registered on layers.4 while attached under a name its base ``nn.Linear`` holds (its own ``mask``,
    from before attach) cannot go back with it: detach is refused naming it, the model unchanged."""
    model = _adapted()
    model.layers[4].base_layer().register_buffer("mask", torch.ones(4))
    with torch.no_grad():
        out = model(_x())
    model.layers[4].register_buffer("mask", torch.zeros(4))
    before = _picture(model)
    with pytest.raises(ValueError, match=r"'layers.4'.*\['mask'\]"):
        rankwise.detach(model)
    _assert_unchanged(model, before, out)


def test_a_state_dict_hook_registered_on_an_adapter_layer_while_attached_is_named_at_detach() -> None:
    """A state-dict post-hook and a load pre-hook on layers.1 while attached go with the layer at detach: the
    warning names the slot and both kinds (before: nothing said). The layer's own load hook is not named."""
    model = _adapted()
    model.layers[1].register_state_dict_post_hook(lambda *a: None)
    model.layers[1].register_load_state_dict_pre_hook(lambda *a: None)
    with pytest.warns(UserWarning, match=r"state_dict_hooks, load_state_dict_pre_hooks registered on adapter layer "
                                         r"'layers.1'") as caught:
        rankwise.detach(model)
    assert len([w for w in caught if "registered on adapter layer" in str(w.message)]) == 1


def test_a_plain_detach_warns_about_nothing() -> None:
    """The warnings above come from what a user added: a detach (and an attach) of a plain model says nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _adapted()
        rankwise.detach(model)


def test_state_dict_hooks_and_buffers_on_a_target_are_named_at_attach() -> None:
    """A target with a state-dict post-hook, a load pre-hook and a buffer: attach warns (and the report says) that
    they stay on the module while attached, naming the target and each kind; before, they stopped silently (the hook
    not run by ``model.state_dict()``, the buffer's key gone). They are back after detach."""
    torch.manual_seed(0)
    model = TinyMLP()
    seen: list[str] = []
    model.fc1.register_state_dict_post_hook(lambda *a: seen.append("post"))
    model.fc1.register_load_state_dict_pre_hook(lambda *a: seen.append("load"))
    model.fc1.register_buffer("mask", torch.ones(3))
    with pytest.warns(UserWarning, match=r"'fc1' has state_dict_hooks, load_state_dict_pre_hooks, buffers \['mask'\]"):
        report = rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    assert sum("'fc1' has" in note for note in report.notes) == 1 and not any("'fc2'" in n for n in report.notes)
    rankwise.detach(model)
    state = model.state_dict()
    assert seen == ["post"] and "fc1.mask" in state


def test_a_handle_of_a_hook_on_a_submodule_of_a_module_to_save_removes_it_from_the_trained_copy() -> None:
    """``modules_to_save=["head"]`` where ``head`` is a ``Sequential``: a hook registered on ``head[0]`` before attach
    runs once per call on the trained copy; its handle, removed while attached, takes it off (before: it removed the
    original's copy of the table and the hook kept running); one registered on the trained copy's submodule while
    attached runs on the original too inside ``disabled()``, and is still there after ``detach``."""
    torch.manual_seed(0)
    model = TinyMLP()
    model.head = nn.Sequential(nn.Linear(16, 3))
    x = torch.randn(2, 12)
    calls = {"before": 0, "during": 0}
    handle = model.head[0].register_forward_hook(lambda *a: calls.__setitem__("before", calls["before"] + 1))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"]))
    model(x)
    assert calls["before"] == 1
    handle.remove()
    model(x)
    assert calls["before"] == 1
    model.head[0].register_forward_hook(lambda *a: calls.__setitem__("during", calls["during"] + 1))
    model(x)
    with rankwise.disabled(model):
        model(x)
    assert calls["during"] == 2
    rankwise.detach(model)
    model(x)
    assert calls == {"before": 1, "during": 3}
