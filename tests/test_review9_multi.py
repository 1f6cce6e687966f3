"""Review round 9 (2026-12-04): several named adapters of different methods on one model, crossed with the
operations a PEFT user chains (docs/reliability.md, that section). Oracles: each adapter's update computed by
hand from its own factors, the base model, and the adapter alone on a fresh base."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import rankwise
from conftest import ModelCase, TinyMLP

X_SEED = 11  # the batch every output here is computed on


def _perturb(model: nn.Module, seed: int) -> None:
    """Move every trainable tensor off its init (so every adapter's update is far from zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _out(model: nn.Module, case: ModelCase) -> Tensor:
    with torch.no_grad():
        return case.output(model, case.batch(X_SEED))


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(now[k], v), k


# ---------------------------------------------------------------------------- the closed form, by hand
def _hand_step(layer: rankwise.AdapterLayer, w: Tensor, w0: Tensor, alpha: float, rs: bool) -> Tensor:
    """The weight after this adapter, given ``w`` (``out x in``, fp64) after those before it (HF PEFT's rule for
    several active adapters: ``w + ΔW``; a DoRA-family one ``m ⊙ (w + ΔW_lora) / ‖W0 + ΔW_lora‖_row``), from the
    layer's own tensors and the papers' formulas, not its code (``rs``: rsLoRA's scale ``alpha / √r``, GoRA's always)."""
    t = {k: v.double() for k, v in layer.state_dict().items()}
    r = layer.rank
    if "chain_a" in t:  # RAC-LoRA / Asymmetric / COLA: the chain (scale baked in) plus the link, s = alpha / r
        return w + t["chain_b"] @ t["chain_a"] + (alpha / r) * t["lora_b"] @ t["lora_a"]
    if "core" in t:  # EDoRA: m ⊙ (W0 + s·B R A) / ‖·‖_row
        lora = (alpha / r) * t["frozen_b"] @ t["core"] @ t["frozen_a"]
    else:
        s = alpha / math.sqrt(r) if rs else alpha / r
        lora = s * t["lora_b"] @ t["lora_a"]
    if "magnitude" in t:  # DoRA / EDoRA: μ = m / ‖W0 + ΔW_lora‖_row rescales the weight so far
        return (t["magnitude"] / (w0 + lora).norm(dim=1))[:, None] * (w + lora)
    return w + lora  # LoRA / rsLoRA / GoRA


STACK: dict[str, Callable[[list[str], int], rankwise.AdapterConfig]] = {
    "lora": lambda t, s: rankwise.LoraConfig(r=2, alpha=4, target_modules=t, seed=s),
    "rslora": lambda t, s: rankwise.LoraConfig(r=2, alpha=4, use_rslora=True, target_modules=t, seed=s),
    "dora": lambda t, s: rankwise.DoraConfig(r=2, alpha=4, target_modules=t, seed=s),
    "raclora": lambda t, s: rankwise.RacLoraConfig(r=2, alpha=4, link_steps=1, target_modules=t, seed=s),
    "asym": lambda t, s: rankwise.RacLoraConfig.asymmetric(r=2, alpha=4, frozen="B", target_modules=t, seed=s),
    "cola": lambda t, s: rankwise.RacLoraConfig.cola(r=2, alpha=4, link_steps=1, target_modules=t, seed=s),
    "edora": lambda t, s: rankwise.EdoraConfig(r=2, alpha=4, target_modules=t, seed=s),
    "gora": lambda t, s: rankwise.GoraConfig(r_ref=2, r_min=1, r_max=4, alpha=4, n_steps=2, target_modules=t, seed=s),
}


def _attach_stack(model: nn.Module, case: ModelCase, seed: int) -> None:
    """Every adapter of :data:`STACK` on ``fc2`` (LoRA, the first, named "default", on ``fc1`` too)."""
    calibration = [case.batch(200 + i) for i in range(2)]  # GoRA's (the others ignore it)
    for i, (name, make) in enumerate(STACK.items()):
        targets = ["fc1", "fc2"] if i == 0 else ["fc2"]
        rankwise.attach(model, make(targets, seed + i), calibration=calibration, name=None if i == 0 else name)


def _stacked(case: ModelCase) -> nn.Module:
    """Eight adapters, one per method above, all on ``fc2`` (LoRA, the first, on ``fc1`` too); each trained for
    two steps on its own (the chains end two links), then every tensor moved off its init."""
    model = case.make()
    _attach_stack(model, case, 0)
    for name in ["default", *list(STACK)[1:]]:
        rankwise.set_active(model, name)
        params = [p for layer in rankwise.adapter_layers(model, name).values() for p in layer.trainable_tensors().values()]
        opt = torch.optim.SGD(params, lr=0.3)
        for i in range(2):
            model(**case.batch(100 + i)).loss.backward()
            opt.step()
            opt.zero_grad()
            rankwise.step(model, opt, name=name)
    rankwise.set_active(model, ["default", *list(STACK)[1:]])
    _perturb(model, 5)
    return model


def _hand_model(case: ModelCase, model: nn.Module, names: list[str]) -> nn.Module:
    """The base model with each adapted weight composed over ``names`` in that order (fp64, by hand)."""
    ref = case.make()
    with torch.no_grad():
        modules = {m for name in names for m in rankwise.adapter_layers(model, name)}
        for module in modules:
            w0 = case.make().get_submodule(module).weight.double()
            w = w0.clone()
            for name in names:
                layer = rankwise.adapter_layers(model, name).get(module)
                if layer is not None:
                    w = _hand_step(layer, w, w0, 4.0, rankwise.adapter_config(model, name).use_rslora)
            ref.get_submodule(module).weight.copy_(w.float())
    return ref


def test_eight_methods_on_one_layer_compose_and_survive_every_operation(mlp_case: ModelCase, tmp_path: Path) -> None:
    """LoRA, rsLoRA, DoRA, RAC-LoRA (two links in its chain), Asymmetric LoRA (B frozen), COLA, EDoRA and GoRA on
    one layer: the forward pass, a merge (and its exact unmerge), any subset made active, a save of all of them loaded
    onto a fresh base adapter by adapter, a state_dict round trip, and deleting each in turn, all against
    the composition computed by hand from each adapter's own factors (``W0 + Σ ΔW_i`` for the LoRA-form ones, each
    DoRA-family one rescaling the weight before it: HF PEFT's rule, round 11)."""
    model = _stacked(mlp_case)
    names = ["default", *list(STACK)[1:]]
    assert all(int(rankwise.adapter_layers(model, n)["fc2"].links) == 2 for n in ("raclora", "cola"))

    def check(m: nn.Module, active: list[str]) -> None:
        expected = _out(_hand_model(mlp_case, model, active), mlp_case)
        torch.testing.assert_close(_out(m, mlp_case), expected, rtol=1e-4, atol=1e-5)

    check(model, names)
    unmerged = _out(model, mlp_case)
    rankwise.merge(model)
    check(model, names)
    rankwise.unmerge(model)
    assert torch.equal(_out(model, mlp_case), unmerged)
    for active in (["dora", "edora"], ["raclora", "asym", "cola"], ["rslora", "gora"]):
        rankwise.set_active(model, active)
        check(model, active)
    rankwise.set_active(model, names)
    rankwise.save(model, tmp_path / "all")
    fresh = rankwise.load(mlp_case.make(), tmp_path / "all")
    for name in names[1:]:
        rankwise.load(fresh, tmp_path / "all" / name, name=name)
    assert torch.equal(_out(fresh, mlp_case), unmerged)
    again = mlp_case.make()
    _attach_stack(again, mlp_case, 50)  # other seeds: every tensor must come from the state_dict
    again.load_state_dict(model.state_dict())
    assert torch.equal(_out(again, mlp_case), unmerged)
    for gone in names[:-1]:
        rankwise.delete(fresh, gone)
        names = [n for n in names if n != gone]
        check(fresh, names)


# ---------------------------------------------------------------------------- 1: a layer on another adapter's trained module
def _with_head(case: ModelCase) -> nn.Module:
    """LoRA "default" on fc1 training ``head`` fully, its tensors and head moved off their init."""
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc1"], modules_to_save=["head"], seed=0))
    _perturb(model, 1)
    return model


@pytest.mark.parametrize("idle", [False, True], ids=["default-active", "default-idle"])
@pytest.mark.parametrize("how", ["attach", "load", "import_peft"])
def test_an_adapter_on_another_adapters_fully_trained_module_is_refused(mlp_case: ModelCase, tmp_path: Path,
                                                                        how: str, idle: bool) -> None:
    """Adapter "b" on ``head`` beside "default", which trains ``head`` fully. Before: accepted; b's layer wrapped
    default's trained copy and froze it (default's head silently stopped training), and ``set_active`` swapped
    the slot's module (b's layer) for the copy or the original, so b's update vanished from the model and
    ``save(name="b")`` wrote a file with no layer, which no load accepts. Now refused, nothing changed."""
    other = mlp_case.make()
    rankwise.attach(other, rankwise.LoraConfig(r=2, alpha=4, target_modules=["head"], seed=1))
    _perturb(other, 2)
    rankwise.save(other, tmp_path / "rw")
    rankwise.export_peft(other, tmp_path / "peft")
    model = _with_head(mlp_case)
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=3), name="c")
    if idle:
        rankwise.set_active(model, "c")
    before, out, head = _state(model), _out(model, mlp_case), model.head
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = {"attach": lambda: rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["head"]), name="b"),
             "load": lambda: rankwise.load(model, tmp_path / "rw", name="b"),
             "import_peft": lambda: rankwise.import_peft(model, tmp_path / "peft", name="b")}
    with pytest.raises(ValueError, match=r"'head', which adapter 'default' trains fully \(modules_to_save\)"):
        calls[how]()
    _same_state(model, before)
    assert model.head is head and torch.equal(_out(model, mlp_case), out)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert sorted(rankwise.state.adapter_set(model).adapters) == ["c", "default"]
    assert rankwise.state.fully_trained_modules(model, "default")["head"].weight.requires_grad


