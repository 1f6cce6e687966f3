"""Quantised (bitsandbytes 4-bit nf4/fp4 and 8-bit) bases for every method, QLoRA-style.

A tiny Llama is saved once and loaded with transformers' ``BitsAndBytesConfig`` on the CPU. The
references are independent of the code under test: the same adapter on a float model holding the
dequantised weights (for 4-bit bases bitsandbytes' CPU matmul *is* dequantise-then-matmul in fp32,
so the two agree to float rounding), HF PEFT's own QLoRA/QDoRA layers on the same quantised base,
and the raw bytes of the quantised weights.

Models run in train mode (no dropout in this Llama): in eval mode under ``no_grad`` bitsandbytes
repacks 4-bit CPU weights for a bf16 kernel, which computes something slightly different.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import rankwise
from conftest import SHARED_DATA, ModelCase, assert_grads_match_peft, minilm_path
from method_matrix import METHOD_CASES
from rankwise import quant

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes cannot be imported here (pip install 'rankwise[quant]')")
transformers = pytest.importorskip("transformers")

QUANTS: dict[str, dict[str, Any]] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "fp4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True,
               "bnb_4bit_compute_dtype": torch.float32},
    "int8": {"load_in_8bit": True},
}
FOUR_BIT = ("nf4", "fp4-dq")
REPACKS = bool(bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu)  # this CPU gets bitsandbytes' bf16 repacking
TARGETS = ["q_proj", "v_proj", "down_proj"]
VOCAB = 64


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama (widths multiples of bitsandbytes' 64-value block) saved as a checkpoint."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def load_quantized(path: str, kind: str) -> nn.Module:
    config = transformers.BitsAndBytesConfig(**QUANTS[kind])
    return transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").train()


def load_dequantized(path: str, kind: str) -> nn.Module:
    """The float model holding exactly the dequantised weights of ``load_quantized(path, kind)``."""
    model = load_quantized(path, kind)
    assert quant.dequantize_model(model)
    return model


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def llama_case(path: str, kind: str) -> ModelCase:
    return ModelCase(f"llama-{kind}", lambda: load_quantized(path, kind), batch, TARGETS, None)


def quant_snapshot(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Raw bytes of every quantised weight and its scales (4-bit absmax / 8-bit row scales)."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, m in model.named_modules():
        base = m.base_layer() if isinstance(m, rankwise.AdapterLayer) else m
        if not quant.is_quantized(base):
            continue
        w = base.weight
        scales = w.quant_state.absmax if quant.quant_kind(base) == "4bit" else (w.SCB if w.SCB is not None else base.state.SCB)
        out[name] = [w.data.detach().reshape(-1).view(torch.uint8).clone(), scales.detach().clone()]
    return out


def quantized_bases(model: nn.Module) -> dict[str, nn.Module]:
    return {n: layer.base_layer() for n, layer in rankwise.adapter_layers(model).items() if layer.quantized}


def train(model: nn.Module, steps: int = 3, lr: float = 1e-2, seeds: list[int] | None = None) -> list[float]:
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=lr)
    losses = []
    for i in range(steps):
        loss = model(**batch(seeds[i] if seeds else 100 + i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
        losses.append(float(loss.detach()))
    return losses


def attach_method(path: str, kind: str, method: str) -> nn.Module:
    case = llama_case(path, kind)
    model = case.make()
    config, calibration = METHOD_CASES[method].make(case, False)
    rankwise.attach(model, config, calibration=calibration)
    return model


def outputs(model: nn.Module, seed: int = 7) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(seed)).logits


# ---------------------------------------------------------------------------- every method, every kind
@pytest.mark.parametrize("kind", list(QUANTS))
@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_every_method_trains_and_never_writes_the_quantised_weight(llama_dir: str, kind: str, method: str) -> None:
    model = load_quantized(llama_dir, kind)
    before = quant_snapshot(model)
    case = llama_case(llama_dir, kind)
    config, calibration = METHOD_CASES[method].make(case, False)
    report = rankwise.attach(model, config, calibration=calibration)
    layers = rankwise.adapter_layers(model)
    assert len(layers) == 6 and all(layer.quantized == ("8bit" if kind == "int8" else "4bit") for layer in layers.values())
    assert [(row.out_features, row.in_features) for row in report.layers][:3] == [(64, 64), (32, 64), (64, 128)]
    label = {"nf4": "nf4", "fp4-dq": "fp4 (double quant)", "int8": "int8"}[kind]  # the report says the base, and no fusion
    assert all((row.base, row.path) == (label, f"reference: {label} base") for row in report.layers)
    float_total = sum(p.numel() for p in transformers.LlamaForCausalLM.from_pretrained(llama_dir).parameters())
    assert report.total == float_total + report.trainable  # 4-bit weights counted as values, not packed bytes
    trainable = rankwise.trainable_parameters(model)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    assert all(p.dtype == torch.float32 for p in trainable.values())  # adapters in the compute dtype (fp32)
    train(model)
    model(**batch(7)).loss.backward()
    for n, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{n} received no gradient"
        assert not torch.equal(p.detach(), start[n]), f"trainable tensor {n} did not move"
    after = quant_snapshot(model)
    assert after.keys() == before.keys() and len(after) == 14
    for name, tensors in before.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[name])), f"quantised weight {name} changed"


@pytest.mark.parametrize("kind", FOUR_BIT)
@pytest.mark.parametrize("method", ["lora", "dora", "gora", "edora", "raclora", "cola"])
def test_quantised_adapter_equals_float_adapter_on_the_dequantised_base(llama_dir: str, kind: str, method: str,
                                                                       tmp_path: Path) -> None:
    ours = attach_method(llama_dir, kind, method)
    train(ours)
    rankwise.save(ours, tmp_path)
    ref = load_dequantized(llama_dir, kind)
    rankwise.load(ref, tmp_path)  # the fingerprint recorded on the quantised base fits the dequantised one
    torch.testing.assert_close(outputs(ours), outputs(ref), rtol=1e-5, atol=1e-5)
    # gradients too
    ours.zero_grad(); ref.zero_grad()
    ours(**batch(8)).loss.backward()
    ref(**batch(8)).loss.backward()
    grads_ref = {n: p.grad for n, p in rankwise.trainable_parameters(ref).items()}
    for n, p in rankwise.trainable_parameters(ours).items():
        torch.testing.assert_close(p.grad, grads_ref[n], rtol=1e-4, atol=1e-6)
    # merged detach: float layers holding dequantised W0 + update, the same as merging on the float model
    rankwise.detach(ours, merge=True)
    rankwise.detach(ref, merge=True)
    assert not any(quant.is_quantized(m) for m in ours.modules())
    assert getattr(ours.config, "quantization_config", None) is None and not getattr(ours, "is_quantized", False)
    ref_modules = dict(ref.named_modules())
    for name, m in ours.named_modules():
        if isinstance(m, nn.Linear):
            assert type(m) is nn.Linear and m.weight.dtype == torch.float32
            torch.testing.assert_close(m.weight, ref_modules[name].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs(ours), outputs(ref), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Qwen2 (q/k/v projections with a bias, as Qwen2.5's), biases drawn away from zero."""
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 1.0)
    path = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("method", ["lora", "raclora", "dora"])
