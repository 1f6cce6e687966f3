"""Review round 8 (2026-12-04): today's changes, fresh eyes (docs/reliability.md, that section)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PoisonGradient
from safetensors.torch import load_file
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)
from test_review6 import _decay_of, _hf_decayed, poison_third_loss

import rankwise
from rankwise.optim import split_weight_decay
from rankwise_harness.checkpoint import RunError
from rankwise_harness.train import finetune


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


# ---------------------------------------------------------------------------- a finite loss, a non-finite gradient


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "max-grad-norm"])
def test_a_non_finite_gradient_under_a_finite_loss_stops_before_the_step_and_keeps_the_good_checkpoint(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, clip: float | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--method full`` (no ``rankwise.step``, whose check caught it for library methods), checkpoints every step,
    the third step's loss finite and its gradient NaN. Before: AdamW wrote NaN into the weights (``--max-grad-norm``
    spreads a NaN norm to every tensor), the step's checkpoint replaced the last good one, and the next step's NaN
    loss stopped the run naming that NaN checkpoint as "kept". Now the run stops before the third step's update and
    the kept checkpoint (step 2) holds finite tensors only, equal to an uninterrupted run's step 2."""
    cfg = _cfg(tmp_path, tiny_models, sst2, method="full", lr=1e-4, max_steps=5, save_every=1, max_grad_norm=clip)
    poison_third_loss(monkeypatch, cfg, tiny_models["bert"], lambda x: PoisonGradient.apply(x, float("nan")))
    with pytest.raises(RunError, match=r"non-finite gradient \(the loss is finite\) at step 3 of 5.*step-0000002"):
        finetune(cfg, show_progress=False, log=lambda _m: None)
    kept = Path(cfg.output) / "checkpoints" / "step-0000002"
    tensors = {f: load_file(str(f)) for f in kept.rglob("*.safetensors")}
    assert tensors and all(torch.isfinite(t).all() for ts in tensors.values() for t in ts.values() if t.is_floating_point())
    monkeypatch.undo()  # the real loss again, for the uninterrupted reference
    reference = _cfg(tmp_path / "ref", tiny_models, sst2, method="full", lr=1e-4, max_steps=2, save_every=1,
                     max_grad_norm=clip)
    finetune(reference, show_progress=False, log=lambda _m: None)
    weights = load_file(str(Path(reference.output) / "model.safetensors"))
    saved = next(ts for f, ts in tensors.items() if f.name == "model_tensors.safetensors")
    assert set(saved) == set(weights) and all(torch.equal(saved[k], v) for k, v in weights.items())
