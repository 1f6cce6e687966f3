"""Adversarial review, round 4 (2026-12-04): the library's silently wrong results and data loss.

Each test is one defect class, first shown to fail, and a row in docs/reliability.md ("Adversarial
review, round 4"). References are HF PEFT's own outputs or the trained model's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise
from conftest import ModelCase


# ---------------------------------------------------------------------------- save / export inside disabled
@pytest.mark.parametrize("writer", ["save", "export_peft"])
def test_writing_an_adapter_inside_disabled_is_refused_and_writes_nothing(writer: str, mlp_case: ModelCase,
                                                                          tmp_path: Path) -> None:
    """Inside ``rankwise.disabled`` the model holds the original fully-trained modules (the trained copies are
    aside), so a save or export there wrote the untrained head as the trained one: refused, nothing written;
    after the block the file reproduces the trained model."""
    model = mlp_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=mlp_case.targets,
                                               modules_to_save=[mlp_case.head]))
    with torch.no_grad():  # "trained": the adapter and the fully-trained head moved
        model.head.weight.add_(1.0)
        for layer in rankwise.adapter_layers(model).values():
            layer.lora_b.normal_()
    batch = mlp_case.batch(0)
    trained = mlp_case.output(model, batch)
    write = getattr(rankwise, writer)
    with rankwise.disabled(model):
        with pytest.raises(RuntimeError, match="inside `with rankwise.disabled"):
            write(model, tmp_path / "inside")
    assert not (tmp_path / "inside").exists()
    write(model, tmp_path / "after")
    fresh = mlp_case.make()
    if writer == "save":
        rankwise.load(fresh, tmp_path / "after")
    else:
        from peft import PeftModel

        fresh = PeftModel.from_pretrained(fresh, tmp_path / "after")
    torch.testing.assert_close(mlp_case.output(fresh, batch), trained, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- PEFT pattern keys
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _Nested(nn.Module):
    """A top-level ``fc`` whose name is a dotted suffix of ``block.fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.block = _Block()
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.block(torch.tanh(self.fc(x)))))


def _nested() -> nn.Module:
    torch.manual_seed(0)
    return _Nested()


@pytest.mark.parametrize("patterns", [
    {"alpha_pattern": {"^fc": 16}},
    {"rank_pattern": {"^fc": 4}, "alpha_pattern": {"^fc": 16}},
])
def test_exported_pattern_keys_reach_one_layer_each(patterns: dict, tmp_path: Path) -> None:
    """A layer with its own alpha (or rank) whose name is a dotted suffix of another layer's (``fc`` beside
    ``block.fc``): the export wrote the key ``fc``, which PEFT's rule ``(.*\\.)?(fc)$`` also matches to
    ``block.fc``, so PEFT loaded ``block.fc`` at ``fc``'s scale (outputs off by ~9 on this toy) or refused its
    rank. PEFT's adapter imported and exported again loads in PEFT with PEFT's own outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model

    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    theirs = get_peft_model(_nested(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc", "out"],
                                                  init_lora_weights=False, **patterns))
    theirs.save_pretrained(tmp_path / "peft")
    want = theirs(x)
    ours = rankwise.import_peft(_nested(), tmp_path / "peft")
    torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)
    rankwise.export_peft(ours, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = PeftModel.from_pretrained(_nested(), tmp_path / "again")
    torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-6)
    back = rankwise.import_peft(_nested(), tmp_path / "again")  # and our import reads the anchored keys as PEFT does
    torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- an idle adapter's fully-trained modules
def test_an_idle_adapter_contributes_nothing_not_even_its_fully_trained_modules(mlp_case: ModelCase,
                                                                                 tmp_path: Path) -> None:
    """``set_active("b")`` beside a first adapter that trains the head fully: the idle adapter's trained head kept
    computing (outputs off by 2.2 from PEFT's ``set_adapter("b")``, from ``b`` alone on the base and from the
    model with the first adapter deleted). Now its head is set aside while idle, as PEFT does; save and export
    still write the trained head; reactivating gives the trained model back bit for bit."""
    from peft import PeftModel

    model = mlp_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc1"], modules_to_save=[mlp_case.head]))
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc2"]), name="b")
    with torch.no_grad():
        model.head.weight.add_(1.0)
        for name in ("default", "b"):
            for layer in rankwise.adapter_layers(model, name).values():
                layer.lora_b.normal_(std=0.3)
    batch = mlp_case.batch(0)
    both = mlp_case.output(model, batch)
    rankwise.export_peft(model, tmp_path / "peft")
    rankwise.set_active(model, "default")
    default_only = mlp_case.output(model, batch)

    rankwise.set_active(model, "b")
    b_only = mlp_case.output(model, batch)
    theirs = PeftModel.from_pretrained(mlp_case.make(), tmp_path / "peft")
    theirs.load_adapter(tmp_path / "peft" / "b", adapter_name="b")
    theirs.base_model.set_adapter("b")
    torch.testing.assert_close(b_only, mlp_case.output(theirs, batch), rtol=1e-5, atol=1e-6)
    rankwise.save(model, tmp_path / "b", name="b")
    alone = rankwise.load(mlp_case.make(), tmp_path / "b")
    torch.testing.assert_close(b_only, mlp_case.output(alone, batch), rtol=1e-5, atol=1e-6)

    # idle, its trained head is still what save / export write
    rankwise.save(model, tmp_path / "default", name="default")
    torch.testing.assert_close(mlp_case.output(rankwise.load(mlp_case.make(), tmp_path / "default"), batch), default_only)
    rankwise.export_peft(model, tmp_path / "peft-idle", name="default")
    exported = PeftModel.from_pretrained(mlp_case.make(), tmp_path / "peft-idle")
    torch.testing.assert_close(mlp_case.output(exported, batch), default_only, rtol=1e-5, atol=1e-6)

    rankwise.set_active(model, ["default", "b"])
    assert torch.equal(mlp_case.output(model, batch), both)
    with rankwise.disabled(model):
        with pytest.raises(RuntimeError, match="inside `with rankwise.disabled"):
            rankwise.set_active(model, "b")
    assert torch.equal(mlp_case.output(model, batch), both)
    rankwise.set_active(model, "b")
    rankwise.delete(model, "default")  # deleting the idle adapter: b alone, on the original head
    torch.testing.assert_close(mlp_case.output(model, batch), b_only)
