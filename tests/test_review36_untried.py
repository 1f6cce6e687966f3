"""Review round 36: what rounds 30-32 did not try.

1. GoRA's calibration beside another adapter on a bitsandbytes 8-bit base (round 32 fixed 4-bit), and GoRA with
   ``ensure_weight_tying`` beside an adapter already on the tied pair: each gradient against autograd's on a float
   copy (found correct; kept as tests).
2. ``TieOutcome.note()`` lost its unreachable "not to a fully-trained copy" branch: a listed half of the tied pair
   always ties under the flag, which these tests pin down.
3. A half-enabled model's refusing pre-hook is registered once per hook table (a trained copy and its original share
   theirs), and the recovery leaves each table as it found it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import rankwise
from rankwise.state import adapter_layers, adapter_set
from test_review28_leftovers import RECOVERY, _fail_on_exit, _headed, _Interrupted, _tiny_tied_llama, _x
from test_review32_gora import _gradients_beside_a_lora, _quantised_pair


# ---------------------------------------------------------------------------- 1a. an 8-bit base
def test_gora_beside_a_lora_on_an_8bit_layer_takes_its_gradient_and_beside_a_dora_is_refused(tmp_path: Any) -> None:
    """Round 32's 4-bit case on ``Linear8bitLt`` (the same tap at the slot's layer): a trained LoRA on the int8
    ``q_proj`` layers, GoRA's calibration beside it on ``q_proj`` and ``v_proj`` equals autograd's ``.grad`` on the float
    model of the dequantised weights with the same LoRA (to 1e-6 on gradients of 1e-4 and more: bitsandbytes' 8-bit
    forward rounds its input rows too, so ``δ`` carries that rounding; a gradient missed would be off by itself); beside
    an active DoRA (rows rescaled) it is refused."""
    from test_quant import batch

    quantised, float_model = _quantised_pair(tmp_path, "int8")
    got, reference = _gradients_beside_a_lora(quantised, float_model)
    assert all(layer.quantized == "8bit" for layer in adapter_layers(quantised).values())
    for name, g in reference.items():
        assert float(g.abs().max()) > 1e-4
        torch.testing.assert_close(got[name], g, rtol=1e-3, atol=1e-6)
    dora, _ = _quantised_pair(tmp_path / "dora", "int8")
    rankwise.attach(dora, rankwise.DoraConfig(r=2, target_modules=["q_proj"]))
    config = rankwise.GoraConfig(r=4, r_min=2, r_max=8, n_steps=1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"rescale its rows.*attach GoRA before them"):
        rankwise.attach(dora, config, [batch(1)], name="g")


# ---------------------------------------------------------------------------- 1b. ensure_weight_tying beside an adapter
def _batches() -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in (1, 2):
        ids = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(seed))
        out.append({"input_ids": ids, "labels": ids})
    return out


def _moved_factors(model: nn.Module) -> None:
    """Every trainable tensor of ``default`` moved off its initial value (a zero ``B`` would hide a wrong gradient)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen))


def _tied_table_gradient(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Autograd's mean gradient of the loss w.r.t. the tied table (``vocab x dim``: every use, the embedding's and the
    head's), on a copy of the model as it computes (its other adapters active)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    table = ref.lm_head.base_layer().weight if isinstance(ref.lm_head, rankwise.AdapterLayer) else ref.lm_head.weight
    table.requires_grad_(True)
    for batch in batches:
        ref(**batch).loss.backward()
    assert table.grad is not None
    return table.grad / len(batches)


BESIDE = {  # the adapter already on the tied pair (or on one half of it)
    "lora-on-the-tied-pair": lambda: rankwise.LoraConfig(r=2, target_modules=["embed_tokens"], ensure_weight_tying=True),
    "lora-on-the-head": lambda: rankwise.LoraConfig(r=2, target_modules=["lm_head"]),
    "lora-on-the-embedding": lambda: rankwise.LoraConfig(r=2, target_modules=["embed_tokens"]),
    "tied-token-rows": lambda: rankwise.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5],
                                                   ensure_weight_tying=True),
}


