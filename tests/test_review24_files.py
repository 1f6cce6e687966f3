"""Review round 24: what round 23 left open. A tensor a user registered on an adapter layer while attached went into
``rankwise.save``'s file, which ``load`` then refused ("holds tensors this method does not use"); a parametrization on
an adapter's own factor put ``parametrizations.<factor>.original`` into the file, which ``load`` refused too ("lacks
tensor"); ``set_active`` replaced the ``modules_to_save`` slots one by one (an error partway left the active set
inconsistent) and ``disabled()``'s exit did too (an error there lost a trained copy)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Negate
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize

import rankwise
import rankwise.slots

SLOTS = [f"layers.{i}" for i in range(3)]
HEADS = ["h1", "h2", "h3"]


class Stack(nn.Module):
    """Three ``Linear(4, 4)`` in a row, then three heads (``modules_to_save``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.h1, self.h2, self.h3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.h3(torch.tanh(self.h2(torch.tanh(self.h1(x)))))


def _x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


def _base() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()


def _moved(model: nn.Module) -> None:
    """Every trainable tensor moved off its initial value (a zero LoRA B would hide a wrong factor)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _adapted(method: str = "lora", second: bool = False, heads: bool = False) -> Stack:
    """LoRA (or DoRA) on every layer; ``second``: a LoRA ``b`` beside it; ``heads``: the first trains the heads."""
    model = _base()
    config = rankwise.DoraConfig if method == "dora" else rankwise.LoraConfig
    rankwise.attach(model, config(r=2, target_modules=SLOTS, modules_to_save=HEADS if heads else []))
    if second:
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=SLOTS, seed=1), name="b")
    _moved(model)
    return model


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_x())


def _keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "adapter.safetensors"), framework="pt") as f:
        return sorted(f.keys())


def _warned(call: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught]


# ---------------------------------------------------------------------------- 1. a user's tensor on an adapter layer
@pytest.mark.parametrize("case", ["buffer", "parameter", "buffer-on-a-peer"])
def test_a_tensor_registered_on_an_adapter_layer_while_attached_is_left_out_of_the_file_which_loads(
        case: str, tmp_path: Path) -> None:
    """A buffer (or parameter) a user registered on an adapter layer while attached: ``save`` and ``export_peft`` leave
    it out, naming it in a warning; the file loads on a fresh base and computes what the model computes. Before, save
    wrote ``layers.1.mask`` into the file and ``load`` refused it ("holds tensors this method does not use"): the
    adapter saved could not be loaded."""
    model = _adapted(second=case == "buffer-on-a-peer")
    layer = model.layers[1].peers["b"] if case == "buffer-on-a-peer" else model.layers[1]
    if case == "parameter":
        layer.register_parameter("mask", nn.Parameter(torch.ones(4)))
    else:
        layer.register_buffer("mask", torch.ones(4))
    if case == "buffer-on-a-peer":
        rankwise.set_active(model, ["default", "b"])
    out = _out(model)
    messages = _warned(lambda: rankwise.save(model, tmp_path / "a"))
    folder = tmp_path / "a" / "b" if case == "buffer-on-a-peer" else tmp_path / "a"
    fresh = rankwise.load(_base(), tmp_path / "a")
    if case == "buffer-on-a-peer":
        rankwise.load(fresh, folder, name="b")
        assert rankwise.active_adapters(fresh) == ("default", "b")
    torch.testing.assert_close(_out(fresh), out, rtol=0, atol=0)
    assert "layers.1.mask" not in _keys(folder)
    assert "layers.1.lora_a" in _keys(folder)
    assert any("'layers.1.mask'" in m and "leaves out" in m for m in messages), messages
    assert any("'layers.1.mask'" in m for m in _warned(lambda: rankwise.export_peft(model, tmp_path / "p")))
    assert "layers.1.mask" in model.state_dict() or "layers.1.peers.b.mask" in model.state_dict()  # the user's, kept


# ---------------------------------------------------------------------------- 3. a parametrization on a factor
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_parametrization_on_an_adapter_s_factor_is_saved_as_the_value_the_forward_uses(method: str,
                                                                                         tmp_path: Path) -> None:
    """``register_parametrization(layer, "lora_b", Negate())`` after attach: the forward uses ``-lora_b``. ``save``
    writes that value under ``lora_b`` (warning that the parametrization itself is not written), so ``load`` on a fresh
    base computes the model's outputs, as ``export_peft`` → ``import_peft`` does. Before, the file held
    ``layers.1.parametrizations.lora_b.original`` and ``load`` refused it ("lacks tensor 'layers.1.lora_b'")."""
    model = _adapted(method)
    plain = _out(model)
    parametrize.register_parametrization(model.layers[1], "lora_b", Negate())
    out = _out(model)
    assert (out - plain).abs().max() > 1e-2  # the forward uses the parametrized factor
    messages = _warned(lambda: rankwise.save(model, tmp_path / "a"))
    fresh = rankwise.load(_base(), tmp_path / "a")
    torch.testing.assert_close(_out(fresh), out, rtol=0, atol=1e-6)
    assert not any("parametrizations" in k for k in _keys(tmp_path / "a"))
    assert any("'layers.1.lora_b'" in m and "parametrizations" in m for m in messages), messages
    rankwise.export_peft(model, tmp_path / "p")
    torch.testing.assert_close(_out(rankwise.import_peft(_base(), tmp_path / "p")), out, rtol=0, atol=1e-6)


def test_a_parametrization_on_an_adapter_layer_s_weight_is_refused_at_save(tmp_path: Path) -> None:
    """A parametrization on the adapter layer's ``weight`` (round 23 refuses it at the forward, merge, detach, delete):
    ``save`` refuses it too, naming ``remove_parametrizations``, and writes nothing. Before, save wrote
    ``parametrizations.weight.original`` and a fingerprint of ``-W0``, a file ``load`` refused."""
    model = _adapted()
    parametrize.register_parametrization(model.layers[1], "weight", Negate())
    with pytest.raises(TypeError, match="remove_parametrizations"):
        rankwise.save(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------- 2. set_active and disabled, all or nothing
class _Interrupted(BaseException):
    pass


def _fail_at(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """The slot's hook swap raises at its ``n``-th call from now."""
    real, seen = rankwise.slots.swap_hooks, [0]

    def fails(leaving: nn.Module, arriving: nn.Module) -> None:
        seen[0] += 1
        if seen[0] == n:
            raise _Interrupted(f"replacement {n}")
        real(leaving, arriving)

    monkeypatch.setattr(rankwise.slots, "swap_hooks", fails)


def _picture(model: Stack) -> Any:
    """What a failed switch must leave as it was: the heads in the slots, each adapter's set-aside heads, each layer's
    active flag and the active set."""
    adapters = model._rankwise  # type: ignore[attr-defined]
    return ([id(getattr(model, h)) for h in HEADS],
            {n: {k: id(v) for k, v in s.idle_modules.items()} for n, s in adapters.adapters.items()},
            [[layer.active for layer in m.stack()] for m in model.layers], rankwise.active_adapters(model))


@pytest.mark.parametrize("switch", [["b"], ["default"]])
def test_set_active_interrupted_at_the_second_head_leaves_the_model_as_it_was(switch: list[str],
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``set_active`` swapping three trained heads (to the originals, or back): an interrupt at the 2nd replacement
    leaves every slot, set-aside copy, layer flag and the active set as before, and the outputs bit for bit; the
    call then succeeds. Before, the layers' flags said ``b`` while the set said ``default``, ``h1`` was the original
    and ``h2`` / ``h3`` the trained copies though all three were recorded as set aside (outputs 5.1 off)."""
    model = _adapted(second=True, heads=True)
    rankwise.set_active(model, ["b"] if switch == ["default"] else ["default"])
    before, out = _picture(model), _out(model)
    _fail_at(monkeypatch, 2)
    with pytest.raises(_Interrupted):
        rankwise.set_active(model, switch)
    assert _picture(model) == before
    torch.testing.assert_close(_out(model), out, rtol=0, atol=0)
    monkeypatch.undo()
    rankwise.set_active(model, switch)
    assert rankwise.active_adapters(model) == tuple(switch)
    assert (model.h1 is model._rankwise.adapters["default"].original_modules["h1"]) == (switch == ["b"])  # type: ignore[attr-defined]


def test_disabled_interrupted_on_entry_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt at the 2nd head's replacement as ``disabled()`` enters: the trained heads in their slots, nothing
    set aside, the layers enabled (merge is not refused as "inside disabled"), the outputs bit for bit."""
    model = _adapted(heads=True)
    before, out = _picture(model), _out(model)
    _fail_at(monkeypatch, 2)
    with pytest.raises(_Interrupted):
        with rankwise.disabled(model):
            pass
    monkeypatch.undo()
    assert _picture(model) == before
    torch.testing.assert_close(_out(model), out, rtol=0, atol=0)
    rankwise.merge(model)


def test_disabled_interrupted_on_exit_keeps_every_trained_head(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An interrupt at the 2nd head's replacement as ``disabled()`` exits: every trained copy is kept (set aside, where
    ``save`` finds it: its file loads to the adapted outputs), the layers are enabled again, and ``set_active`` with
    the active set puts the copies back (the outputs before, bit for bit). Before, ``h2``'s trained copy was dropped
    (in no slot and not set aside: lost) and every layer stayed disabled (merge, save refused for good)."""
    model = _adapted(heads=True)
    copies, out = [getattr(model, h) for h in HEADS], _out(model)
    with pytest.raises(_Interrupted):
        with rankwise.disabled(model):
            _fail_at(monkeypatch, 2)
    monkeypatch.undo()
    kept = model._rankwise.adapters["default"].idle_modules  # type: ignore[attr-defined]
    assert all(kept.get(h, getattr(model, h)) is c for h, c in zip(HEADS, copies))
    assert not any(m.disabled for m in model.layers)
    rankwise.save(model, tmp_path / "a")
    torch.testing.assert_close(_out(rankwise.load(_base(), tmp_path / "a")), out, rtol=0, atol=0)
    rankwise.set_active(model, list(rankwise.active_adapters(model)))
    assert [getattr(model, h) for h in HEADS] == copies and not kept
    torch.testing.assert_close(_out(model), out, rtol=0, atol=0)


def test_disabled_puts_everything_back_when_the_block_raises() -> None:
    """An error inside the block: the trained heads back in their slots, nothing set aside, the adapted outputs."""
    model = _adapted(second=True, heads=True)
    before, out = _picture(model), _out(model)
    with pytest.raises(KeyError):
        with rankwise.disabled(model):
            assert model.h1 is model._rankwise.adapters["default"].original_modules["h1"]  # type: ignore[attr-defined]
            raise KeyError("in the block")
    assert _picture(model) == before
    torch.testing.assert_close(_out(model), out, rtol=0, atol=0)


# ---------------------------------------------------------------------------- 4. several adapters in one folder
@pytest.mark.parametrize("call", ["save", "export_peft"])
def test_adapters_whose_names_differ_only_in_case_are_not_written_into_one_folder(call: str, tmp_path: Path) -> None:
    """Adapters ``B`` and ``b`` saved together go to ``path/B`` and ``path/b``: one folder on a case-insensitive file
    system (macOS, Windows), where one adapter's files replaced the other's. Refused now, nothing written; each
    saves alone with ``name=``. Before, written (on Linux two folders; copied to such a system, one adapter lost)."""
    model = _base()
    for name in ("B", "b"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=SLOTS), name=name)
    write = getattr(rankwise, call)
    with pytest.raises(ValueError, match="differ only in case"):
        write(model, tmp_path / "both")
    assert not (tmp_path / "both").exists()
    for name in ("B", "b"):
        write(model, tmp_path / f"alone-{name.encode().hex()}", name=name)


def test_loading_a_save_of_several_adapters_without_a_default_names_the_subfolders(tmp_path: Path) -> None:
    """``save(model)`` of adapters ``a`` and ``b`` writes ``path/a`` and ``path/b`` only; ``load(base, path)`` said
    "adapter.safetensors does not exist" and nothing of where the adapters are. Now it names the subfolders and the
    call that loads one (which then gives the adapter's outputs)."""
    model = _base()
    for name in ("a", "b"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=SLOTS, seed=len(name)), name=name)
    _moved(model)
    rankwise.set_active(model, ["a"])
    rankwise.save(model, tmp_path / "both")
    with pytest.raises(rankwise.AdapterFileError, match=r"subfolders \['a', 'b'\].*name='a'"):
        rankwise.load(_base(), tmp_path / "both")
    torch.testing.assert_close(_out(rankwise.load(_base(), tmp_path / "both" / "a", name="a")), _out(model), rtol=0, atol=0)
