"""Tiny randomly initialised transformers models of ten families, with their usual targets and batches, and the
method configs run on them: one home for review rounds 45 (fp32) and 48 (half precision).

GPT-2 (``Conv1D``, fused ``c_attn``), T5 (encoder-decoder, tied head), Qwen2 / Mistral (GQA: narrower ``k_proj`` /
``v_proj``), Gemma (a scaled embedding tied to the head, adapted), ViT and CLIP's vision tower (a ``Conv2d`` patch
embedding, adapted), Whisper (``Conv1d`` front end, adapted), Mixtral and Qwen2-MoE (fused 3-D experts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as hf
from torch import nn

import rankwise

Batch = dict[str, torch.Tensor]


def token_batch(seed: int) -> Batch:
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def seq2seq_batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 64, (2, 6), generator=g), "labels": torch.randint(1, 64, (2, 5), generator=g)}


def pixel_batch(seed: int) -> Batch:
    return {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))}


def audio_batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(2, 8, 16, generator=g), "labels": torch.randint(3, 64, (2, 5), generator=g)}


# family -> (model builder, the family's usual targets, batch maker)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], list[str], Callable[[int], Batch]]] = {
    "gpt2": (lambda: hf.GPT2LMHeadModel(hf.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        bos_token_id=0, eos_token_id=0)), ["c_attn", "c_proj", "c_fc"], token_batch),
    "t5": (lambda: hf.T5ForConditionalGeneration(hf.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4, dropout_rate=0,
        relative_attention_num_buckets=8, decoder_start_token_id=0)), ["q", "k", "v", "o", "wi", "wo"], seq2seq_batch),
    "qwen2-gqa": (lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)), ["q_proj", "k_proj", "v_proj", "o_proj"], token_batch),
    "mistral-gqa": (lambda: hf.MistralForCausalLM(hf.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=32)), ["q_proj", "k_proj", "v_proj", "o_proj"], token_batch),
    # Gemma: lm_head tied to a scaled embedding (GemmaTextScaledWordEmbedding: W[ids] * sqrt(hidden)), adapted too
    "gemma": (lambda: hf.GemmaForCausalLM(hf.GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32)),
        ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"], token_batch),
    "vit": (lambda: hf.ViTForImageClassification(hf.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=48, num_labels=3, hidden_dropout_prob=0, attention_probs_dropout_prob=0)),
        ["query", "value", "projection"], pixel_batch),  # projection: the Conv2d patch embedding
    "clip-vision": (lambda: hf.CLIPVisionModelWithProjection(hf.CLIPVisionConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=48, projection_dim=16)), ["q_proj", "v_proj", "patch_embedding"], pixel_batch),
    # Whisper: its encoder reads conv1.stride and conv2.stride in its forward
    "whisper": (lambda: hf.WhisperForConditionalGeneration(hf.WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=8,
        max_target_positions=16, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        ["q_proj", "v_proj", "conv1", "conv2"], audio_batch),
    "mixtral-moe": (lambda: hf.MixtralForCausalLM(hf.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)),
        ["q_proj", "v_proj"], token_batch),
    # Qwen2-MoE: fused routed experts beside a shared expert made of nn.Linear layers
    "qwen2-moe": (lambda: hf.Qwen2MoeForCausalLM(hf.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)),
        ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], token_batch),
}

METHODS: dict[str, Callable[[list[str]], rankwise.AdapterConfig]] = {
    "lora": lambda t: rankwise.LoraConfig(r=2, alpha=4, target_modules=t, seed=0),
    "dora": lambda t: rankwise.DoraConfig(r=2, alpha=4, target_modules=t, seed=0),
    "edora": lambda t: rankwise.EdoraConfig(r=2, alpha=4, sigma=0.0, target_modules=t, seed=0),
    "gora": lambda t: rankwise.GoraConfig(r_ref=2, r_min=1, r_max=4, alpha=4, n_steps=1, target_modules=t, seed=0),
    "raclora": lambda t: rankwise.RacLoraConfig(r=2, alpha=4, link_steps=1, target_modules=t, seed=0),
    "asymmetric": lambda t: rankwise.RacLoraConfig.asymmetric(r=2, alpha=4, target_modules=t, seed=0),
    "cola": lambda t: rankwise.RacLoraConfig.cola(r=2, alpha=4, link_steps=1, target_modules=t, seed=0),
}
IDENTITY_AT_INIT = {"lora", "dora", "edora", "raclora", "asymmetric", "cola"}  # GoRA's init is a step


def make_family(family: str) -> tuple[nn.Module, list[str], Callable[[int], Batch]]:
    """A fresh fp32 model of ``family`` in eval mode (seeded: the same weights each call), its targets, its batches."""
    build, targets, batch = FAMILIES[family]
    torch.manual_seed(0)
    return build().eval(), targets, batch


def main_output(out: Any) -> torch.Tensor:
    """A model output's logits (a vision tower with a projection: its image embeddings)."""
    return out.logits if getattr(out, "logits", None) is not None else out.image_embeds


def family_output(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's main output on ``batch``, without gradients."""
    with torch.no_grad():
        return main_output(model(**batch))


def family_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's loss, or (no labels: the vision towers) the mean square of its output."""
    out = model(**batch)
    return out.loss if getattr(out, "loss", None) is not None else main_output(out).pow(2).mean()
