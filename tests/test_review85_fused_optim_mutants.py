"""Review round 85: mutants in the fused training node (``rankwise.fused``) and the optimizer bookkeeping
(``rankwise.optim``, LoRA+'s groups in ``rankwise.lifecycle``, RAC-LoRA's state reset) that the suite let through.

Each test's oracle is independent of the code it guards: torch's own node names for which path ran, a closed form
for a bias gradient, the reference path's autograd, HF PEFT's ``create_loraplus_optimizer``, HF ``Trainer``'s
weight-decay rule. The mutants and which test kills each: docs/reliability.md, review round 85.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ModelCase
from method_matrix import METHOD_CASES
from test_fused import IN, MAKERS, OUT, _base
from torch import Tensor, nn

import rankwise
from rankwise.fused import reference_path, use_fused
from rankwise.layer import AdapterLayer
from rankwise.optim import split_weight_decay

NODE = "LowRankLinearBackward"  # torch's name for the backward node of rankwise.fused.LowRankLinear


def _output_nodes(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, str]:
    """Each adapter layer's output node (``type(y.grad_fn).__name__``) in one forward: how to tell which path ran."""
    nodes: dict[str, str] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=name: nodes.__setitem__(n, type(out.grad_fn).__name__))
             for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    try:
        model(**batch).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return nodes


# ---------------------------------------------------------------------------- which path a training forward takes
@pytest.mark.parametrize("method", ["lora", "dora", "edora", "gora", "raclora", "cola"])
def test_a_training_step_of_an_attached_model_runs_every_adapted_linear_through_the_fused_node(
        bert_case: ModelCase, method: str) -> None:
    """The default setup (``attach`` with the method's defaults, dropout 0, a head trained fully, ``model.train()``):
    every adapted linear of a tiny BERT, the first layer's (whose input needs no gradient) included, runs the fused
    node, and the attach report says ``fused`` for each. A change that silently sends a training forward down the
    reference path gives the same numbers, so only the node shows it."""
    model = bert_case.make().train()
    cfg, calibration = METHOD_CASES[method].make(bert_case, True)
    report = rankwise.attach(model, cfg, calibration=calibration)
    assert report.layers and {row.path for row in report.layers} == {"fused"}
    nodes = _output_nodes(model, bert_case.batch(0))
    assert len(nodes) == len(report.layers) and set(nodes.values()) == {NODE}, nodes
    with reference_path():
        assert NODE not in _output_nodes(model, bert_case.batch(0)).values()


def test_a_nested_reference_path_block_lasts_to_the_end_of_the_outer_one() -> None:
    """``reference_path()`` inside ``reference_path()``: leaving the inner block keeps the outer block's reference
    path (a benchmark or test comparing against the reference path must not compare the node with itself); leaving
    the outer one brings the node back."""
    layer = MAKERS["lora"](_base("linear", torch.float32), 0.0)
    x = torch.randn(3, IN, requires_grad=True)
    with reference_path():
        with reference_path():
            assert type(layer(x).grad_fn).__name__ != NODE
        assert type(layer(x).grad_fn).__name__ != NODE
    assert type(layer(x).grad_fn).__name__ == NODE


def test_use_fused_keeps_its_contract_for_old_callers() -> None:
    """``use_fused(layer, *tensors)`` (kept for methods that call the node from their own forward): true for such a
    method's layer (no ``fused_inputs``) when a tensor needs a gradient and no dropout, base training, autocast or
    ``no_grad`` stands in the way; false where one does, as its first version (e9798ab) said. Before: for exactly
    such a layer the missing fused form short-circuited the other checks, so it said yes with dropout on or the
    base weight or bias trained."""

    class OldStyle(type(MAKERS["lora"](_base("linear", torch.float32), 0.0))):  # type: ignore[misc]
        fused_inputs = AdapterLayer.fused_inputs

    lora = MAKERS["lora"](_base("linear", torch.float32), 0.0)
    old = OldStyle(_base("linear", torch.float32), rankwise.LoraConfig(r=4, alpha=8, seed=0), 4)
    assert old.fused_path() == "reference: no fused form"
    a = old.lora_a
    for layer in (lora, old):
        assert use_fused(layer, a)
        assert not use_fused(layer, a.detach())
        with torch.no_grad():
            assert not use_fused(layer, a)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not use_fused(layer, a)
    dropped = OldStyle(_base("linear", torch.float32), rankwise.LoraConfig(r=4, alpha=8, dropout=0.1, seed=0), 4)
    assert not use_fused(dropped, a)  # before: True (the node skips dropout)
    for base_tensor in ("weight", "bias"):  # before: True (the node forms no gradient for the base)
        trained = OldStyle(_base("linear", torch.float32), rankwise.LoraConfig(r=4, alpha=8, seed=0), 4)
        getattr(trained, base_tensor).requires_grad_(True)
        assert not use_fused(trained, a)


