"""Review round 17: adapters over non-fp32 bases (docs/reliability.md, "Review round 17").

References are computed independently of the code under test: a plain ``loss.backward()`` of the same model in
fp64 (the mean gradient GoRA starts from), and HF PEFT's own save of an fp64 model (the dtype it writes).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import rankwise
from rankwise.methods.gora_gradients import collect_gradients

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama(dtype: torch.dtype) -> nn.Module:
    """A tiny random Llama whose weights are fp16 values (so the fp16 and fp64 models hold the same numbers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).half().to(dtype)


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(100 + i))
        out.append({"input_ids": ids, "labels": ids})
    return out


def _small_loss(factor: float) -> Any:
    """The model's loss times ``factor``: a loss (and gradients) of the size a larger model's mean gradients have."""
    return lambda model, batch: model(**batch).loss * factor


def _fp64_mean_gradients(factor: float, n: int) -> dict[str, torch.Tensor]:
    """The reference: the mean over ``n`` batches of each target weight's gradient, plain autograd in fp64."""
    model = _llama(torch.float64)
    for batch in _batches(n):
        (_small_loss(factor)(model, batch) / n).backward()
    return {name: m.weight.grad for name, m in model.named_modules() if name.split(".")[-1] in TARGETS}


@pytest.mark.parametrize("factor", [1.0, 1e-3, 1e3], ids=["loss", "loss-x1e-3", "loss-x1e3"])
def test_gora_calibration_on_an_fp16_model_keeps_small_gradients(factor: float) -> None:
    """GoRA's calibration on an fp16 model: the mean gradients (and so the importance and initial B) equal the fp64
    reference within fp16's rounding. Before, fp16 backpropagated them unscaled: with the loss x1e-3 (median
    |gradient| 2.6e-8) 82 % of a layer's entries were flushed to zero, relative error 1.0. ``loss x1e3`` makes the
    first scaled batch overflow fp16: it runs again at a lower scale (torch.amp.GradScaler's rule)."""
    reference = _fp64_mean_gradients(factor, 2)
    model = _llama(torch.float16)
    config = rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=8, n_steps=2, target_modules=TARGETS, seed=0)
    targets = {name: m for name, m in model.named_modules() if name.split(".")[-1] in TARGETS}
    grads, _ = collect_gradients(model, targets, config, _batches(2), _small_loss(factor))
    for name, g in grads.items():
        err = float((g.double() - reference[name]).norm() / reference[name].norm())
        assert err < 5e-3, f"{name}: relative error {err:.3g} of the fp16 model's mean gradient"
    assert all(p.grad is None for p in model.parameters())  # the model as calibration found it
    assert {p.dtype for p in model.parameters()} == {torch.float16}

    # the whole attach: GoRA's initial B on the fp16 model equals the fp64 model's within fp16's rounding
    ours, wide = _llama(torch.float16), _llama(torch.float64)
    rankwise.attach(ours, config, calibration=_batches(2), loss_fn=_small_loss(factor))
    rankwise.attach(wide, config, calibration=_batches(2), loss_fn=_small_loss(factor))
    wide_layers = rankwise.adapter_layers(wide)
    for name, layer in rankwise.adapter_layers(ours).items():
        assert layer.rank == wide_layers[name].rank
        b, b64 = layer.lora_b.detach().double(), wide_layers[name].lora_b.detach()
        assert float((b - b64).norm() / b64.norm()) < 5e-3, name


def test_gora_calibration_scales_nothing_on_bf16_and_fp32_models() -> None:
    """bf16 has fp32's exponent range: no loss scale there (and none on fp32), the gradients go straight into the
    accumulators as before; on bf16 they equal the fp64 reference within bf16's rounding."""
    from rankwise.methods.gora_gradients import LossScale

    for dtype in (torch.bfloat16, torch.float32):
        assert LossScale.for_model(_llama(dtype)).pending is None
    reference = _fp64_mean_gradients(1e-3, 2)
    model = _llama(torch.bfloat16)
    config = rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=8, n_steps=2, target_modules=TARGETS, seed=0)
    targets = {name: m for name, m in model.named_modules() if name.split(".")[-1] in TARGETS}
    grads, _ = collect_gradients(model, targets, config, _batches(2), _small_loss(1e-3))
    for name, g in grads.items():
        assert float((g.double() - reference[name]).norm() / reference[name].norm()) < 3e-2, name


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)).to(dtype)


EXPORTED = {
    "lora": lambda: rankwise.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], seed=0),
    "dora": lambda: rankwise.DoraConfig(r=4, alpha=8, target_modules=["0", "2"], seed=0),
    "edora": lambda: rankwise.EdoraConfig(r=4, alpha=8, target_modules=["0", "2"], seed=0),
    "raclora": lambda: rankwise.RacLoraConfig(r=4, alpha=8, target_modules=["0", "2"], seed=0, link_steps=1),
}


def _trained(dtype: torch.dtype, method: str) -> nn.Module:
    """An adapted MLP whose trainable tensors moved off their init (RAC-LoRA: one link merged into the chain)."""
    model = _mlp(dtype)
    rankwise.attach(model, EXPORTED[method]())
    g = torch.Generator().manual_seed(1)
    for _ in range(2 if method == "raclora" else 1):
        with torch.no_grad():
            for p in rankwise.trainable_parameters(model).values():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        if method == "raclora":
            rankwise.step(model, torch.optim.SGD(list(rankwise.trainable_parameters(model).values()), lr=0.0))
    return model


@pytest.mark.parametrize("method", list(EXPORTED))
def test_an_fp64_adapter_exports_to_peft_in_fp64(tmp_path: Path, method: str) -> None:
    """``export_peft`` of an fp64 model writes fp64 tensors, as HF PEFT's own save of an fp64 model does (its
    adapters stay fp64), so PEFT's load computes our outputs to fp64's rounding. Before, every tensor was rounded to
    fp32 (PEFT's outputs and an import's 7e-8 off). fp32 and bf16 models still write fp32 (PEFT's autocast)."""
    import peft

    theirs = peft.get_peft_model(_mlp(torch.float64), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                                        use_dora=method in ("dora", "edora")))
    theirs.save_pretrained(tmp_path / "peft")
    peft_dtypes = {t.dtype for t in load_file(tmp_path / "peft" / "adapter_model.safetensors").values()}
    assert peft_dtypes == {torch.float64}  # the reference: what PEFT writes for an fp64 model

    model = _trained(torch.float64, method)
    rankwise.export_peft(model, tmp_path / "ours")
    assert {t.dtype for t in load_file(tmp_path / "ours" / "adapter_model.safetensors").values()} == peft_dtypes
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loaded = peft.PeftModel.from_pretrained(_mlp(torch.float64), str(tmp_path / "ours"))
    imported = rankwise.import_peft(_mlp(torch.float64), tmp_path / "ours")
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(loaded(x), ours, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(imported(x), ours, rtol=1e-12, atol=1e-12)

    for dtype in (torch.float32, torch.bfloat16):
        rankwise.export_peft(_trained(dtype, method), tmp_path / str(dtype))
        written = load_file(tmp_path / str(dtype) / "adapter_model.safetensors")
        assert {t.dtype for t in written.values()} == {torch.float32}
