"""Issue 28, round 2 of the adversarial review: the silently wrong results (items 4-9, 11, 16, 18).

Each test is one defect class and a row in docs/reliability.md ("Adversarial review, round 2").
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise
from conftest import ModelCase, TinyMLP


# ---------------------------------------------------------------------------- 16. PEFT-wrapped models
@pytest.mark.parametrize("view", ["peft_model", "base_model", "get_base_model"])
def test_a_peft_wrapped_model_is_named_with_how_to_unwrap(view: str, mlp_case: ModelCase, tmp_path: Path) -> None:
    """attach / load / import_peft on a model carrying PEFT layers (the PeftModel, its LoraModel, or the
    inner model PEFT injected layers into) say so and name the unwrapping calls; nothing is changed."""
    peft = pytest.importorskip("peft")
    saved = mlp_case.make()
    rankwise.attach(saved, rankwise.LoraConfig(r=2, target_modules=["fc1"], seed=0))
    ours = rankwise.save(saved, tmp_path / "ours")
    theirs = tmp_path / "theirs"
    peft.get_peft_model(mlp_case.make(), peft.LoraConfig(r=2, target_modules=["fc1"])).save_pretrained(theirs)
    wrapped = peft.get_peft_model(mlp_case.make(), peft.LoraConfig(r=2, target_modules=["fc1"]))
    model = {"peft_model": wrapped, "base_model": wrapped.base_model, "get_base_model": wrapped.get_base_model()}[view]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for call in (lambda: rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"])),
                 lambda: rankwise.load(model, ours),
                 lambda: rankwise.import_peft(model, theirs)):
        with pytest.raises(ValueError, match=r"carries HF PEFT layers .*merge_and_unload\(\).*unload\(\)"):
            call()
        assert not rankwise.adapter_layers(model) and not hasattr(model, "_rankwise")
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    plain = wrapped.merge_and_unload()  # the named way out works
    rankwise.attach(plain, rankwise.LoraConfig(r=2, target_modules=["fc1"]))
