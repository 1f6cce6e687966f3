"""Review round 8 (2026-12-04): today's changes, fresh eyes (docs/reliability.md, that section)."""

from __future__ import annotations

import pytest
import torch

import rankwise
from rankwise.optim import split_weight_decay
from test_review6 import _decay_of, _hf_decayed


def _tiny_t5() -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))


def test_t5s_relative_attention_bias_is_not_decayed_as_hf_trainer() -> None:
    """T5's ``relative_attention_bias`` (an ``nn.Embedding`` of per-bucket attention biases, a parameter named
    ``weight``): HF ``Trainer``'s rule reads "bias" in the parameter's full name and does not decay it; the rule
    read the parameter's own name (``weight``) and decayed it. Full fine-tuning's groups, and LoRA+ groups with
    the table trained fully (``modules_to_save``), now decay exactly HF ``Trainer``'s set."""
    model = _tiny_t5()
    groups = split_weight_decay(model, [{"params": list(model.parameters()), "weight_decay": 0.1}])
    decay = _decay_of(torch.optim.AdamW(groups), model)
    assert {n for n, wd in decay.items() if wd > 0} == _hf_decayed(model)
    assert any("relative_attention_bias" in n for n, wd in decay.items() if wd == 0)

    model = _tiny_t5()
    table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=("q", "v"), modules_to_save=(table,)))
    groups = rankwise.lora_plus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.05)
    decay = _decay_of(torch.optim.AdamW(groups), model)
    assert set(decay) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, wd in decay.items() if wd > 0} == _hf_decayed(model)
    assert decay[f"{table}.weight"] == 0.0