@pytest.mark.filterwarnings("ignore:.*tie")
@pytest.mark.parametrize("beside", list(BESIDE))
def test_tied_gora_beside_an_adapter_on_the_tied_pair_starts_from_the_whole_table_s_gradient(beside: str) -> None:
    """GoRA ``g`` (``ensure_weight_tying``, on ``embed_tokens`` and ``q_proj``) attached beside a trained adapter on the
    tied pair of the brief's tiny Llama. Its embedding's update moves both uses (the head follows), so ``Ḡ`` is the tied
    table's whole gradient through the model as it computes: the initial update is ``−γ √(in / r) Ḡ P_A`` with ``Ḡ``
    autograd's (transposed: the embedding's ``out x in`` is ``dim x vocab``); with ``g`` alone active the logits are
    the base's with ``W0 + ΔWᵀ`` in the one table (the head follows ``g``); deleting the other adapter changes none."""
    model = _tiny_tied_llama()
    rankwise.attach(model, BESIDE[beside]().replace(seed=1))
    _moved_factors(model)
    batches = _batches()
    expected = _tied_table_gradient(model, batches).t().double()  # dim x vocab
    config = rankwise.GoraConfig(r=2, r_min=1, r_max=4, n_steps=2, gamma=0.05, seed=0, ensure_weight_tying=True,
                                 target_modules=["embed_tokens", "q_proj"])
    report = rankwise.attach(model, config, batches, name="g")
    assert report.tie is not None and dict(report.tie.tied) == {"lm_head": "model.embed_tokens"}
    layers = adapter_layers(model, "g")
    emb = layers["model.embed_tokens"]
    a = emb.lora_a.detach().double()
    projection = a.t() @ torch.linalg.solve(a @ a.t(), a)
    want = -config.gamma * math.sqrt(emb.in_features / emb.rank) * expected @ projection
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(emb.delta_weight().double(), want, rtol=1e-4, atol=1e-7)
    reference = _tiny_tied_llama()
    with torch.no_grad():
        reference.model.embed_tokens.weight += emb.delta_weight().t()  # the head's weight too: one table
        reference.model.layers[0].self_attn.q_proj.weight += layers["model.layers.0.self_attn.q_proj"].delta_weight()
        ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(9))
        want_logits = reference(input_ids=ids).logits
        rankwise.set_active(model, ["g"])
        torch.testing.assert_close(model(input_ids=ids).logits, want_logits, rtol=1e-5, atol=1e-5)
        rankwise.set_active(model, ["default", "g"])
        rankwise.delete(model, "default")
        torch.testing.assert_close(model(input_ids=ids).logits, want_logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- 2. a listed half of the tied pair ties
@pytest.mark.filterwarnings("error:.*tied nothing")
@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_a_tied_pair_half_in_modules_to_save_always_ties_under_the_flag(saved: list[str]) -> None:
    """The invariant that left ``TieOutcome.note()``'s "not to a fully-trained copy" branch (and the harness's
    ``check_tied`` one) unreachable: with ``ensure_weight_tying``, any half of the tied pair in ``modules_to_save``
    brings the other half, so the outcome ties the pair (no note, no warning, the harness's check passes) and the
    copies hold one table."""
    from rankwise_harness.sources import check_tied

    model = _tiny_tied_llama()
    report = rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=saved,
                                                        ensure_weight_tying=True))
    assert report.tie is not None and report.tie.met and report.tie.note() is None
    assert dict(report.tie.tied) == {"lm_head": "model.embed_tokens"}
    assert set(report.tie.trained_fully) == {"lm_head", "model.embed_tokens"}
    check_tied(report)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---------------------------------------------------------------------------- 3. one refusing hook per table
def _table(model: nn.Module) -> dict[int, Any]:
    """``layers.3``'s forward pre-hook table as a plain dict (its handle ids and hooks)."""
    return dict(model.layers[3]._forward_pre_hooks)


@pytest.mark.parametrize("where", ["head", "layer"])
def test_a_half_enabled_model_s_refusal_is_one_hook_per_table_and_the_recovery_leaves_the_user_s(
        where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA on ``layers.0-2``, ``layers.3`` trained fully, a user's forward pre-hook on the trained copy and another on
    the original (one table: ``slots.copy_module`` shares it). A failed ``disabled()`` exit (round 28's fault
    injection) adds exactly one refusing hook to that table; ``set_active`` removes it, leaving the user's two (same
    handle ids, same hooks, still called); the same again after a second failure. Before: the refusing hook went into
    the shared table twice (once through the copy, once through the original) and was removed twice."""
    model = _headed(False)
    trained = model.layers[3]
    original = adapter_set(model).adapters["default"].original_modules["layers.3"]
    assert original._forward_pre_hooks is trained._forward_pre_hooks
    calls: list[str] = []
    trained.register_forward_pre_hook(lambda m, a: calls.append("copy"))
    original.register_forward_pre_hook(lambda m, a: calls.append("original"))
    before = _table(model)
    assert len(before) == 2
    for _ in range(2):
        with pytest.raises(_Interrupted), rankwise.disabled(model):
            _fail_on_exit(monkeypatch, model, where)
        monkeypatch.undo()
        half = dict(model.get_submodule("layers.3")._forward_pre_hooks)
        assert len(half) == len(before) + 1 and all(half[k] is h for k, h in before.items())
        with pytest.raises(RuntimeError, match=rf"half enabled.*{RECOVERY}"), torch.no_grad():
            model(_x())
        rankwise.set_active(model, list(rankwise.active_adapters(model)))
        assert model.layers[3] is trained
        after = _table(model)
        assert after.keys() == before.keys() and all(after[k] is h for k, h in before.items())
        assert not adapter_set(model).half_enabled_hooks
        calls.clear()
        with torch.no_grad():
            model(_x())
        assert calls == ["copy", "original"]