# ---------------------------------------------------------------------------- a trained base bias
@pytest.mark.parametrize("method", MAKERS)
def test_a_trained_bias_of_an_adapted_layer_gets_its_gradient(method: str) -> None:
    """A user training the adapted layer's base bias beside the adapter (BitFit-style, PEFT's ``bias="lora_only"``):
    the bias is outside DoRA's ``μ``, so ``∂L/∂b = Σ_tokens ∂L/∂y`` for every method (closed form); the node forms no
    gradient for the base tensors, so the layer must take the reference path, and the adapter's gradients stay the
    reference path's."""
    layer = MAKERS[method](_base("linear", torch.float64), 0.0)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, IN, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    (y * weights).sum().backward()
    assert layer.bias.grad is not None, "the trained bias got no gradient"
    torch.testing.assert_close(layer.bias.grad, weights.reshape(-1, OUT).sum(0), rtol=1e-12, atol=1e-12)
    assert layer.weight.grad is None
    assert type(y.grad_fn).__name__ != NODE and layer.fused_path() == "reference: trainable base weight"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_compiled_training_forward_traces_the_fused_node(method: str) -> None:
    """``torch.compile`` of a training layer (outside any ``torch.func`` transform) traces the node: dynamo records
    the autograd Function as its ``autograd_function_apply`` operator, and the reference path as plain ops (under
    ``reference_path()``). The numbers are the same either way, so only the traced graph shows a compiled run
    silently losing the node (the step-aside for ``torch.func`` must not catch compilation)."""
    layer = MAKERS[method](_base("linear", torch.float32), 0.0)
    x = torch.randn(3, IN, requires_grad=True)
    for fused in (True, False):
        graphs: list[str] = []

        def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor], graphs: list[str] = graphs):
            graphs.append(gm.code)
            return gm.forward

        torch._dynamo.reset()
        with reference_path() if not fused else torch.enable_grad():
            torch.compile(layer, backend=backend, fullgraph=True)(x)
        assert len(graphs) == 1 and ("autograd_function_apply" in graphs[0]) is fused
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- weight-decay groups
class Affine(nn.LayerNorm):
    """A model's own LayerNorm under a name without "norm" (HF ``Trainer`` finds it by its type)."""


def _decayed_by_split(model: nn.Module) -> set[str]:
    from test_review6 import _decay_of

    groups = split_weight_decay(model, [{"params": [p for p in model.parameters() if p.requires_grad],
                                         "weight_decay": 0.1}])
    return {n for n, wd in _decay_of(torch.optim.AdamW(groups), model).items() if wd > 0}


@pytest.mark.parametrize("model_kind", ["llama", "layernorm-subclass"])
def test_weight_decay_skips_every_norm_hf_trainer_skips(model_kind: str) -> None:
    """Full fine-tuning's groups decay exactly HF ``Trainer``'s set (``get_decay_parameter_names``, the oracle):
    a Llama's ``LlamaRMSNorm`` (a model's own class, found by its name) and a LayerNorm subclass named ``Affine``
    (found by its type) are not decayed; their neighbours' weights are."""
    from conftest import EMBEDDING_CASE
    from test_review6 import _hf_decayed

    if model_kind == "llama":
        model = EMBEDDING_CASE().make()
        assert any(type(m).__name__ == "LlamaRMSNorm" and not isinstance(m, nn.RMSNorm) for m in model.modules())
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), Affine(4), nn.Linear(4, 2, bias=False))
    decayed = _decayed_by_split(model)
    assert decayed == _hf_decayed(model)
    assert decayed and not any("norm" in n or n.startswith("1.") for n in decayed)


# ---------------------------------------------------------------------------- LoRA+'s groups
@pytest.mark.parametrize("ratio", [0.5, 16.0])
def test_lora_plus_on_a_chain_that_trains_no_b_refuses_a_ratio_below_one_too(ratio: float) -> None:
    """RAC-LoRA ``frozen="B"`` trains only ``A``, which LoRA+ leaves at ``lr``: any ratio other than 1 changes nothing,
    so a ratio below 1 (a slower ``B``, as a sweep may try) is refused as one above 1 is."""
    from test_review17_chains import _attached

    _, model = _attached(frozen="B")
    with pytest.raises(ValueError, match=f"LoRA\\+ ratio {ratio:g} would change nothing"):
        rankwise.lora_plus_param_groups(model, lr=1e-3, ratio=ratio)


# ---------------------------------------------------------------------------- a RAC-LoRA link end
@pytest.mark.parametrize("frozen", ["A", "B", "alternate"])
def test_a_link_end_right_after_the_optimizer_step_leaves_no_gradient_on_the_factors(frozen: str) -> None:
    """README's loop calls ``rankwise.step`` after ``optimizer.step()``, before or after ``zero_grad``. Ended before
    it, the link's gradients are still there: the link end drops them with the moments, so nothing of the old link (the
    re-zeroed factor's gradient, the new sketch's) reaches a later step. ``test_raclora.py`` checks this after a loop
    that had already zeroed them."""
    from test_raclora import _batch, _model

    model = _model(frozen, link_steps=None)
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    model(**_batch(0)).loss.backward()
    opt.step()
    layers = rankwise.adapter_layers(model)
    assert all(t.grad is not None for layer in layers.values() for t in layer.link_trained())
    rankwise.end_link(model, opt)
    for layer in layers.values():
        assert layer.lora_a.grad is None and layer.lora_b.grad is None
        assert layer.lora_a not in opt.state and layer.lora_b not in opt.state
