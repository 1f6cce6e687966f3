"""Review round 13 (2026-12-05), several adapters on one base (docs/reliability.md, "Review round 13"). Oracles: HF
PEFT's own outputs for the exported files, rankwise's outputs with one adapter active (unmerged), the base layer's own
forward counted by a hook."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rankwise
from conftest import ModelCase
from test_peft_import_compat import _distilbert, _distilbert_batch
from test_review11_several import PAIRS, _pair, _peft

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the widened pre_classifier's notice

ORDERS = {"lora+dora": (rankwise.LoraConfig, rankwise.DoraConfig), "dora+lora": (rankwise.DoraConfig, rankwise.LoraConfig)}


def _two_on_distilbert(first: type, second: type, heads: list[str] | None, b_targets: list[str]) -> tuple[nn.Module, nn.Module]:
    """(base, model): ``"default"`` (``first``, ``modules_to_save=heads``) on q_lin, v_lin and ``"b"`` (``second``) on
    ``b_targets``, every trained tensor moved off its init."""
    base = _distilbert()
    model = copy.deepcopy(base)
    rankwise.attach(model, first(r=4, alpha=8, target_modules=["q_lin", "v_lin"], modules_to_save=heads, seed=0))
    rankwise.attach(model, second(r=2, alpha=4, target_modules=b_targets, seed=1), name="b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return base, model.eval()


def _logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(**_distilbert_batch(seed)).logits


# ---------------------------------------------------------------------------- 1: PEFT's widened modules_to_save
@pytest.mark.parametrize("heads", [["classifier"], None], ids=["modules_to_save", "task-heads"])
@pytest.mark.parametrize("pair", list(ORDERS))
def test_one_adapters_export_while_merged_writes_the_base_values_of_the_modules_peft_wraps(tmp_path: Path, pair: str,
                                                                                        heads: list[str] | None) -> None:
    """DistilBERT's ``pre_classifier`` is wrapped by PEFT for ``modules_to_save=["classifier"]`` (its plain-suffix rule)
    and for the ``SEQ_CLS`` task's heads, so ``"default"``'s export writes its values. Adapter ``"b"`` adapts it: merged
    with both active, that module's weight holds b's update, and the export wrote it as ``"default"``'s, so PEFT served
    ``"default"`` with b's update inside (logits off by up to 4.4). The base weight is written now: PEFT's
    model computes what rankwise computes with ``"default"`` alone."""
    base, model = _two_on_distilbert(*ORDERS[pair], heads, ["pre_classifier"])
    rankwise.set_active(model, "default")
    alone = _logits(model)
    rankwise.set_active(model, ["default", "b"])
    rankwise.merge(model)
    rankwise.export_peft(model, tmp_path, name="default")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs), alone, rtol=1e-5, atol=1e-6)
    rankwise.unmerge(model)
    rankwise.export_peft(model, tmp_path / "unmerged", name="default")  # the same tensors, merged or not
    merged, unmerged = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path, tmp_path / "unmerged"))
    assert merged.keys() == unmerged.keys() and all(torch.equal(merged[k], unmerged[k]) for k in merged)


@pytest.mark.parametrize("pair", list(ORDERS))
def test_the_multi_adapter_export_whose_wrapped_module_another_adapter_adapts_is_refused(tmp_path: Path, pair: str) -> None:
    """PEFT loads ``"default"`` first and wraps ``pre_classifier`` (``modules_to_save=["classifier"]``), then cannot put
    ``"b"``'s layer on it (PEFT 0.21: ``ValueError: Target module ModulesToSaveWrapper ... is not supported``; 0.22:
    ``"No modules were targeted"``, read from PEFT below): the layout was written and failed only at PEFT's load. Now the export refuses, naming both, and writes
    nothing; each adapter exports alone (``name=``)."""
    base, model = _two_on_distilbert(*ORDERS[pair], ["classifier"], ["pre_classifier"])
    rankwise.export_peft(model, tmp_path / "default", name="default")
    rankwise.export_peft(model, tmp_path / "b", name="b")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "default")
    # PEFT 0.21 wraps pre_classifier by its suffix rule, then cannot put b's layer on the wrapper; PEFT 0.22's SEQ_CLS
    # task adds pre_classifier to b's heads too, which leaves b's one target out ("No modules were targeted")
    new = rankwise.peft_version.at_least(rankwise.peft_version.parse(peft.__version__))
    with pytest.raises(ValueError, match="No modules were targeted" if new else "ModulesToSaveWrapper"):
        theirs.load_adapter(tmp_path / "b", adapter_name="b")
    with pytest.raises(ValueError, match=r"'pre_classifier'.*adapter 'b'"):
        rankwise.export_peft(model, tmp_path / "both")
    assert not (tmp_path / "both").exists() or not any((tmp_path / "both").iterdir())


@pytest.mark.parametrize("pair", list(ORDERS))
def test_the_multi_adapter_export_with_a_widened_head_loads_in_peft_and_each_adapter_computes_its_own(
        tmp_path: Path, pair: str) -> None:
    """``"default"`` trains ``classifier`` (PEFT also wraps ``pre_classifier``), ``"b"`` adapts ``v_lin`` beside it: the
    layout loads in one PEFT model, and with either adapter active (merged or not) rankwise computes what PEFT does.
    (PEFT refuses two active adapters when one module is wrapped for ``modules_to_save``: "Only one adapter can be set
    at a time for ModulesToSaveWrapper", so the stacked order has no PEFT oracle here; tests/test_review11_several.py
    covers it without heads.)"""
    base, model = _two_on_distilbert(*ORDERS[pair], ["classifier"], ["v_lin"])
    rankwise.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.eval()
    for name in ("default", "b"):
        theirs.base_model.set_adapter(name)
        rankwise.set_active(model, name)
        torch.testing.assert_close(_logits(model), _logits(theirs), rtol=1e-5, atol=1e-6)
        rankwise.merge(model)
        torch.testing.assert_close(_logits(model), _logits(theirs), rtol=1e-5, atol=1e-6)
        rankwise.unmerge(model)


# ---------------------------------------------------------------------------- 2: the active adapters, public
def test_active_adapters_is_the_order_set_active_got_and_what_the_model_computes(mlp_case: ModelCase, tmp_path: Path) -> None:
    """``rankwise.active_adapters`` reads what ``set_active`` / ``attach`` / ``merge(name)`` / ``delete`` / ``load`` left
    (users reached into ``rankwise.state.adapter_set(model).active`` for it): a tuple, so changing it changes nothing,
    and giving it back to ``set_active`` computes the same outputs (the order matters: "b" is DoRA)."""
    model = mlp_case.make()
    with pytest.raises(ValueError, match="no rankwise adapters"):
        rankwise.active_adapters(model)
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], seed=0))
    assert rankwise.active_adapters(model) == ("default",)
    rankwise.attach(model, rankwise.DoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=1), name="b")
    assert rankwise.active_adapters(model) == ("default", "b")  # attach puts the new one last
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    batch = mlp_case.batch(0)
    outputs = {}
    for order in (["b", "default"], ["default", "b"], ["b"]):
        rankwise.set_active(model, order)
        assert rankwise.active_adapters(model) == tuple(order)
        with torch.no_grad():
            outputs[tuple(order)] = mlp_case.output(model, batch)
    assert not torch.equal(outputs[("b", "default")], outputs[("default", "b")])
    for order, out in outputs.items():  # read back, then given back after another set: the same outputs
        rankwise.set_active(model, list(order))
        got = rankwise.active_adapters(model)
        rankwise.set_active(model, "default")
        rankwise.set_active(model, list(got))
        with torch.no_grad():
            assert torch.equal(mlp_case.output(model, batch), out)
    rankwise.set_active(model, ["b", "default"])
    with rankwise.disabled(model):  # what computes once the block ends
        assert rankwise.active_adapters(model) == ("b", "default")
    rankwise.save(model, tmp_path / "both")
    again = rankwise.load(mlp_case.make(), tmp_path / "both")
    rankwise.load(again, tmp_path / "both/b", name="b")
    assert rankwise.active_adapters(again) == ("b", "default")  # the saved order, restored
    rankwise.merge(model, "b")
    assert rankwise.active_adapters(model) == ("b",)
    rankwise.unmerge(model)
    rankwise.delete(model, "b")
    assert rankwise.active_adapters(model) == ("default",)
    assert rankwise.active_adapters(torch.compile(model)) == ("default",)  # a wrapper is seen through


# ---------------------------------------------------------------------------- 3: one base matmul per module
class _BaseMatmuls(TorchDispatchMode):
    """Counts the matrix products that read ``w0``'s storage (``x W0ᵀ`` in any form: ``F.linear``'s ``addmm``, the
    fused node's ``mm``, a ``Conv1D``'s ``addmm``); the row norms read ``W0`` through a rescaled copy, not counted."""

    def __init__(self, w0: torch.Tensor) -> None:
        super().__init__()
        self.ptr, self.count = w0.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket in _MATMULS and any(
                isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.ptr for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


_MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}


def _count_base_matmuls(model: nn.Module, case: ModelCase, seed: int = 0) -> tuple[int, torch.Tensor]:
    w0 = rankwise.adapter_layers(model, "default")["fc2"].weight
    with _BaseMatmuls(w0) as counter:
        out = case.output(model, case.batch(seed))
    return counter.count, out


@pytest.mark.parametrize("pair", list(PAIRS))
def test_several_active_adapters_run_the_base_matmul_once_as_hf_peft(mlp_case: ModelCase, tmp_path: Path, pair: str) -> None:
    """With several adapters active on ``fc2`` a DoRA-family layer computed its own forward and the base's, three
    ``x W0ᵀ`` where PEFT runs one (its DoRA works from ``base_result = result``). Now one per forward, eval and
    training (the fused path's conditions hold), in either order; the outputs stay PEFT's (the oracle). With dropout,
    in training, PEFT's DoRA takes one more, ``x_d W0ᵀ``, per DoRA-family layer, and so does rankwise."""
    base, model = _pair(mlp_case, *PAIRS[pair])
    theirs = _peft(base, model, tmp_path / "peft")
    for order in (["default", "b"], ["b", "default"]):
        rankwise.set_active(model, order)
        theirs.base_model.set_adapter(order)
        with torch.no_grad():
            expected = mlp_case.output(theirs, mlp_case.batch(0))
        for training in (False, True):
            model.train(training)
            with torch.set_grad_enabled(training):
                count, out = _count_base_matmuls(model, mlp_case)
            assert count == 1, (order, training)
            torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)
    with_dropout = _with_dropout(model, 0.25).train()
    dora_layers = sum(layer.row_scale() is not None for layer in rankwise.state.slot_layers(model)["fc2"].stack())
    assert _count_base_matmuls(with_dropout, mlp_case)[0] == 1 + dora_layers


