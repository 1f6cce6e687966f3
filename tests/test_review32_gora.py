"""Review round 32: GoRA's calibration among the newer features (several adapters, ``disabled()``, tied weights,
bitsandbytes bases, a user's gradients). Each test computes the gradient GoRA should start from with autograd on a
copy of the model and compares GoRA's mean gradient (``collect_gradients``) or its initial update with it."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import rankwise
from conftest import EMBEDDING_CASE, LinearStack
from rankwise.methods.gora_gradients import collect_gradients
from rankwise.state import adapter_layers, base_modules


def _with_trained_lora(model: nn.Module, targets: list[str]) -> None:
    """A LoRA adapter ``default`` on ``targets`` whose factors are random (as after training): its update is not 0."""
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=targets, seed=1))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapter_layers(model, "default").values():
            for t in (layer.lora_a, layer.lora_b):
                t.copy_(torch.randn(t.shape, generator=gen))


def _use_gradient(model: nn.Module, slot: str, batches: list[Any], loss: Any) -> torch.Tensor:
    """Autograd's mean gradient of ``loss`` w.r.t. the weight used in module ``slot`` alone (a copy of the model in
    which that slot's weight is a tensor of its own, so a tied partner's use adds nothing), ``out x in``."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    owner = ref.get_submodule(slot)
    own = nn.Parameter(owner.weight.detach().clone())
    owner._parameters["weight"] = own
    if hasattr(owner, "share_base"):  # an adapter layer: its base module reads the host's weight
        owner.share_base()
    for batch in batches:
        loss(ref, batch).backward()
    assert own.grad is not None
    return own.grad / len(batches)


def _llama_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