def test_a_4bit_base_with_a_bias_trains_as_the_dequantised_float_base(qwen_dir: str, method: str) -> None:
    """bitsandbytes' 4-bit matmul with a bias returns a view: LoRA's and RAC-LoRA's in-place add on it made
    the first training forward fail ("Output 0 of MatMul4Bit is a view and is being modified inplace")."""
    def make(dequantised: bool) -> nn.Module:
        config = transformers.BitsAndBytesConfig(**QUANTS["nf4"])
        model = transformers.Qwen2ForCausalLM.from_pretrained(qwen_dir, quantization_config=config, device_map="cpu").train()
        if dequantised:
            quant.dequantize_model(model)
        case = ModelCase("qwen-nf4", lambda: model, batch, ["q_proj", "v_proj"], None)
        rankwise.attach(model, METHOD_CASES[method].make(case, False)[0])
        with torch.no_grad():  # B away from zero, so the update shows in the outputs and A's gradient
            for p in rankwise.trainable_parameters(model).values():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return model
    ours, ref = make(False), make(True)
    assert all(layer.quantized == "4bit" and layer.bias is not None for layer in rankwise.adapter_layers(ours).values())
    out_ours, out_ref = ours(**batch(8)), ref(**batch(8))
    torch.testing.assert_close(out_ours.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out_ours.loss.backward()
    out_ref.loss.backward()
    grads_ref = {n: p.grad for n, p in rankwise.trainable_parameters(ref).items()}
    for n, p in rankwise.trainable_parameters(ours).items():
        torch.testing.assert_close(p.grad, grads_ref[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_dtype, compute", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["fp32-model-bf16-compute", "bf16-model-fp32-compute"])
def test_merged_detach_layers_take_the_models_dtype(llama_dir: str, model_dtype: torch.dtype, compute: torch.dtype,
                                                    tmp_path: Path) -> None:
    """A 4-bit layer takes and returns the model's dtype whatever it computes in (QLoRA's usual setup: an fp32
    model, bf16 compute): the float layers of a merged detach were made in the compute dtype, so the detached
    model's first forward failed ("expected m1 and m2 to have the same dtype")."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=config, device_map="cpu",
                                                          dtype=model_dtype).train()
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=TARGETS, seed=0))
    train(model)
    expected = outputs(model)
    rankwise.save(model, tmp_path)
    rankwise.detach(model, merge=True)
    assert {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)} == {model_dtype}
    torch.testing.assert_close(outputs(model), expected, rtol=0, atol=2e-2)  # bf16 rounding somewhere on both sides
    # the reference: the same adapter merged on the float model holding the dequantised weights
    ref = transformers.LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=config, device_map="cpu",
                                                        dtype=model_dtype)
    quant.dequantize_model(ref)
    rankwise.load(ref, tmp_path)
    rankwise.detach(ref, merge=True)
    ref_modules = dict(ref.named_modules())
    for name in rankwise.read_adapter(tmp_path)[0]["layers"]:
        torch.testing.assert_close(model.get_submodule(name).weight, ref_modules[name].weight, rtol=1e-5, atol=1e-6)


def test_merged_detach_saves_as_a_float_checkpoint(llama_dir: str, tmp_path: Path) -> None:
    model = attach_method(llama_dir, "nf4", "dora")
    train(model)
    expected = outputs(model)
    rankwise.detach(model, merge=True)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).train()
    assert not any(quant.is_quantized(m) for m in reloaded.modules())
    torch.testing.assert_close(outputs(reloaded), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merged_detach_and_dequantize_leave_the_global_rng_alone(llama_dir: str, kind: str) -> None:
    """Each float layer that replaces a quantised one was built as a fresh ``nn.Linear``, whose initialisation drew
    throwaway weights from torch's global generator: a merged detach (or ``dequantize_model``) moved the user's random
    stream by a layer's worth of draws per layer, so a seeded run after it drew other numbers than the same run on a
    float base. Both now leave the generator's state as they found it."""
    model = attach_method(llama_dir, kind, "lora")
    before = torch.get_rng_state()
    rankwise.detach(model, merge=True)
    assert torch.equal(torch.get_rng_state(), before)
    other = load_quantized(llama_dir, kind)
    before = torch.get_rng_state()
    assert quant.dequantize_model(other)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "dora", "gora", "edora", "raclora"])
def test_save_load_exact(llama_dir: str, kind: str, method: str, tmp_path: Path) -> None:
    model = attach_method(llama_dir, kind, method)
    train(model)
    rankwise.save(model, tmp_path)
    fresh = load_quantized(llama_dir, kind)
    rankwise.load(fresh, tmp_path)  # fingerprint of the dequantised weights (int8: scales moved by bnb's forward)
    assert torch.equal(outputs(fresh), outputs(model))
    saved = {n: layer.adapter_state() for n, layer in rankwise.adapter_layers(model).items()}
    for n, layer in rankwise.adapter_layers(fresh).items():
        assert all(torch.equal(v, saved[n][k]) for k, v in layer.adapter_state().items())


def test_fingerprint_refuses_another_checkpoint(llama_dir: str, tmp_path: Path) -> None:
    model = attach_method(llama_dir, "nf4", "lora")
    rankwise.save(model, tmp_path / "a")
    other = load_quantized(llama_dir, "nf4")
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.data.copy_(torch.roll(other.model.layers[0].self_attn.q_proj.weight.data, 7))
    with pytest.raises(rankwise.AdapterFileError, match="different base weights"):
        rankwise.load(other, tmp_path / "a")
    assert not rankwise.adapter_layers(other)


@pytest.mark.parametrize("kind", list(QUANTS))
def test_fingerprint_across_a_quantisation_fits_the_same_checkpoint_only(llama_dir: str, kind: str,
                                                                        tmp_path: Path) -> None:
    """Trained on a quantised base, loaded on its float checkpoint (QLoRA's serving path), and the reverse:
    accepted within the quantisation's error; the float/quantised copy of another checkpoint is refused."""
    quantised = attach_method(llama_dir, kind, "lora")
    rankwise.save(quantised, tmp_path / "q")
    spec = rankwise.read_adapter(tmp_path / "q")[0]["layers"]["model.layers.0.self_attn.q_proj"]
    assert spec["base_quant"] == ("8bit" if kind == "int8" else "4bit")
    assert spec["base_quant_block"] == (64 if kind != "int8" else 64)  # 4-bit blocks of 64; int8: a row of 64
    float_model = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    rankwise.load(float_model, tmp_path / "q")  # no check_base=False needed
    float_attached = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    rankwise.attach(float_attached, rankwise.LoraConfig(r=4, alpha=8, target_modules=TARGETS, seed=0))
    rankwise.save(float_attached, tmp_path / "f")
    rankwise.load(load_quantized(llama_dir, kind), tmp_path / "f")
    # another checkpoint of the same architecture (other random weights), either way round
    other_dir = tmp_path / "other"
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(llama_dir)).save_pretrained(other_dir)
    for target, adapter in ((transformers.LlamaForCausalLM.from_pretrained(other_dir), "q"),
                            (load_quantized(str(other_dir), kind), "f")):
        with pytest.raises(rankwise.AdapterFileError, match="different base weights"):
            rankwise.load(target, tmp_path / adapter)
        assert not rankwise.adapter_layers(target)