# ---------------------------------------------------------------------------- 2: load_state_dict(assign=True)
def _pair(case: ModelCase, base_seed: int) -> nn.Module:
    """LoRA "default" on fc1, fc2 and DoRA "b" on fc2 over a base drawn with ``base_seed``."""
    torch.manual_seed(base_seed)
    model = TinyMLP()  # the MLP case's model (its make() draws with seed 0)
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], seed=0))
    rankwise.attach(model, rankwise.DoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=1), name="b")
    return model


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_load_state_dict_with_assign_reaches_the_base_module_and_the_peers(mlp_case: ModelCase, merged: bool) -> None:
    """``load_state_dict(sd, assign=True)`` (how a model built on the meta device, or with transformers'
    low-memory loading, takes its weights) puts new ``weight``/``bias`` tensors into each host. Before: the base
    module (what ``disabled`` and a module with no active adapter run) and the peers kept the old ones, so
    ``disabled`` computed the old base (0.74 off the saved model's base on this MLP) and DoRA "b" its norm from
    the old ``W0`` (0.16 off). Now every reader shares the host's new tensors."""
    model = _pair(mlp_case, 0)
    _perturb(model, 2)
    if merged:
        rankwise.merge(model)
    fresh = _pair(mlp_case, 1)
    fresh.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)  # (assign shares the tensors given)
    assert torch.equal(_out(fresh, mlp_case), _out(model, mlp_case))
    rankwise.unmerge(fresh)
    rankwise.unmerge(model)
    base = mlp_case.make()  # the saved model's base (seed 0)
    with rankwise.disabled(fresh):
        assert torch.equal(_out(fresh, mlp_case), _out(base, mlp_case))
    for active in (["b"], ["default"]):  # fc1 has no active layer under ["b"]: its base module's own forward
        rankwise.set_active(fresh, active)
        rankwise.set_active(model, active)
        assert torch.equal(_out(fresh, mlp_case), _out(model, mlp_case)), active
    rankwise.merge(fresh)
    torch.testing.assert_close(_out(fresh, mlp_case), _out(model, mlp_case), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- 3: one step() over several adapters
def _two_chains(case: ModelCase, default_link: int = 1) -> tuple[nn.Module, torch.optim.Optimizer]:
    """RAC-LoRA chains "default" (fc1, links of ``default_link`` steps) and "b" (fc2, links of one step), both
    active and trainable; an optimizer holding "default"'s factors only, one optimizer step taken."""
    model = case.make()
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, link_steps=default_link, target_modules=["fc1"], seed=0))
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, link_steps=1, target_modules=["fc2"], seed=1), name="b")
    opt = torch.optim.SGD(rankwise.adapter_layers(model, "default")["fc1"].trainable_tensors().values(), lr=0.1)
    model(**case.batch(0)).loss.backward()
    opt.step()
    return model, opt


