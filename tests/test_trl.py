"""TRL's ``SFTTrainer`` on a model adapted by ``rankwise.attach``, with ``RankwiseCallback`` (issue 18).

A tiny Llama (2 layers, width 32) with the packaged MiniLM's tokenizer learns one repeated sentence:
the loss falls, only adapter tensors move, GoRA's calibration happens before the trainer exists, and
RAC-LoRA's links end inside ``SFTTrainer`` (one per ``link_steps`` optimizer steps, via the callback).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import rankwise
from conftest import minilm_path
from rankwise.integrations.hf import RankwiseCallback

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TEXT = "the quick brown fox jumps over the lazy dog and the cat sat on the mat"


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.eos_token = tok.sep_token  # a BERT tokenizer has no end-of-text token; SFTTrainer appends one
    return tok


def _tiny_llama(tok: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    return LlamaForCausalLM(cfg)


def _sft(model: torch.nn.Module, tok: Any, tmp_path: Path, steps: int, **kw: Any) -> Any:
    """An SFTTrainer with TRL's defaults except the size of the run (and CPU, no saving or reporting)."""
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=steps, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                         max_length=32, seed=0, **kw)
    data = datasets.Dataset.from_dict({"text": [TEXT] * 16})
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             callbacks=[RankwiseCallback()])
    trainer.train()
    return trainer


def _losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _frozen_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_sft_trainer_trains_lora_and_exports_to_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    tok = _tokenizer()
    model = _tiny_llama(tok)
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules="all-linear", seed=0))
    frozen = _frozen_snapshot(model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = _sft(model, tok, tmp_path, steps=8)
    losses = _losses(trainer)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)

    # the adapter TRL trained, saved and exported, serves in PEFT with rankwise.load's outputs
    rankwise.save(model, tmp_path / "adapter")
    rankwise.export_peft(model, tmp_path / "peft")
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    ours = _tiny_llama(tok)
    rankwise.load(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_tiny_llama(tok), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(input_ids=ids).logits, ours.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_sft_trainer_trains_gora_calibrated_before(tmp_path: Path) -> None:
    tok = _tokenizer()
    model = _tiny_llama(tok)
    enc = tok([TEXT] * 4, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]}
    cfg = rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=8, n_steps=2, target_modules="all-linear", seed=0)
    rankwise.attach(model, cfg, calibration=[batch, batch])
    ranks = {n: layer.rank for n, layer in rankwise.adapter_layers(model).items()}
    assert len(set(ranks.values())) > 1  # calibration allocated per-layer ranks
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = _sft(model, tok, tmp_path, steps=6, bf16=False)
    losses = _losses(trainer)
    assert losses[-1] < losses[0]
    assert {n: layer.rank for n, layer in rankwise.adapter_layers(model).items()} == ranks
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


def test_sft_trainer_ends_raclora_links(tmp_path: Path) -> None:
    tok = _tokenizer()
    model = _tiny_llama(tok)
    rankwise.attach(model, rankwise.RacLoraConfig(r=4, alpha=8, target_modules="all-linear", link_steps=3, seed=0))
    layers = rankwise.adapter_layers(model)
    assert {int(layer.links) for layer in layers.values()} == {0}
    trainer = _sft(model, tok, tmp_path, steps=7)
    # 7 optimizer steps at 3 steps per link: two links merged into the chain, the third in progress
    assert {int(layer.links) for layer in layers.values()} == {2}
    assert all(layer.chain_a.shape[0] > 0 for layer in layers.values())
    assert _losses(trainer)[-1] < _losses(trainer)[0]


def test_sft_trainer_default_bf16_autocasts_on_cpu(tmp_path: Path) -> None:
    """What README warns about: SFTConfig's default ``bf16=True`` runs the training forward under bf16
    autocast even on CPU, so its losses are not an fp32 forward's."""
    tok = _tokenizer()
    model = _tiny_llama(tok)
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules="all-linear", seed=0))
    seen: set[torch.dtype] = set()
    layer = rankwise.adapter_layers(model)["model.layers.0.mlp.down_proj"]
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    try:
        _sft(model, tok, tmp_path, steps=1)
    finally:
        hook.remove()
    assert seen == {torch.bfloat16}


# ---------------------------------------------------------------------------- DPO without a second model (issue 30)
PREFERENCES = {"prompt": ["the quick brown fox", "the cat sat"] * 4,
               "chosen": [" jumps over the lazy dog", " on the mat"] * 4,
               "rejected": [" sat on the mat", " jumps over the dog"] * 4}


def _dpo(model: torch.nn.Module, tok: Any, tmp_path: Path, **kw: Any) -> Any:
    """A DPOTrainer that precomputes the reference log-probs (TRL's path for a model that is not a PEFT model)."""
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                         max_length=32, seed=0, bf16=False, precompute_ref_log_probs=True)
    return trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(PREFERENCES),
                          processing_class=tok, **kw)


def _off_zero_lora(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``base`` with a LoRA already off zero (e.g. after SFT): the policy is not the base."""
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules="all-linear", seed=0))
    with torch.no_grad():
        for name, p in rankwise.trainable_parameters(model).items():
            if name.endswith("lora_b"):
                p.add_(0.05)
    return model


def test_dpo_reference_log_probs_come_from_the_same_model_under_disabled(tmp_path: Path) -> None:
    """The recipe: build the DPOTrainer inside ``rankwise.disabled`` with ``precompute_ref_log_probs``; the
    reference log-probs it stores equal those a deep-copied base model gives as ``ref_model``, bit for bit,
    with one model in memory; then DPO trains the adapter only."""
    tok = _tokenizer()
    base = _tiny_llama(tok)
    model = _off_zero_lora(base)
    with rankwise.disabled(model):
        ours = _dpo(model, tok, tmp_path / "ours")
    deep_copy = _dpo(copy.deepcopy(model), tok, tmp_path / "copy", ref_model=copy.deepcopy(base))
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert ours.train_dataset[column] == deep_copy.train_dataset[column]
    # outside the block the model is the policy: its log-probs are not the reference's (the test can fail)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    policy_chosen, _ = ours.compute_ref_log_probs(model, batch)
    assert not torch.allclose(policy_chosen, torch.tensor(ours.train_dataset["ref_chosen_logps"][:4]))
    frozen = _frozen_snapshot(model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ours.train()
    losses = _losses(ours)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


def test_dpo_reference_log_probs_are_not_taken_from_a_cache_of_the_adapted_model(tmp_path: Path) -> None:
    """TRL caches precomputed reference log-probs beside the dataset, keyed by a hash of ``model.state_dict()``. The
    state_dict was the same with the adapter on and inside ``rankwise.disabled``, so a DPOTrainer built by the recipe
    after one built without the block (an earlier attempt, or an earlier run on a dataset saved on disk) took the
    adapted model's log-probs as the reference, silently. Reference: a deep-copied base as ``ref_model``."""
    tok = _tokenizer()
    base = _tiny_llama(tok)
    model = _off_zero_lora(base)
    adapted = _dpo(model, tok, tmp_path)  # the adapter on: these are the policy's log-probs
    with rankwise.disabled(model):
        ours = _dpo(model, tok, tmp_path)  # the same dataset and arguments: the same cache file names
    expected = _dpo(copy.deepcopy(model), tok, tmp_path / "copy", ref_model=copy.deepcopy(base))
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert adapted.train_dataset[column] != expected.train_dataset[column]  # they differ: the test can fail
        assert ours.train_dataset[column] == expected.train_dataset[column], column
