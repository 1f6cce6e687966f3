"""Review round 13 (D): rankwise inside HF Trainer / TRL / Accelerate around save and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import rankwise
from rankwise import quant

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj"]
QUANTS: dict[str, dict[str, Any]] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "int8": {"load_in_8bit": True},
}


def _tiny_llama(**extra: Any) -> Any:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, **extra))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("llama13")
    _tiny_llama().save_pretrained(path)
    return str(path)


def _quantized(path: str, kind: str) -> Any:
    config = transformers.BitsAndBytesConfig(**QUANTS[kind])
    return transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").train()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_save_pretrained_of_an_adapted_quantized_model_keeps_the_adapted_layers_quantisation_state(
        llama_dir: str, kind: str, tmp_path: Path) -> None:
    """``model.save_pretrained`` (what ``trainer.save_model`` and every Trainer checkpoint call) on a bitsandbytes
    base with rankwise layers: the adapted layers wrote their packed weight without bitsandbytes' quantisation
    state (4-bit ``weight.absmax`` / ``quant_map`` / ``quant_state``, int8 ``SCB``), so ``from_pretrained`` of the
    folder gave adapted modules that cannot run ("quant_state is required"). Now each such module reloads with the
    base's exact quantised weight (its dequantised ``W0`` equal bit for bit) and the state_dict still loads back."""
    pytest.importorskip("bitsandbytes")
    model = _quantized(llama_dir, kind)
    base_w = {n: quant.dequantize(model.get_submodule(n)) for n, _ in model.named_modules() if n.endswith(tuple(TARGETS))}
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=TARGETS, seed=0))
    model.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu").train()
    for name, w in base_w.items():
        module = reloaded.get_submodule(name)
        assert quant.is_quantized(module), name
        assert torch.equal(quant.dequantize(module), w), name
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=ids).logits).all()
    adapter_keys = {k for layer in rankwise.adapter_layers(model).values() for k in layer.adapter_state()}
    assert adapter_keys == {"lora_a", "lora_b"}  # the quantisation state is the base's, never the adapter's
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model.load_state_dict(model.state_dict(), strict=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_hf_trainer_refuses_a_quantized_base_even_with_rankwise_adapters(llama_dir: str) -> None:
    """transformers' Trainer (so TRL's SFTTrainer too) refuses a bitsandbytes-quantised model that is not a PEFT
    model ("purely quantized"), adapters or not: docs/howto/quantized.md and hf-trainer.md send such runs to an own
    loop, Accelerate or the CLI. If transformers starts accepting them, this fails and the docs change."""
    pytest.importorskip("bitsandbytes")
    model = _quantized(llama_dir, "nf4")
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=TARGETS, seed=0))
    args = transformers.TrainingArguments(output_dir="unused", max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=args, train_dataset=[])


def test_load_best_model_at_end_restores_the_best_checkpoints_raclora_chain_and_counters(tmp_path: Path) -> None:
    """``load_best_model_at_end``: after links ended past the best checkpoint, the model holds that checkpoint's
    adapter exactly (the chain record shrinks back to its shape) and its step counter and link state."""
    import json

    import safetensors.torch

    from rankwise.integrations.hf import RankwiseCallback
    from rankwise.state import get_state

    model = _tiny_llama()
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, link_steps=2, target_modules=TARGETS, seed=0))
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(0, 64, (24, 8), generator=torch.Generator().manual_seed(0))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, save_steps=3, eval_strategy="steps", eval_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-2, load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,  # the worse: step 3
        report_to=[], logging_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4],
                                   callbacks=[RankwiseCallback()])
    trainer.train()
    best = safetensors.torch.load_file(str(Path(trainer.state.best_model_checkpoint) / "model.safetensors"))
    saved = json.loads(bytes(best.pop("rankwise_state").tolist()))
    assert saved["step"] == 3 < trainer.state.global_step
    assert (get_state(model).step, get_state(model).method_state) == (saved["step"], saved["method_state"])
    now = model.state_dict()
    assert all(torch.equal(now[k], t) for k, t in best.items())


def test_load_from_a_whole_model_or_peft_folder_says_which_format_it_is_and_what_to_do(tmp_path: Path) -> None:
    """``rankwise.load`` on a folder ``save_pretrained`` / an HF Trainer wrote (the whole model's weights, adapter
    tensors inside), or on an HF PEFT adapter, said only "adapter.safetensors does not exist"; it now names the
    format it found and the path that loads it, and the model is left as it was."""
    model = _tiny_llama()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=TARGETS, seed=0))
    model.save_pretrained(tmp_path / "whole")
    rankwise.export_peft(model, tmp_path / "peft")
    fresh = _tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(rankwise.AdapterFileError, match=r"whole model's weights .*load_state_dict"):
        rankwise.load(fresh, tmp_path / "whole")
    with pytest.raises(rankwise.AdapterFileError, match=r"HF PEFT adapter .*import_peft"):
        rankwise.load(fresh, tmp_path / "peft")
    with pytest.raises(rankwise.AdapterFileError, match=r"does not exist$"):  # an empty folder: no hint to give
        rankwise.load(fresh, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()) and not rankwise.adapter_layers(fresh)
