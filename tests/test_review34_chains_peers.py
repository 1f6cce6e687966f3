"""Review round 34: EDoRA and RAC-LoRA among other adapters and switches.

1. A merged stack whose host is an EDoRA layer with a LoRA before it (``set_active(["l", "default"])``) loads
   another EDoRA's state (``model.load_state_dict``) and merges again with the *loaded* ``A`` and ``W0``: the norm
   terms are recomputed before the re-merge, not after it (the merged weight used the old ones).
2. Found correct, kept as tests: a RAC-LoRA chain's link ends never touch ``W0`` (the chain is a record beside it), so
   a LoRA peer computes, saves, loads and survives ``delete`` exactly; a link end inside ``disabled()`` or while the
   peer is merged changes no output; EDoRA beside an unmerged LoRA peer takes its SVD factors and magnitude from
   ``W0`` alone, and its cached norm terms stay bit for bit through merges, ``disabled()`` and the peer's deletion.

References are the spec's formulas (``/work/shared/specs/methods.md``) computed here in fp64 from the base weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor

import rankwise
from conftest import LinearStack
from rankwise.methods.raclora import end_link

TARGETS = ["layers.0", "layers.1"]


def _stack(seed: int) -> LinearStack:
    """A fresh ``LinearStack(2, 6)`` drawn from ``seed`` (the same seed: the same base)."""
    torch.manual_seed(seed)
    return LinearStack(2, 6)


def _x() -> Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(11))


def _forward(weights: list[Tensor], biases: list[Tensor], x: Tensor) -> Tensor:
    """``LinearStack``'s forward with the given ``out x in`` weights (fp64)."""
    h = x.double()
    for w, b in zip(weights, biases):
        h = torch.tanh(h @ w.double().t() + b.double())
    return h


def _moved(model: torch.nn.Module, name: str, *tensors: str) -> None:
    """Draw each named tensor of adapter ``name``'s layers from N(0, 0.5²), so no factor sits at its zero init (from a
    fixed generator: two models given the same adapter get the same values)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in rankwise.adapter_layers(model, name).values():
            for t in tensors:
                getattr(layer, t).normal_(0.0, 0.5, generator=generator)


# ---------------------------------------------------------------------------- 1. EDoRA host, merged stack, load_state_dict
def _edora_host_with_lora_first(seed: int, edora_seed: int) -> torch.nn.Module:
    """EDoRA (``default``, the host, random frozen factors from ``edora_seed``) and a LoRA ``l`` on the same layers,
    active as ``["l", "default"]``: EDoRA's row scale multiplies the LoRA's update (PEFT's order rule)."""
    model = _stack(seed)
    rankwise.attach(model, rankwise.EdoraConfig(r=2, alpha=2, target_modules=TARGETS, factors="random", seed=edora_seed))
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=2, target_modules=TARGETS, seed=1), name="l")
    _moved(model, "default", "core", "magnitude")
    _moved(model, "l", "lora_b")
    rankwise.set_active(model, ["l", "default"])
    return model.eval()


def _stacked_reference(model: torch.nn.Module) -> list[Tensor]:
    """Each layer's weight for ``["l", "default"]`` by the formulas: ``W' = μ ⊙ (W0 + ΔL) + m ⊙ s·BRA / ‖V‖_row``
    with ``V = W0 + s·BRA`` and ``μ = m / ‖V‖_row`` (DoRA's step over the updates before it), in fp64."""
    weights = []
    for name, edora in rankwise.adapter_layers(model, "default").items():
        lora = rankwise.adapter_layers(model, "l")[name]
        w0 = edora.unmerged_base_weight().double()
        delta_l = lora.scale * lora.lora_b.double() @ lora.lora_a.double()
        v = w0 + edora.scale * edora.frozen_b.double() @ edora.core.double() @ edora.frozen_a.double()
        mu = edora.magnitude.double() / v.norm(dim=1)
        weights.append(mu.unsqueeze(1) * (w0 + delta_l) + mu.unsqueeze(1) * (v - w0))
    return weights