def test_fingerprint_tolerance_is_the_codebook_error_times_the_block_absmax() -> None:
    from rankwise.adapter_file import fingerprint_tolerance

    w = torch.zeros(4, 64)
    w[0, :32], w[0, 32:], w[3] = 2.0, -8.0, 0.5  # blocks of 32: absmax 2, 8, 0, 0, 0, 0, 0.5, 0.5
    tol = fingerprint_tolerance(w, "4bit", 32)
    idx = torch.linspace(0, w.numel() - 1, len(tol)).round().long()
    block_absmax = torch.tensor([2.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5])[idx // 32]
    torch.testing.assert_close(tol, 0.17 * 1.01 * block_absmax)


# ---------------------------------------------------------------------------- merge
def test_merge_is_refused_and_changes_nothing(llama_dir: str) -> None:
    model = attach_method(llama_dir, "nf4", "lora")
    train(model)
    expected = outputs(model)
    with pytest.raises(ValueError, match=r"cannot merge into a bitsandbytes nf4 weight.*detach\(model, merge=True\)"):
        rankwise.merge(model)
    layer = next(iter(rankwise.adapter_layers(model).values()))
    with pytest.raises(ValueError, match="loses most of the update"):
        layer.merge()
    rankwise.unmerge(model)  # nothing was merged: a no-op
    assert not any(layer.merged for layer in rankwise.adapter_layers(model).values())
    assert torch.equal(outputs(model), expected)
    rankwise.detach(model)  # unmerged detach: the very same bitsandbytes modules again
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize("kind", list(QUANTS))
@pytest.mark.parametrize("method", ["dora", "raclora"])
def test_disabled_is_the_quantised_base_bit_for_bit(llama_dir: str, kind: str, method: str) -> None:
    """Inside ``rankwise.disabled`` every adapted layer is its bitsandbytes module's own forward: the outputs
    of the quantised model before attach, bit for bit, and no adapter gets a gradient (issue 30). The switch
    is the method-independent host forward; DoRA (whose 4-bit path probes the base forward) and RAC-LoRA (a
    chain) stand for the methods here (all of them passed it once: 30 cases, 14 min on the shared dev CPU)."""
    expected = outputs(load_quantized(llama_dir, kind))
    model = attach_method(llama_dir, kind, method)
    train(model)
    adapted = outputs(model)
    assert not torch.equal(adapted, expected)
    with rankwise.disabled(model):
        assert torch.equal(outputs(model), expected)
        loss = model(**batch(3)).loss
        if loss.requires_grad:
            loss.backward()
    assert all(p.grad is None for p in rankwise.trainable_parameters(model).values())
    assert torch.equal(outputs(model), adapted)


# ---------------------------------------------------------------------------- PEFT
def _peft_pair(path: str, kind: str, dora: bool) -> tuple[nn.Module, nn.Module]:
    peft = pytest.importorskip("peft")
    ours = load_quantized(path, kind)
    cfg_cls = rankwise.DoraConfig if dora else rankwise.LoraConfig
    rankwise.attach(ours, cfg_cls(r=4, alpha=8, target_modules=TARGETS, seed=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in rankwise.adapter_layers(ours).values():
            layer.lora_b.normal_(0, 0.1, generator=g)
            if dora:
                layer.magnitude.mul_(1 + 0.1 * torch.rand(layer.magnitude.shape, generator=g))
    theirs = peft.get_peft_model(load_quantized(path, kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora))
    with torch.no_grad():
        for name, layer in rankwise.adapter_layers(ours).items():
            pl = theirs.base_model.model.get_submodule(name)
            pl.lora_A["default"].weight.copy_(layer.lora_a)
            pl.lora_B["default"].weight.copy_(layer.lora_b)
            if dora:
                pl.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return ours, theirs.train()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_outputs_and_gradients_match_peft(llama_dir: str, kind: str, dora: bool) -> None:
    ours, theirs = _peft_pair(llama_dir, kind, dora)
    b = batch(0)
    out_ours, out_theirs = ours(**b), theirs(**b)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    assert_grads_match_peft(ours, theirs, dora, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora", "gora", "edora", "raclora"])
def test_export_peft_matches_peft_on_the_same_quantised_base(llama_dir: str, method: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = attach_method(llama_dir, "nf4", method)
    train(model)
    rankwise.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(load_quantized(llama_dir, "nf4"), tmp_path).train()
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=1e-5, atol=1e-5)


def test_import_peft_qlora_continues_training(llama_dir: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(load_quantized(llama_dir, "nf4"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=g)
    theirs.save_pretrained(tmp_path)
    ours = rankwise.import_peft(load_quantized(llama_dir, "nf4"), tmp_path).train()
    torch.testing.assert_close(outputs(ours), outputs(theirs.train()), rtol=1e-5, atol=1e-5)
    before = quant_snapshot(ours)
    start = {n: p.detach().clone() for n, p in rankwise.trainable_parameters(ours).items()}
    losses = train(ours, steps=6, lr=3e-3, seeds=[5] * 6)  # one batch: its loss must fall
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, start[n]) for n, p in rankwise.trainable_parameters(ours).items())
    assert all(torch.equal(a, b) for n, t in quant_snapshot(ours).items() for a, b in zip(t, before[n]))


# ---------------------------------------------------------------------------- what each method reads of W0
def test_gora_gradient_of_a_quantised_weight_comes_from_its_input_and_output_gradients(llama_dir: str) -> None:
    from rankwise.methods.gora import collect_gradients, importances

    cfg = rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=8, n_steps=2, grad_accumulation=2, target_modules=TARGETS)
    cal = [batch(1000 + i) for i in range(4)]
    grads, imp = {}, {}
    for key, model in (("quant", load_quantized(llama_dir, "nf4")), ("float", load_dequantized(llama_dir, "nf4"))):
        targets = {n: m for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
        grads[key], _ = collect_gradients(model, targets, cfg, cal, None)
        imp[key] = importances(targets, grads[key], cfg.importance)
        assert all(p.grad is None for p in model.parameters())
    for name, g in grads["float"].items():  # the float model's grads come from weight.grad
        torch.testing.assert_close(grads["quant"][name], g, rtol=1e-4, atol=1e-7)
        assert imp["quant"][name] == pytest.approx(imp["float"][name], rel=1e-4)


@pytest.mark.parametrize("method, kind, dropout, per_forward", [
    ("lora", "nf4", 0.0, 0), ("gora", "nf4", 0.0, 0), ("edora", "nf4", 0.0, 0), ("raclora", "nf4", 0.0, 0),
    ("dora", "nf4", 0.0, 0),  # W0 Aᵀ rides along the base forward: no dequantisation of its own
    ("dora", "nf4", 0.1, 1), ("dora", "int8", 0.0, 1),  # the norm dequantises, as PEFT's QDoRA does
    ("edora", "int8", 0.1, 0),
])
def test_dequantisation_per_step(llama_dir: str, method: str, kind: str, dropout: float, per_forward: int,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    case = llama_case(llama_dir, kind)
    model = case.make()
    config, calibration = METHOD_CASES[method].make(case, False)
    rankwise.attach(model, config.replace(dropout=dropout), calibration=calibration)
    calls: list[int] = []
    real = quant.dequantize  # the base-layer kinds (rankwise.base_layers) dequantise through rankwise.quant
    monkeypatch.setattr(quant, "dequantize", lambda m: calls.append(1) or real(m))
    model(**batch(3)).loss.backward()
    assert len(calls) == per_forward * len(rankwise.adapter_layers(model))


def test_raclora_link_ends_stay_in_the_adapter(llama_dir: str) -> None:
    model = attach_method(llama_dir, "nf4", "raclora")  # link_steps=2: train() crosses a link end
    before = quant_snapshot(model)
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    for i in range(3):
        model(**batch(i)).loss.backward()
        opt.step(); opt.zero_grad()
        rankwise.step(model, opt)
    expected = outputs(model)
    rankwise.end_link(model, opt)
    torch.testing.assert_close(outputs(model), expected, rtol=1e-5, atol=1e-6)
    assert all(layer.chain_a.shape[0] == 2 * layer.rank for layer in rankwise.adapter_layers(model).values())
    assert all(torch.equal(a, b) for n, t in quant_snapshot(model).items() for a, b in zip(t, before[n]))


def test_gora_calibrates_an_eval_mode_quantised_model(llama_dir: str) -> None:
    """``from_pretrained`` returns an eval-mode model: GoRA's calibration forwards on it must not let
    bitsandbytes repack the 4-bit weights (attach would then refuse them, or training through them fail)."""
    if not REPACKS:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model = load_quantized(llama_dir, "nf4").eval()
    before = quant_snapshot(model)
    cfg = rankwise.GoraConfig(r_ref=4, alpha=8, n_steps=2, target_modules=TARGETS, seed=0)
    rankwise.attach(model, cfg, calibration=[batch(0), batch(1)])
    assert all(torch.equal(a, b) for n, t in quant_snapshot(model).items() for a, b in zip(t, before[n]))
    train(model.train())  # trains through the adapted layers and every other 4-bit layer


def test_eval_forward_keeps_the_quantised_layout(llama_dir: str) -> None:
    """bitsandbytes repacks a 4-bit CPU weight at its first eval-mode forward without gradients (then training
    through it fails); adapted layers are kept out of that, the harness keeps the whole model out of it."""
    model = attach_method(llama_dir, "nf4", "lora")
    bases = quantized_bases(model)
    before = quant_snapshot(model)
    train_out = outputs(model)
    model.eval()
    eval_out = outputs(model)  # eval + no_grad: the non-adapted layers repack, the adapted ones must not
    assert all(not getattr(b.weight.quant_state, "packing_format_for_cpu", False) for b in bases.values())
    assert all(torch.equal(before[n][0], quant_snapshot(model)[n][0]) for n in bases)
    if REPACKS:
        assert not torch.equal(eval_out, train_out)  # (the repacked layers compute in bf16)
    quant.keep_layout(model)
    fresh = load_quantized(llama_dir, "nf4")
    assert quant.keep_layout(fresh) == 14
    fresh.eval()
    outputs(fresh)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in fresh.modules() if quant.is_quantized(m))
    model.train()
    train(model, steps=1)  # training after evaluation still works


@pytest.mark.skipif(not REPACKS, reason="this CPU lacks AVX512-BF16: bitsandbytes does not repack 4-bit weights here")
def test_a_repacked_weight_is_refused(llama_dir: str) -> None:
    model = load_quantized(llama_dir, "nf4").eval()
    outputs(model)  # bitsandbytes repacks every 4-bit weight for its CPU inference kernel
    with pytest.raises(ValueError, match=r"repacked by bitsandbytes.*keep_layout"):
        rankwise.attach(model, rankwise.LoraConfig(r=4, target_modules=TARGETS))
    assert not rankwise.adapter_layers(model)


# ---------------------------------------------------------------------------- bad input
class QuantLinear(nn.Linear):
    """An int8-weight layer that is not bitsandbytes' (as another quantisation library would make)."""

    def __init__(self) -> None:
        super().__init__(8, 8)
        self.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)


def test_an_unsupported_quantised_layer_is_named() -> None:
    model = nn.Sequential(nn.Linear(8, 8), QuantLinear())
    with pytest.raises(TypeError, match=r"QuantLinear.*int8.*Linear4bit / Linear8bitLt"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0", "1"]))
    assert not rankwise.adapter_layers(model) and isinstance(model[1], QuantLinear)


def test_quantised_base_without_bitsandbytes_names_the_extra(llama_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_quantized(llama_dir, "nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rankwise\[quant\]'"):
        rankwise.attach(model, rankwise.LoraConfig(r=4, target_modules=TARGETS))
    assert not rankwise.adapter_layers(model)


# ---------------------------------------------------------------------------- harness
def test_harness_quantize_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from rankwise_harness import models
    from rankwise_harness.config import ConfigError, RunConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(models.ModelError, match=r"pip install 'rankwise\[quant\]'"):
        models.quantization_kwargs("nf4", torch.device("cpu"))
    with pytest.raises(ConfigError, match="--quantize must be one of nf4, fp4, int8"):
        RunConfig(task="sst2", quantize="int4")
    with pytest.raises(ConfigError, match="full fine-tuning cannot train quantised weights"):
        RunConfig(task="sst2", method="full", quantize="nf4")


@pytest.fixture(scope="module")
def harness_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny Llama classifier with the packaged MiniLM's tokenizer, and an SST-2 slice (or a fixture in its format)."""
    root = tmp_path_factory.mktemp("harness")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   num_labels=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "sst2"
    data.mkdir()
    real = SHARED_DATA / "glue" / "SST-2"
    for split, n in (("train", 32), ("dev", 8)):
        lines = ((real / f"{split}.tsv").read_text().splitlines()[: n + 1] if real.is_dir() else
                 ["sentence\tlabel"] + [f"{'good' if i % 2 else 'bad'} film {i}\t{i % 2}" for i in range(n)])
        (data / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return str(root / "model"), str(data)


def _run(harness_inputs: tuple[str, str], output: Path, **kw: Any):  # -> RunConfig
    from rankwise_harness.config import RunConfig

    model, data = harness_inputs
    base = dict(task="sst2", method="lora", data=data, model=model, output=str(output), r=4, alpha=8, max_steps=2,
                batch_size=4, lr=5e-3, max_length=24, warmup_ratio=0.0, quantize="nf4")
    return RunConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["gora", "dora"])
def test_finetune_quantize_records_it(method: str, harness_inputs: tuple[str, str], tmp_path: Path) -> None:
    from rankwise_harness.train import finetune

    run = _run(harness_inputs, tmp_path / "run", method=method, overrides={"n_steps": "2"} if method == "gora" else {})
    result = finetune(run, show_progress=False, log=lambda _m: None)
    assert result["quantize"] == "nf4"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["quantize"] == "nf4"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["quantize"] == "nf4"
    base = transformers.LlamaForSequenceClassification.from_pretrained(
        harness_inputs[0], device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(**QUANTS["nf4"], llm_int8_skip_modules=["score"]))
    rankwise.load(base, tmp_path / "run" / "adapter")  # the fingerprint fits the same nf4 base
    layers = rankwise.adapter_layers(base)
    assert layers and all(layer.quantized == "4bit" for layer in layers.values())
    assert not quant.is_quantized(base.score)  # the head stays float, trained fully


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_quantised_resume_equals_uninterrupted(method: str, harness_inputs: tuple[str, str], tmp_path: Path) -> None:
    from rankwise_harness.train import finetune
    from safetensors.torch import load_file

    kw: dict[str, Any] = dict(method=method, max_steps=4, save_every=2, dropout=0.1)  # dropout: RNG states matter
    whole = finetune(_run(harness_inputs, tmp_path / "a", **kw), show_progress=False, log=lambda _m: None)

    class Crash(RuntimeError):
        pass

    def crash(step: int, _loss: float) -> None:
        if step == 3:
            raise Crash

    cfg = _run(harness_inputs, tmp_path / "b", **kw)
    with pytest.raises(Crash):
        finetune(cfg, hook=crash, show_progress=False, log=lambda _m: None)
    resumed = finetune(cfg, resume=True, show_progress=False, log=lambda _m: None)
    assert resumed["steps_this_session"] == 2 and resumed["losses"] == whole["losses"]
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_export_merged_from_a_quantised_base(llama_dir: str, tmp_path: Path) -> None:
    from rankwise_harness import cli

    model = attach_method(llama_dir, "nf4", "lora")
    train(model)
    rankwise.save(model, tmp_path / "adapter")
    args = ["export", str(tmp_path / "adapter"), "--base", llama_dir, "--out", str(tmp_path / "merged"), "--format", "merged"]
    assert cli.main([*args, "--quantize", "nf4"]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").train()
    torch.testing.assert_close(outputs(merged), outputs(model), rtol=1e-5, atol=1e-5)
    # without --quantize, onto the float checkpoint (QLoRA's serving path): the fingerprint recorded on the nf4
    # base fits within nf4's error, and the merge is W + ΔW (close to, not equal to, the nf4 model's outputs)
    assert cli.main([*args[:-4], "--out", str(tmp_path / "merged2"), "--format", "merged"]) == 0
    on_float = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged2").train()
    assert not torch.equal(outputs(on_float), outputs(model))
    torch.testing.assert_close(outputs(on_float), outputs(model), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_attach_to_a_4bit_layer_not_yet_quantised_is_refused(method: str) -> None:
    """A ``Linear4bit`` holds float weights until its move to a device quantises them. Before: attach took it (and
    DoRA's magnitude came from the float weights, not the 4-bit ones the layer computes with after its move; the base
    forward itself fails with bitsandbytes' assertion until then). Now refused, naming the fix; nothing attached."""
    model = nn.Sequential(bnb.nn.Linear4bit(16, 8, bias=False, compute_dtype=torch.float32))
    assert getattr(model[0].weight, "bnb_quantized", None) is False
    flags = [p.requires_grad for p in model.parameters()]
    cfg = rankwise.LoraConfig(r=2, target_modules=["0"]) if method == "lora" else rankwise.DoraConfig(r=2, target_modules=["0"])
    with pytest.raises(ValueError, match=r"not quantised yet.*\.to\(device\)"):
        rankwise.attach(model, cfg)
    assert type(model[0]).__name__ == "Linear4bit" and [p.requires_grad for p in model.parameters()] == flags