def test_a_step_over_several_adapters_that_one_refuses_steps_none(mlp_case: ModelCase) -> None:
    """``rankwise.step(model, opt)`` steps every active trainable adapter; one whose tensors ``opt`` does not hold
    is refused. Before: "default" was stepped first (its count advanced, its link ended into the chain) and then
    "b" raised, so the retry the message leads to (``step(model, opt, name="default")``) stepped "default" twice
    for one optimizer step. Now every adapter is checked first: the refusal steps none; ``name=`` then steps it once."""
    model, opt = _two_chains(mlp_case)
    before, out = _state(model), _out(model, mlp_case)
    with pytest.raises(ValueError, match=r"does not hold adapter parameter fc2\.lora_b.*name="):
        rankwise.step(model, opt)
    _same_state(model, before)
    assert rankwise.step_count(model, "default") == rankwise.step_count(model, "b") == 0
    rankwise.step(model, opt, name="default")
    assert rankwise.step_count(model, "default") == 1 and int(rankwise.adapter_layers(model, "default")["fc1"].links) == 1
    assert torch.equal(_out(model, mlp_case), out)


def test_a_link_end_without_an_optimizer_beside_another_adapter_steps_none(mlp_case: ModelCase) -> None:
    """The other refusal of a link end (no optimizer to reset) is checked before any adapter is stepped too: "default"
    (mid-link, needing no optimizer) was stepped before "b"'s link end refused."""
    model, _ = _two_chains(mlp_case, default_link=2)
    before = _state(model)
    with pytest.raises(ValueError, match="optimizer state must be reset"):
        rankwise.step(model)
    _same_state(model, before)
    assert rankwise.step_count(model, "default") == rankwise.step_count(model, "b") == 0


