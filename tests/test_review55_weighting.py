"""Review round 55 (2026-12-07): weighting and combining adapters, ``rankwise.scaled`` / ``rankwise.combine``
(docs/reliability.md).

Oracles: closed forms from each layer's factors by the paper's formula (``method_matrix.paper_delta``), DoRA's
``m · (W0 + s·B A) / ‖W0 + s·B A‖_row`` by hand, the SVD's tail (Eckart–Young), the model's own ``disabled()`` and
one-adapter paths, and HF PEFT 0.21's ``rescale_adapter_scale`` / ``add_weighted_adapter`` on the same adapters
exported with ``rankwise.export_peft``.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONV_CASE, EMBEDDING_CASE, ModelCase, make_model_case, perturb_trainable
from method_matrix import METHOD_CASES, MethodCase, paper_delta
from test_review51_per_example import _two as _two_adapters
from torch import Tensor, nn

import rankwise

CASE = make_model_case("mlp")  # TinyMLP: fc1 12 -> 16, fc2 16 -> 16
DORA_FAMILY = ("dora", "edora", "edora-random")
LORA_FORM = [m for m in METHOD_CASES if m not in DORA_FAMILY]
WEIGHTS = {"default": 0.7, "b": -0.4}


def _two(method: MethodCase, head: bool = False) -> nn.Module:
    """Round 51's two adapters on the MLP (``test_review51_per_example._two``): ``method``'s "default" on fc1 and fc2
    trained 3 steps (RAC-LoRA crosses a link end: a chain record), its "b" on fc2 only, every trained tensor moved off
    its init; eval mode."""
    return _two_adapters(CASE, method, head)


def _out(model: nn.Module, seed: int = 7) -> Tensor:
    with torch.no_grad():
        return CASE.output(model, CASE.batch(seed))


def _layer(model: nn.Module, slot: str, name: str) -> Any:
    return next(layer for s, layer in rankwise.state.every_layer(model) if s == slot and layer.adapter_name == name)


def _snapshot(model: nn.Module) -> list[Any]:
    """Every layer's scale and tensors, and the adapters' names and active set: what a refusal must leave."""
    out: list[Any] = [sorted(rankwise.state.adapter_set(model).adapters), rankwise.active_adapters(model)]
    for slot, layer in rankwise.state.every_layer(model):
        out.append((slot, layer.adapter_name, layer.scale, getattr(layer, "chain_factor", None), layer.merged))
        out.extend((k, v.clone()) for k, v in layer.state_dict().items())
    return out


def _same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], Tensor):
            assert x[0] == y[0] and torch.equal(x[1], y[1]), x[0]
        else:
            assert x == y


def _dora_delta(layer: Any) -> Tensor:
    """A DoRA-family layer's ΔW by hand (fp64): ``m · V / ‖V‖_row − W0``, ``V = W0 + paper_delta``."""
    w0 = layer.unmerged_base_weight().double()
    v = w0 + paper_delta(layer)
    return layer.magnitude.detach().double().unsqueeze(1) * v / v.norm(dim=1, keepdim=True) - w0


def _hand_delta(layer: Any) -> Tensor:
    return _dora_delta(layer) if hasattr(layer, "magnitude") else paper_delta(layer)


# ---------------------------------------------------------------------------- the registry
def test_every_registered_method_is_in_this_round_s_matrix() -> None:
    covered = {METHOD_CASES[m].make(CASE, False)[0].method for m in METHOD_CASES}
    assert set(rankwise.all_methods()) <= covered


# ---------------------------------------------------------------------------- scaled
@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_scaled_one_changes_nothing_and_the_exit_restores_bit_for_bit(method: str) -> None:
    model = _two(METHOD_CASES[method])
    rankwise.set_active(model, ["default", "b"])
    before, snap = _out(model), _snapshot(model)
    with rankwise.scaled(model, 1.0):
        assert torch.equal(_out(model), before)
    with pytest.raises(KeyError), rankwise.scaled(model, 0.3):
        assert not torch.equal(_out(model), before)
        raise KeyError("inside")
    _same(_snapshot(model), snap)
    assert torch.equal(_out(model), before)