def test_a_merged_stack_with_an_edora_host_merges_again_with_the_loaded_edora_s_norm() -> None:
    x = _x()
    other = _edora_host_with_lora_first(seed=1, edora_seed=9)  # another base, other frozen factors
    expected = _forward(_stacked_reference(other), [lay.bias for lay in other.layers], x)
    assert (other(x).double() - expected).abs().max() < 1e-5  # the reference is right where nothing was loaded

    model = _edora_host_with_lora_first(seed=0, edora_seed=5)
    rankwise.merge(model)
    model.load_state_dict(other.state_dict())
    assert all(layer.merged for layer in rankwise.adapter_layers(model, "default").values())
    assert (model(x).double() - expected).abs().max() < 1e-5  # merged with the loaded A and W0's norm
    rankwise.unmerge(model)
    assert (model(x).double() - expected).abs().max() < 1e-5


# ---------------------------------------------------------------------------- 2. RAC-LoRA beside a LoRA
def _lora_then_chain() -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, list[dict[str, Tensor]]]:
    """LoRA ``default`` (B moved off zero) and, on the same layers, a RAC-LoRA chain ``b`` trained 5 SGD steps with
    ``link_steps=2`` (two link ends). Returns the model, a copy taken before ``b`` was attached, ``b``'s optimizer and
    each layer's link products ``s·B_t A_t`` recorded just before each link end (by hand, from the factors)."""
    model = _stack(0)
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=2, target_modules=TARGETS, seed=1))
    _moved(model, "default", "lora_b")
    before = copy.deepcopy(model)
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=2, target_modules=TARGETS, link_steps=2, seed=3), name="b")
    rankwise.set_active(model, "b")
    layers = rankwise.adapter_layers(model, "b")
    opt = torch.optim.SGD([p for lay in layers.values() for p in lay.parameters() if p.requires_grad], lr=0.5)
    products: list[dict[str, Tensor]] = []
    x = _x()
    for i in range(5):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        if i % 2 == 1:  # this step ends a link
            products.append({n: lay.scale * lay.lora_b.detach().double() @ lay.lora_a.detach().double()
                             for n, lay in layers.items()})
        rankwise.step(model, opt, name="b")
    assert [int(lay.links) for lay in layers.values()] == [2, 2]
    return model, before, opt, products


def test_a_chain_s_link_ends_leave_w0_and_a_lora_peer_exact_and_the_chain_is_its_links_sum(tmp_path: Path) -> None:
    model, before, _, products = _lora_then_chain()
    x, base = _x(), _stack(0)
    for lay, orig in zip(model.layers, base.layers):
        assert torch.equal(lay.weight, orig.weight)  # no link end wrote into the shared W0
    chain = rankwise.adapter_layers(model, "b")
    weights = [orig.weight.double() + sum(p[n] for p in products)
               + lay.scale * lay.lora_b.detach().double() @ lay.lora_a.detach().double()
               for (n, lay), orig in zip(chain.items(), base.layers)]
    assert (model(x).double() - _forward(weights, [b.bias for b in base.layers], x)).abs().max() < 1e-5
    with rankwise.disabled(model):
        assert torch.equal(model(x), base(x))
    rankwise.set_active(model, "default")
    assert torch.equal(model(x), before(x))
    rankwise.save(model, tmp_path / "default", name="default")
    assert torch.equal(rankwise.load(_stack(0), tmp_path / "default")(x), before(x))
    rankwise.set_active(model, "b")
    chained = model(x)
    rankwise.save(model, tmp_path / "b", name="b")
    assert torch.equal(rankwise.load(_stack(0), tmp_path / "b")(x), chained)
    rankwise.delete(model, "b")
    assert torch.equal(model(x), before(x))


def test_a_link_end_inside_disabled_or_beside_a_merged_peer_changes_no_output() -> None:
    model, _, opt, _ = _lora_then_chain()
    x = _x()
    rankwise.set_active(model, ["default", "b"])
    both = model(x)
    with rankwise.disabled(model):
        end_link(model, opt, "b")
        assert torch.equal(model(x), _stack(0)(x))
    assert (model(x) - both).abs().max() < 1e-6  # the link moved into the chain: rounding only
    rankwise.merge(model, "default")  # b idle
    merged = [lay.weight.detach().clone() for lay in model.layers]
    end_link(model, opt, "b")
    assert all(torch.equal(lay.weight, w) for lay, w in zip(model.layers, merged))  # the merged bits untouched
    rankwise.unmerge(model)
    assert all(torch.equal(lay.weight, orig.weight) for lay, orig in zip(model.layers, _stack(0).layers))
    rankwise.set_active(model, ["default", "b"])
    assert (model(x) - both).abs().max() < 1e-6
    assert [int(lay.links) for lay in rankwise.adapter_layers(model, "b").values()] == [4, 4]


