"""Review round 21: trainable token rows (``trainable_token_indices``) and tied heads (``ensure_weight_tying``) tried
as a hostile user would (docs/reliability.md, "Review round 21"), against HF PEFT 0.21 and closed forms.

* the PEFT export of rows over a bf16 / fp16 base wrote them in the base's dtype, rounding ``W0[I] + D`` once more:
  a trained update below half a unit in the last place of ``W0`` was erased from the file (PEFT itself keeps and
  saves the rows in fp32), and ``import_peft`` of the export did not give the adapter back;
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import peft
import pytest
import torch
from conftest import EMBEDDING_CASE
from safetensors.torch import load_file
from torch import nn

import rankwise
from rankwise.state import token_layers

ROWS = [7, 3, 5]  # not sorted: D's row order is the config's


def _tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The tiny Llama of ``tests/conftest.py`` (``lm_head`` tied to ``embed_tokens``), in ``dtype``."""
    return EMBEDDING_CASE().make().to(dtype)


# ---------------------------------------------------------------------------- export over a half-precision base
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_export_over_a_half_precision_base_keeps_small_row_updates(dtype: torch.dtype, tmp_path: Path) -> None:
    """``D`` a thousandth of ``W0``'s rows (below half their ulp in bf16 / fp16): the exported rows are
    ``W0[I] + D`` in fp32, the dtype PEFT's own save of the same model writes, and ``import_peft`` of the export
    gives ``D`` back (to fp32 rounding); before, the rows were rounded to the base dtype and ``D`` came back as 0."""
    model = _tiny_llama(dtype)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=ROWS))
    layer = token_layers(model)["model.embed_tokens"]
    w0_rows = model.model.embed_tokens.weight.detach()[ROWS].float()  # k x dim
    with torch.no_grad():
        layer.token_delta.copy_(w0_rows * 1e-3)
    d = layer.token_delta.detach().clone()
    rankwise.export_peft(model, tmp_path / "ours")
    rows = load_file(tmp_path / "ours/adapter_model.safetensors")[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    theirs = peft.get_peft_model(_tiny_llama(dtype), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      trainable_token_indices=ROWS))
    theirs.save_pretrained(tmp_path / "peft")
    peft_rows = load_file(tmp_path / "peft/adapter_model.safetensors")[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert rows.dtype == peft_rows.dtype == torch.float32
    torch.testing.assert_close(rows, w0_rows + d, rtol=0, atol=0)
    back = token_layers(rankwise.import_peft(_tiny_llama(dtype), tmp_path / "ours"))["model.embed_tokens"]
    torch.testing.assert_close(back.token_delta.detach(), d, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------- GoRA on a tied pair
def _mean_tied_gradient(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Autograd's mean gradient of the loss w.r.t. the shared ``embed_tokens`` / ``lm_head`` weight (both uses), as
    the embedding's ``out x in`` (``dim x vocab``), fp64."""
    model = _tiny_llama()
    model.requires_grad_(False)
    weight = model.model.embed_tokens.weight
    weight.requires_grad_(True)
    total = torch.zeros_like(weight)
    for batch in batches:
        model(**batch).loss.backward()
        total += weight.grad
        weight.grad = None
    return (total / len(batches)).t().double()


def test_gora_s_tied_embedding_starts_from_the_gradient_of_both_uses() -> None:
    """GoRA's initial update ``ΔW = −γ √(in / r) · Ḡ · P_A`` (``P_A = Aᵀ(AAᵀ)⁻¹A``) for the embedding layer the tied
    head follows: ``Ḡ`` is the gradient of the loss w.r.t. the weight both uses share (the update moves both), from
    autograd here; before, the embedding's use alone (0.55 relative error)."""
    case = EMBEDDING_CASE()
    calibration = [case.batch(40), case.batch(41)]
    model = _tiny_llama()
    config = rankwise.GoraConfig(r_ref=2, r_min=1, r_max=3, alpha=4, n_steps=2, seed=0, ensure_weight_tying=True,
                                 target_modules=["lm_head", "q_proj"])
    rankwise.attach(model, config, calibration=calibration)
    emb = rankwise.adapter_layers(model)["model.embed_tokens"]
    a = emb.lora_a.detach().double()  # r x vocab
    projection = a.t() @ torch.linalg.solve(a @ a.t(), a)
    expected = -config.gamma * math.sqrt(emb.in_features / emb.rank) * _mean_tied_gradient(calibration) @ projection
    got = emb.delta_weight().double()  # dim x vocab
    assert float((got - expected).norm() / expected.norm()) < 1e-5


# ---------------------------------------------------------------------------- PEFT's TrainableTokensConfig
@pytest.mark.parametrize("tied", [True, False])
def test_peft_s_rows_alone_adapter_is_refused_naming_the_merge_that_keeps_its_outputs(tied: bool, tmp_path: Path) -> None:
    """A ``TrainableTokensConfig`` folder: ``import_peft`` refuses it by its type, naming ``merge_and_unload``, the
    model untouched; that remedy, then a rankwise adapter with rows on the merged model, computes PEFT's logits."""
    def base() -> nn.Module:
        model = _tiny_llama()
        if not tied:
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() * 0.5)
            model.config.tie_word_embeddings = False
        return model

    theirs = peft.get_peft_model(base(), peft.TrainableTokensConfig(token_indices=ROWS))
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].add_(0.5)
    theirs.save_pretrained(tmp_path)
    model = base()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="'TRAINABLE_TOKENS' adapter .*rows \\[7, 3, 5\\].*merge_and_unload"):
        rankwise.import_peft(model, tmp_path)
    assert not rankwise.adapter_layers(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    batch = EMBEDDING_CASE().batch(2)
    batch["input_ids"][0, :3] = torch.tensor(ROWS)  # the trained rows are read (untied: nothing else shows them)
    merged = peft.PeftModel.from_pretrained(base(), tmp_path).merge_and_unload()
    rankwise.attach(merged, rankwise.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=ROWS))
    with torch.no_grad():
        expected = theirs.eval()(**batch).logits
        assert not torch.allclose(expected, base()(**batch).logits, atol=1e-3)
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-6)


def test_a_rows_only_config_says_why_it_needs_a_low_rank_target() -> None:
    with pytest.raises(ValueError, match="must name at least one module: a rankwise adapter has low-rank layers.*"
                                         "TrainableTokensConfig"):
        rankwise.LoraConfig(target_modules=[], trainable_token_indices=[3])