@pytest.mark.parametrize("method", LORA_FORM)
def test_scaled_zero_is_the_base_model(method: str) -> None:
    model = _two(METHOD_CASES[method])
    with rankwise.disabled(model):
        base = _out(model)
    with rankwise.scaled(model, 0):
        assert torch.equal(_out(model), base)


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_scaled_update_matches_the_closed_form(method: str) -> None:
    """LoRA form: ΔW(f) = f · ΔW, linear in f (nested blocks multiply). DoRA family: the scale inside the direction,
    ``m · (W0 + f·s·B A) / ‖·‖_row`` (PEFT's rescale), by hand."""
    model = _two(METHOD_CASES[method])
    layers = {slot: layer for slot, layer in rankwise.state.every_layer(model)}
    hand = {slot: _hand_delta(layer) for slot, layer in layers.items()}
    with rankwise.scaled(model, 2.0), rankwise.scaled(model, -0.75):  # f = -1.5
        for slot, layer in layers.items():
            got = layer.delta_weight().double()
            if hasattr(layer, "magnitude"):
                w0 = layer.unmerged_base_weight().double()
                v = w0 + paper_delta(layer)  # paper_delta reads the rescaled s inside the block
                want = layer.magnitude.detach().double().unsqueeze(1) * v / v.norm(dim=1, keepdim=True) - w0
            else:
                want = -1.5 * hand[slot]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(layer.delta_forward(x).double(), x.double() @ got.t(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "lora-rs", "dora", "edora", "raclora", "cola"])