def test_the_eight_exported_at_once_compute_in_hf_peft_what_they_compute_here(mlp_case: ModelCase, tmp_path: Path) -> None:
    """The stack above exported in one call (PEFT's multi-adapter layout: "default" at the root, each other adapter in
    its subfolder: RAC-LoRA's chain as a LoRA of rank ``k + r``, GoRA's rank and rsLoRA's flag per adapter, EDoRA as
    DoRA) and read by HF PEFT adapter by adapter: each alone computes PEFT's output, the LoRA-form ones active
    together too, and all eight in either order (a DoRA adapter rescales those before it, in PEFT and here: round 11)."""
    peft = pytest.importorskip("peft")
    model = _stacked(mlp_case)
    rankwise.export_peft(model, tmp_path / "peft")
    names = ["default", *list(STACK)[1:]]
    theirs = peft.PeftModel.from_pretrained(mlp_case.make(), tmp_path / "peft")
    for name in names[1:]:
        theirs.load_adapter(tmp_path / "peft" / name, adapter_name=name)
    lora_form = [n for n in names if n not in ("dora", "edora")]
    for active in [*([n] for n in names), lora_form, names, names[::-1]]:
        rankwise.set_active(model, active)
        theirs.base_model.set_adapter(active)
        torch.testing.assert_close(_out(model, mlp_case), _out(theirs.eval(), mlp_case), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- 4: load_state_dict inside disabled
def test_load_state_dict_inside_disabled_is_refused_before_anything_loads(mlp_case: ModelCase) -> None:
    """Inside ``rankwise.disabled`` merge and unmerge are refused, so a layer's load (which unmerges) raised, but only
    once the model's own hook had restored the step counters and the modules before the first adapted one (``fc1``
    here, not adapted) had loaded: a refused call that changed the model. Now refused before anything loads."""
    model = mlp_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=0))
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=1), name="b")
    rankwise.state.get_state(model, "b").step = 7
    sd = copy.deepcopy(model.state_dict())
    rankwise.state.get_state(model, "b").step = 3
    _perturb(model, 4)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    before = _state(model)
    with rankwise.disabled(model):
        with pytest.raises(RuntimeError, match="cannot load a state_dict inside `with rankwise.disabled"):
            model.load_state_dict(sd)
    _same_state(model, before)
    assert rankwise.step_count(model, "b") == 3