@pytest.mark.filterwarnings("ignore:.*tie")
def test_gora_beside_an_active_lora_on_a_tied_head_takes_that_head_s_gradient() -> None:
    """The tiny tied Llama with a trained LoRA on ``lm_head``; GoRA attached beside it on ``lm_head`` and ``q_proj``.
    Before: ``lm_head``'s weight is tied, so its gradient was tapped by a forward hook on the base ``Linear``, which
    the LoRA layer in the slot never calls (it computes ``x W0ᵀ`` itself): ``Ḡ`` was 0, silently (GoRA's least rank,
    ``B = 0``). Now the head's use's gradient, as autograd gives it on the model GoRA joins (base + LoRA); the tie,
    every ``requires_grad`` flag and ``.grad`` (a user's on the base weight, LoRA's on its factors) as before. ``q_proj``
    (no adapter there) was right before and is."""
    model = EMBEDDING_CASE().make()
    _with_trained_lora(model, ["lm_head"])
    batches = [EMBEDDING_CASE().batch(s) for s in (1, 2)]
    expected = _use_gradient(model, "lm_head", batches, _llama_loss)
    user_grad = torch.full_like(model.lm_head.weight, 0.5)
    model.lm_head.weight.grad = user_grad
    lora_a = adapter_layers(model, "default")["lm_head"].lora_a
    lora_a.grad = torch.ones_like(lora_a)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    q_proj = "model.layers.0.self_attn.q_proj"
    expected_q = _use_gradient(model, q_proj, batches, _llama_loss)
    config = rankwise.GoraConfig(r=2, r_min=1, r_max=4, n_steps=2, target_modules=["lm_head", q_proj])
    targets = {n: m for n, m in base_modules(model) if n in config.target_modules}
    grads, _ = collect_gradients(model, targets, config, batches, None)
    assert float(expected.abs().max()) > 0.1
    torch.testing.assert_close(grads["lm_head"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[q_proj], expected_q, rtol=1e-5, atol=1e-7)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.lm_head.weight.grad is user_grad and torch.equal(lora_a.grad, torch.ones_like(lora_a))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.filterwarnings("ignore:.*tie")
def test_gora_attached_beside_a_lora_on_a_tied_head_starts_from_that_gradient() -> None:
    """The same through ``attach(name="g")`` (``q_proj`` too: with ``lm_head`` alone the loss needed no gradient
    before, an error rather than a silent 0): GoRA's initial update ``s·B A = −γ √(in / r) · Ḡ · P_A``
    (``P_A = Aᵀ(AAᵀ)⁻¹A``) with ``Ḡ`` autograd's gradient of the head's use. Before: the update was 0."""
    model = EMBEDDING_CASE().make()
    _with_trained_lora(model, ["lm_head"])
    batches = [EMBEDDING_CASE().batch(s) for s in (1, 2)]
    expected = _use_gradient(model, "lm_head", batches, _llama_loss).double()
    config = rankwise.GoraConfig(r=2, r_min=1, r_max=4, n_steps=2, gamma=0.05, seed=0,
                                 target_modules=["lm_head", "q_proj"])
    rankwise.attach(model, config, batches, name="g")
    layer = adapter_layers(model, "g")["lm_head"]
    a = layer.lora_a.detach().double()
    update = layer.delta_weight().double()  # out x in
    projection = a.t() @ torch.linalg.solve(a @ a.t(), a)
    want = -config.gamma * math.sqrt(layer.in_features / layer.rank) * expected @ projection
    assert float(want.abs().max()) > 1e-4
    torch.testing.assert_close(update, want, rtol=1e-4, atol=1e-7)


def _quantised_pair(tmp_path: Any, kind: str = "nf4") -> tuple[nn.Module, nn.Module]:
    """test_quant's 2-layer Llama quantised (``kind``: one of test_quant's ``QUANTS``, nf4 by default) and as the float
    model of its dequantised weights (``tmp_path``: its folder)."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from test_quant import VOCAB, load_dequantized, load_quantized

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    return load_quantized(str(tmp_path), kind), load_dequantized(str(tmp_path), kind)


def test_gora_beside_a_lora_on_a_quantised_layer_takes_its_gradient(tmp_path: Any) -> None:
    """A trained LoRA on the nf4 ``q_proj`` layers, GoRA's calibration beside it on ``q_proj`` and ``v_proj``. Before:
    a quantised weight's gradient was tapped on the bitsandbytes module, which the LoRA layer in its slot never calls:
    ``q_proj``'s ``Ḡ`` was 0, silently. Now tapped on the slot's layer: equal to autograd's ``.grad`` on the float
    model of the dequantised weights with the same LoRA (as test_quant's check without a LoRA)."""
    quantised, reference = _gradients_beside_a_lora(*_quantised_pair(tmp_path))
    for name, g in reference.items():
        assert float(g.abs().max()) > 1e-4
        torch.testing.assert_close(quantised[name], g, rtol=1e-4, atol=1e-7)


def _gradients_beside_a_lora(quantised: nn.Module, float_model: nn.Module
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """GoRA's mean gradients (``collect_gradients``, on ``q_proj`` and ``v_proj``, 2 of test_quant's batches) with a
    trained LoRA on ``q_proj`` of each model of a :func:`_quantised_pair`: ``(the quantised model's, the float's)``."""
    from test_quant import batch

    batches = [batch(1000 + i) for i in range(2)]
    config = rankwise.GoraConfig(r=4, r_min=2, r_max=8, n_steps=2, target_modules=["q_proj", "v_proj"])
    grads = []
    for model in (quantised, float_model):
        _with_trained_lora(model, ["q_proj"])
        targets = {n: m for n, m in base_modules(model) if n.endswith(("q_proj", "v_proj"))}
        grads.append(collect_gradients(model, targets, config, batches, None)[0])
    return grads[0], grads[1]


def test_gora_beside_a_dora_on_a_quantised_layer_is_refused(tmp_path: Any) -> None:
    """Beside an active DoRA on a quantised layer ``δᵀ x`` at the slot is not ``W0``'s gradient (DoRA rescales the
    rows): refused, naming the remedies, the model unchanged; with a LoRA the active adapter instead it calibrates.
    Before: torch's "a leaf Variable that requires grad is being used in an in-place operation" (beside LoRA too)."""
    from test_quant import batch

    quantised, _ = _quantised_pair(tmp_path)
    rankwise.attach(quantised, rankwise.DoraConfig(r=2, target_modules=["q_proj"]))
    rankwise.attach(quantised, rankwise.LoraConfig(r=2, target_modules=["v_proj"]), name="plain")
    rankwise.set_active(quantised, ["default"])
    flags = {n: p.requires_grad for n, p in quantised.named_parameters()}
    config = rankwise.GoraConfig(r=4, r_min=2, r_max=8, n_steps=1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"rescale its rows.*attach GoRA before them.*set_active"):
        rankwise.attach(quantised, config, [batch(1)], name="g")
    assert rankwise.active_adapters(quantised) == ("default",)
    assert {n: p.requires_grad for n, p in quantised.named_parameters()} == flags
    rankwise.set_active(quantised, ["plain"])
    rankwise.attach(quantised, config, [batch(1)], name="g")
    assert set(rankwise.active_adapters(quantised)) == {"plain", "g"}