# ---------------------------------------------------------------------------- 2. EDoRA beside a LoRA
def test_edora_beside_a_lora_peer_takes_w0_alone_and_keeps_its_norm_through_merges_disabled_and_delete() -> None:
    model = _stack(0)
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=2, target_modules=TARGETS, seed=1))
    _moved(model, "default", "lora_b")
    rankwise.attach(model, rankwise.EdoraConfig(r=2, alpha=2, target_modules=TARGETS), name="e")
    edora = rankwise.adapter_layers(model, "e")
    base = _stack(0)
    for lay, orig in zip(edora.values(), base.layers):
        w0 = orig.weight.double()
        u, s, vh = torch.linalg.svd(w0)
        best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart–Young: the best rank-2 approximation of W0 (not W0 + ΔLoRA)
        assert (lay.frozen_b.double() @ lay.frozen_a.double() - best).abs().max() < 1e-5
        assert (lay.magnitude.double() - w0.norm(dim=1)).abs().max() < 1e-6
    _moved(model, "e", "core", "magnitude")
    terms = {n: [t.clone() for t in (lay.norm_scale, lay.norm_n0, lay.norm_c, lay.norm_k)] for n, lay in edora.items()}
    model.eval()
    x = _x()
    for order in (["default", "e"], ["e", "default"]):
        rankwise.set_active(model, order)
        unmerged = model(x)
        for _ in range(2):
            rankwise.merge(model)
            with rankwise.disabled(model):
                assert torch.equal(model(x), base(x))
            assert (model(x) - unmerged).abs().max() < 1e-5
            rankwise.unmerge(model)
        assert torch.equal(model(x), unmerged)
    rankwise.delete(model, "default")
    for n, lay in edora.items():
        assert all(torch.equal(a, b) for a, b in zip(terms[n], (lay.norm_scale, lay.norm_n0, lay.norm_c, lay.norm_k)))
    weights = []
    for lay, orig in zip(edora.values(), base.layers):
        v = orig.weight.double() + lay.scale * lay.frozen_b.double() @ lay.core.double() @ lay.frozen_a.double()
        weights.append(lay.magnitude.double().unsqueeze(1) * v / v.norm(dim=1, keepdim=True))
    assert (model(x).double() - _forward(weights, [b.bias for b in base.layers], x)).abs().max() < 1e-5


# ---------------------------------------------------------------------------- 3. EDoRA as a peer through model.to(dtype)
def _terms(layer: torch.nn.Module) -> list[Tensor]:
    return [t.clone() for t in (layer.norm_scale, layer.norm_n0, layer.norm_c, layer.norm_k)]


def test_an_edora_peer_s_norm_terms_follow_its_host_s_converted_w0_as_a_host_s_do() -> None:
    """``model.to(torch.bfloat16)`` converts a host's submodules (its peers) before its own ``W0``: a peer EDoRA
    recomputed its norm terms from the fp32 ``W0`` while its forward then ran on the bf16 one."""
    alone = _stack(0)
    rankwise.attach(alone, rankwise.EdoraConfig(r=2, alpha=2, target_modules=TARGETS, seed=4), name="e")
    beside = _stack(0)
    rankwise.attach(beside, rankwise.LoraConfig(r=2, alpha=2, target_modules=TARGETS, seed=1))
    rankwise.attach(beside, rankwise.EdoraConfig(r=2, alpha=2, target_modules=TARGETS, seed=4), name="e")
    rankwise.set_active(beside, "e")
    for model in (alone, beside):
        _moved(model, "e", "core")
        model.to(torch.bfloat16)
    x = _x().to(torch.bfloat16)
    for model in (alone, beside):
        for layer in rankwise.adapter_layers(model, "e").values():
            assert layer.weight.dtype == torch.bfloat16
            held = _terms(layer)
            layer.precompute_norm_terms()  # the terms of the W0 the layer computes with now
            assert all(torch.equal(a, b) for a, b in zip(held, _terms(layer)))
    assert torch.equal(beside(x), alone(x))
