"""Review round 13 (2026-12-05), several adapters on one base (docs/reliability.md, "Review round 13"). Oracles: HF
PEFT's own outputs for the exported files, rankwise's outputs with one adapter active (unmerged), the base layer's own
forward counted by a hook."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import rankwise
from conftest import ModelCase
from test_peft_import_compat import _distilbert, _distilbert_batch

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
    ``"b"``'s layer on it (``ValueError: Target module ModulesToSaveWrapper ... is not supported``, read from PEFT
    below): the layout was written and failed only at PEFT's load. Now the export refuses, naming both, and writes
    nothing; each adapter exports alone (``name=``)."""
    base, model = _two_on_distilbert(*ORDERS[pair], ["classifier"], ["pre_classifier"])
    rankwise.export_peft(model, tmp_path / "default", name="default")
    rankwise.export_peft(model, tmp_path / "b", name="b")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "default")
    with pytest.raises(ValueError, match="ModulesToSaveWrapper"):
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