# ---------------------------------------------------------------------------- 5: a merged tied layer's state_dict
def test_a_merged_tied_heads_state_dict_loads_into_a_fresh_model(gpt2_case: ModelCase) -> None:
    """LoRA "default" and DoRA "b" on GPT-2's ``lm_head``, tied to the input embedding. Merging gives the head its
    own merged weight and keeps the shared one as the original; that original (a ``Parameter``) was registered on
    every layer of the stack as ``_original_weight``, so the merged state_dict held ``lm_head._original_weight``,
    ``lm_head.peers.b._original_weight`` beside ``unmerged_weight``, and a fresh adapted model refused it (unexpected
    keys). Now it loads merged, computes the same, and unmerges tied again."""
    def make(seed: int) -> nn.Module:
        model = gpt2_case.make()
        rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["lm_head", "c_attn"], seed=seed))
        rankwise.attach(model, rankwise.DoraConfig(r=2, alpha=4, target_modules=["lm_head"], seed=seed + 1), name="b")
        return model

    with pytest.warns(UserWarning, match="tied weights"):
        model, fresh = make(0), make(5)
    _perturb(model, 3)
    unmerged = _out(model, gpt2_case)
    rankwise.merge(model)
    sd = model.state_dict()
    assert not [k for k in sd if "_original_weight" in k]
    fresh.load_state_dict(sd)
    assert all(layer.merged for layer in rankwise.state.slot_layers(fresh).values())
    torch.testing.assert_close(_out(fresh, gpt2_case), _out(model, gpt2_case), rtol=0, atol=0)
    rankwise.unmerge(fresh)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(_out(fresh, gpt2_case), unmerged)


def test_two_active_lora_adapters_train_with_hf_peft_gradients(mlp_case: ModelCase, tmp_path: Path) -> None:
    """LoRA "default" (fc1, fc2) and rsLoRA "b" (fc2) both active in a training step: the loss and every factor's
    gradient equal HF PEFT's with both adapters active and trainable (``set_adapter([...])``), read from our export."""
    peft = pytest.importorskip("peft")
    model = mlp_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, use_rslora=True, target_modules=["fc2"], seed=1), name="b")
    _perturb(model, 3)
    rankwise.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(mlp_case.make(), tmp_path, is_trainable=True)
    theirs.load_adapter(tmp_path / "b", adapter_name="b", is_trainable=True)
    theirs.base_model.set_adapter(["default", "b"])
    batch = mlp_case.batch(4)
    model.train()
    theirs.train()
    ours, peft_loss = model(**batch).loss, theirs(**batch).loss
    torch.testing.assert_close(ours, peft_loss, rtol=1e-6, atol=1e-7)
    ours.backward()
    peft_loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, layer in rankwise.state.every_layer(model):
        for mine, part in ((layer.lora_a, "A"), (layer.lora_b, "B")):
            torch.testing.assert_close(mine.grad, grads[f"base_model.model.{name}.lora_{part}.{layer.adapter_name}.weight"],
                                       rtol=1e-5, atol=1e-7)