def test_scaled_matches_peft_rescale_adapter_scale(method: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from peft.helpers import rescale_adapter_scale

    model = _two(METHOD_CASES[method])
    rankwise.delete(model, "b")
    rankwise.export_peft(model, tmp_path)
    theirs = PeftModel.from_pretrained(CASE.make(), tmp_path).eval()
    for factor in (0.37, 0.0, -2.0):
        with rankwise.scaled(model, factor), rescale_adapter_scale(theirs, factor):
            torch.testing.assert_close(_out(model), _out(theirs), rtol=1e-5, atol=1e-6)


def test_scaled_refuses_bad_factors_and_states_changing_nothing(tmp_path: Path) -> None:
    model = _two(METHOD_CASES["raclora"])
    snap = _snapshot(model)
    for bad, error in ((float("nan"), ValueError), (float("inf"), ValueError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(error, match="factor"), rankwise.scaled(model, bad):
            pass
    with rankwise.per_example(model, ["default", None]), pytest.raises(RuntimeError, match="per_example"):
        with rankwise.scaled(model, 0.5):
            pass
    rankwise.merge(model)
    with pytest.raises(ValueError, match="unmerge"), rankwise.scaled(model, 0.5):
        pass
    rankwise.unmerge(model)
    _same(_snapshot(model), snap)
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    with rankwise.scaled(model, 0.5):
        inside = _snapshot(model)
        for call in (lambda: rankwise.merge(model), lambda: rankwise.save(model, tmp_path / "s"),
                     lambda: rankwise.export_peft(model, tmp_path / "p"), lambda: rankwise.set_active(model, "b"),
                     lambda: rankwise.combine(model, {"default": 1.0}, "c"), lambda: rankwise.delete(model, "b"),
                     lambda: rankwise.methods.raclora.end_link(model, opt, name="default"),
                     lambda: rankwise.step(model, opt, name="default"),  # this step would end a link
                     lambda: rankwise.methods.raclora.compress_chain(model, 2, name="default")):
            with pytest.raises(RuntimeError, match="rankwise.scaled"):
                call()
        _same(_snapshot(model), inside)
        with rankwise.disabled(model):  # allowed: the base model
            pass
    _same(_snapshot(model), snap)
    assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------- combine
@pytest.mark.parametrize("method", LORA_FORM)
def test_combine_cat_is_exact_and_idle(method: str) -> None:
    model = _two(METHOD_CASES[method])
    before, active = _out(model), rankwise.active_adapters(model)
    rankwise.combine(model, WEIGHTS, "ab")
    assert rankwise.active_adapters(model) == active and torch.equal(_out(model), before)  # idle until set_active
    for slot in CASE.targets:
        want = sum(w * _hand_delta(_layer(model, slot, n)) for n, w in WEIGHTS.items()
                   if any(s == slot and la.adapter_name == n for s, la in rankwise.state.every_layer(model)))
        new = _layer(model, slot, "ab")
        assert type(new) is rankwise.methods.lora.LoraLinear and new.scale == 1.0
        torch.testing.assert_close(new.delta_weight().double(), want, rtol=1e-5, atol=1e-6)
    ranks = {(slot, n): _layer(model, slot, n).peft_factors().lora_a.shape[0]
             for slot, n in (("fc1", "default"), ("fc2", "default"), ("fc2", "b"))}
    assert _layer(model, "fc1", "ab").rank == ranks["fc1", "default"]  # Σ r_i over the adapters there
    assert _layer(model, "fc2", "ab").rank == ranks["fc2", "default"] + ranks["fc2", "b"]


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_combine_svd_error_is_the_tail_of_the_singular_values(method: str) -> None:
    model = _two(METHOD_CASES[method])
    rankwise.combine(model, WEIGHTS, "ab", how="svd", rank=3)
    rankwise.combine(model, WEIGHTS, "full", how="svd", rank=100)  # min(in, out): exact
    for slot in CASE.targets:
        want = sum(w * _hand_delta(_layer(model, slot, n)) for n, w in WEIGHTS.items()
                   if any(s == slot and la.adapter_name == n for s, la in rankwise.state.every_layer(model)))
        sigma = torch.linalg.svdvals(want)
        got = _layer(model, slot, "ab").delta_weight().detach().double()
        assert _layer(model, slot, "ab").rank == 3
        error = float(torch.linalg.matrix_norm(want - got))
        assert error == pytest.approx(float(sigma[3:].square().sum().sqrt()), rel=1e-4, abs=1e-6)
        torch.testing.assert_close(_layer(model, slot, "full").delta_weight().double(), want, rtol=1e-5, atol=1e-6)


def _peft_pair(model: nn.Module, tmp_path: Path) -> Any:
    from peft import PeftModel

    rankwise.export_peft(model, tmp_path / "pair")  # "default" there, "b" in pair/b
    theirs = PeftModel.from_pretrained(CASE.make(), tmp_path / "pair").eval()
    theirs.load_adapter(tmp_path / "pair" / "b", adapter_name="b")
    return theirs


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_combine_matches_peft_add_weighted_adapter(how: str, tmp_path: Path) -> None:
    model = _two(METHOD_CASES["lora"])
    theirs = _peft_pair(model, tmp_path)
    rankwise.combine(model, WEIGHTS, "ab", how=how, rank=None if how == "cat" else 3)
    theirs.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "ab", combination_type=how,
                                **({} if how == "cat" else {"svd_rank": 3}))
    for slot in CASE.targets:
        peft_layer = theirs.base_model.model.get_submodule(slot)
        pa, pb = peft_layer.lora_A["ab"].weight, peft_layer.lora_B["ab"].weight
        new = _layer(model, slot, "ab")
        assert peft_layer.scaling["ab"] == new.scale == 1.0
        if how == "cat" and slot == "fc2":  # both adapters here: PEFT's very tensors, bit for bit
            assert torch.equal(new.lora_a, pa) and torch.equal(new.lora_b, pb)
        torch.testing.assert_close(new.lora_b @ new.lora_a, pb @ pa, rtol=1e-5, atol=1e-6)
    rankwise.set_active(model, "ab")
    theirs.set_adapter("ab")
    torch.testing.assert_close(_out(model), _out(theirs), rtol=1e-5, atol=1e-6)


def test_combined_adapter_saves_loads_merges_exports_and_runs_per_example(tmp_path: Path) -> None:
    from peft import PeftModel

    model = _two(METHOD_CASES["gora"])
    rankwise.combine(model, WEIGHTS, "ab")
    rankwise.set_active(model, "ab")
    want = _out(model)
    rankwise.save(model, tmp_path / "saved", name="ab")
    fresh = rankwise.load(CASE.make(), tmp_path / "saved")
    torch.testing.assert_close(_out(fresh), want, rtol=0, atol=0)
    rankwise.export_peft(model, tmp_path / "peft", name="ab")
    torch.testing.assert_close(_out(PeftModel.from_pretrained(CASE.make(), tmp_path / "peft").eval()), want,
                               rtol=1e-5, atol=1e-6)
    rankwise.merge(model)
    torch.testing.assert_close(_out(model), want, rtol=1e-5, atol=1e-6)
    rankwise.unmerge(model)
    rankwise.set_active(model, "default")
    batch = CASE.batch(7)
    with torch.no_grad(), rankwise.per_example(model, ["ab", "default", None, "ab", "b", "ab", None, "default"]):
        mixed = CASE.output(model, batch)
    torch.testing.assert_close(mixed[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[5], want[5], rtol=1e-5, atol=1e-6)


def test_combine_refusals_change_nothing() -> None:
    model = _two(METHOD_CASES["dora"])
    snap, before = _snapshot(model), _out(model)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"weights": {"nope": 1.0}, "name": "c"}, ValueError, "no adapter named"),
        ({"weights": {}, "name": "c"}, ValueError, "non-empty"),
        ({"weights": {None: 1.0}, "name": "c"}, ValueError, "adapter names"),
        ({"weights": {"default": float("nan")}, "name": "c"}, ValueError, "finite"),
        ({"weights": {"default": 1.0}, "name": "c", "how": "linear"}, ValueError, "how must be"),
        ({"weights": {"default": 1.0}, "name": "c", "rank": 2}, ValueError, "rank must be None"),
        ({"weights": {"default": 1.0}, "name": "c", "how": "svd", "rank": 0}, ValueError, "rank must be"),
        ({"weights": {"default": 1.0}, "name": "b"}, ValueError, "already has an adapter named"),
        ({"weights": {"default": 1.0}, "name": "c"}, ValueError, "use how='svd'"),  # DoRA: no cat
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            rankwise.combine(model, **kwargs)
    with rankwise.disabled(model), pytest.raises(RuntimeError, match="disabled"):
        rankwise.combine(model, {"default": 1.0}, "c", how="svd")
    rankwise.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        rankwise.combine(model, {"default": 1.0}, "c", how="svd")
    rankwise.unmerge(model)
    _same(_snapshot(model), snap)
    assert torch.equal(_out(model), before)


def test_combine_refuses_heads_and_a_cat_rank_past_the_layer() -> None:
    model = _two(METHOD_CASES["lora"], head=True)
    with pytest.raises(ValueError, match="modules_to_save"):
        rankwise.combine(model, {"default": 1.0}, "c")
    model = CASE.make()
    rankwise.attach(model, rankwise.LoraConfig(r=8, target_modules=["fc1"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=8, target_modules=["fc1"], seed=1), name="b")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="exceeds min"):  # 8 + 8 > 12 = fc1's in
        rankwise.combine(model, {"default": 1.0, "b": 1.0}, "c")
    _same(_snapshot(model), snap)
    rankwise.combine(model, {"default": 1.0, "b": 1.0}, "c", how="svd", rank=12)  # exact there


@pytest.mark.parametrize("which", ["embedding-tied", "conv"])
def test_combine_on_embeddings_tied_heads_and_convolutions(which: str, tmp_path: Path) -> None:
    """Each module's new update is ``Σ w_i ΔW_i`` of the sources' layers there (their ``delta_weight``, which the
    invariant matrix checks against PEFT): an ``nn.Embedding``, a head tied to it (``ensure_weight_tying``: the new
    adapter's head is a plain LoRA of ``Σ w_i ΔW_i``), a convolution. The tied case exported computes in PEFT what it
    computes here (PEFT's own ``add_weighted_adapter`` leaves the tied head's update out: docs/reliability.md)."""
    from peft import PeftModel

    case: ModelCase = EMBEDDING_CASE() if which == "embedding-tied" else CONV_CASE()
    model = case.make()
    extra = {"ensure_weight_tying": True, "target_modules": [*case.targets, "lm_head"]} if which == "embedding-tied" \
        else {"target_modules": case.targets}
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, seed=0, **extra))
    rankwise.attach(model, rankwise.LoraConfig(r=3, alpha=3, seed=1, target_modules=case.targets[-1:]), name="b")
    perturb_trainable(model, 3)
    model.eval()
    weights = {"default": 0.6, "b": -1.2}
    rankwise.combine(model, weights, "cat")
    rankwise.combine(model, weights, "svd", how="svd", rank=100)  # min(in, out) on each layer: exact
    layers = list(rankwise.state.every_layer(model))
    for slot in {s for s, _ in layers}:
        want = sum(weights[la.adapter_name] * la.delta_weight().detach().double() for s, la in layers
                   if s == slot and la.adapter_name in weights)
        for new in ("cat", "svd"):
            got = next(la for s, la in layers if s == slot and la.adapter_name == new).delta_weight().detach().double()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if which == "embedding-tied":
        rankwise.set_active(model, "cat")
        rankwise.export_peft(model, tmp_path, name="cat")
        theirs = PeftModel.from_pretrained(case.make(), tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(case.output(theirs, case.batch(5)), case.output(model, case.batch(5)),
                                       rtol=1e-5, atol=1e-5)
        from peft.helpers import rescale_adapter_scale  # the tied head's own scale copy rescaled too

        rankwise.set_active(model, "default")
        rankwise.export_peft(model, tmp_path / "default", name="default")
        tied = PeftModel.from_pretrained(case.make(), tmp_path / "default").eval()
        with torch.no_grad(), rankwise.scaled(model, 0.3), rescale_adapter_scale(tied, 0.3):
            torch.testing.assert_close(case.output(tied, case.batch(5)), case.output(model, case.batch(5)),
                                       rtol=1e-5, atol=1e-5)


def test_per_example_inside_scaled_runs_each_row_rescaled() -> None:
    """Each row of a mixed batch inside ``scaled`` equals the row alone with its adapters made active (``set_active``
    before the block; ``disabled()`` for ``None``) inside ``scaled``."""
    model = _two(METHOD_CASES["dora"])
    names: list[Any] = ["b", None, "default", ["default", "b"]]
    batch = {k: v[:4] for k, v in CASE.batch(7).items()}
    with torch.no_grad(), rankwise.scaled(model, 0.4), rankwise.per_example(model, names):
        mixed = CASE.output(model, batch)
    for i, entry in enumerate(names):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        if entry is not None:
            rankwise.set_active(model, entry)
        with torch.no_grad(), rankwise.scaled(model, 0.4), rankwise.disabled(model) if entry is None else nullcontext():
            alone = CASE.output(model, one)
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    with rankwise.per_example(model, names), pytest.raises(RuntimeError, match="per_example"):
        with rankwise.scaled(model, 0.4):
            pass


def test_combine_inside_inference_mode_gives_a_trainable_adapter() -> None:
    model = _two(METHOD_CASES["lora"])
    with torch.inference_mode():
        rankwise.combine(model, WEIGHTS, "ab", how="svd", rank=2)
    layer = _layer(model, "fc2", "ab")
    assert not layer.lora_a.is_inference() and layer.lora_a.requires_grad
    rankwise.set_active(model, "ab")
    model(**CASE.batch(1)).loss.backward()
    assert layer.lora_b.grad is not None


def test_scaled_leaves_token_rows_as_peft_does(tmp_path: Path) -> None:
    """Token rows (``trainable_token_indices``) keep their update inside ``scaled``, as PEFT's
    ``rescale_adapter_scale`` (LoRA layers only): outputs equal PEFT's on the exported adapter."""
    from peft import PeftModel
    from peft.helpers import rescale_adapter_scale

    case = EMBEDDING_CASE()
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, seed=0, target_modules=["q_proj", "v_proj"],
                                               trainable_token_indices=[3, 5, 7]))
    perturb_trainable(model, 3)
    model.eval()
    rows = rankwise.state.token_layers(model)
    assert rows
    deltas = {n: layer.delta_weight().detach().clone() for n, layer in rows.items()}
    rankwise.export_peft(model, tmp_path)
    theirs = PeftModel.from_pretrained(case.make(), tmp_path).eval()
    with torch.no_grad(), rankwise.scaled(model, 0.0), rescale_adapter_scale(theirs, 0.0):
        for n, layer in rows.items():
            assert torch.equal(layer.delta_weight(), deltas[n])
        torch.testing.assert_close(case.output(theirs, case.batch(5)), case.output(model, case.batch(5)),
                                   rtol=1e-5, atol=1e-5)
        with rankwise.disabled(model):
            base = case.output(model, case.batch(5))
        assert not torch.allclose(case.output(model, case.batch(5)), base)  # the rows still count