def _with_dropout(model: nn.Module, p: float) -> nn.Module:
    """``model``'s adapters with dropout ``p``, in their layers and their configs (what the export writes as PEFT's
    ``lora_dropout``), as if attached with ``dropout=p``."""
    for name in rankwise.active_adapters(model):
        state = rankwise.state.get_state(model, name)
        state.config = dataclasses.replace(state.config, dropout=p)
        for layer in rankwise.adapter_layers(model, name).values():
            layer.dropout = nn.Dropout(p)
    return model


@pytest.mark.parametrize("pair", list(PAIRS))
def test_several_active_adapters_with_dropout_train_as_hf_peft(mlp_case: ModelCase, tmp_path: Path, pair: str) -> None:
    """A training forward with ``lora_dropout > 0``: PEFT's DoRA then takes its base path from the dropped-out input
    (no ``base_result``), its LoRA adds its update of the dropped-out input; the same masks (drawn in the same order from
    the same seed) give PEFT's loss and gradients, in either order."""
    base, model = _pair(mlp_case, *PAIRS[pair])
    _with_dropout(model, 0.25)
    rankwise.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    theirs.load_adapter(tmp_path / "peft/b", adapter_name="b", is_trainable=True)
    assert theirs.base_model.model.fc2.lora_dropout["b"].p == 0.25
    batch = mlp_case.batch(1)
    for order in (["default", "b"], ["b", "default"]):
        rankwise.set_active(model, order)
        theirs.base_model.set_adapter(order)
        model.train(), theirs.train()
        model.zero_grad(), theirs.zero_grad()
        torch.manual_seed(5)
        ours = model(**batch).loss
        torch.manual_seed(5)
        peft_loss = theirs(**batch).loss
        torch.testing.assert_close(ours, peft_loss, rtol=1e-6, atol=1e-7)
        ours.backward()
        peft_loss.backward()
        compared = 0
        for name in order:
            layer, peft_layer = rankwise.adapter_layers(model, name)["fc2"], theirs.base_model.model.fc2
            want = {"lora_b": peft_layer.lora_B[name].weight}
            if name in peft_layer.lora_magnitude_vector:
                want["magnitude"] = peft_layer.lora_magnitude_vector[name].weight
            for attr, theirs_t in want.items():
                if attr in layer.trainable:  # EDoRA trains a core R, not B
                    torch.testing.assert_close(getattr(layer, attr).grad, theirs_t.grad, rtol=1e-4, atol=1e-6)
                    compared += 1
        assert compared >= 2
