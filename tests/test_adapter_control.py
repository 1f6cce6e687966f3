"""Adapter control (issue 30): ``rankwise.disabled``, named adapters, and the errors a user can hit.

The matrix invariants (disabled == base for every method and model kind, two active adapters == the
sum of their updates, delete, per-name save/load) live in ``test_invariants.py``; here: what happens
on exceptions and bad calls, nesting, PEFT's multi-adapter layout read by PEFT itself, and steps.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise
from conftest import ModelCase

LORA = dict(r=4, alpha=8, target_modules=["fc1", "fc2"], seed=0)


def _trained_pair(case: ModelCase, second: type[rankwise.AdapterConfig] = rankwise.DoraConfig) -> tuple[nn.Module, nn.Module]:
    """(base, model) with a LoRA "default" on fc1, fc2 and a DoRA (or ``second``) "b" on fc2, both moved off zero."""
    base = case.make()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(**LORA))
    rankwise.attach(model, second(r=2, alpha=4, target_modules=["fc2"], seed=1), name="b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return base, model


def _out(model: nn.Module, case: ModelCase, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model, case.batch(seed))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(now[k], v), k


# ---------------------------------------------------------------------------- disabled
@pytest.mark.parametrize("merged", [False, True])
def test_disabled_restores_everything_when_the_block_raises(mlp_case: ModelCase, merged: bool) -> None:
    base, model = _trained_pair(mlp_case)
    if merged:
        rankwise.merge(model)
    adapted, before = _out(model, mlp_case), _state(model)
    with pytest.raises(KeyError):
        with rankwise.disabled(model):
            assert torch.equal(_out(model, mlp_case), _out(base, mlp_case))
            with pytest.raises(ZeroDivisionError):
                with rankwise.disabled(model):
                    raise ZeroDivisionError
            assert torch.equal(_out(model, mlp_case), _out(base, mlp_case)), "the inner block's exit switched adapters on"
            raise KeyError
    assert torch.equal(_out(model, mlp_case), adapted)
    _same_state(model, before)
    assert all(layer.merged == merged and not layer.disabled for layer in rankwise.state.slot_layers(model).values())


def test_disabled_puts_the_original_fully_trained_modules_in(mlp_case: ModelCase) -> None:
    """A trained head (``modules_to_save``, trained as a copy) is the original head inside the block."""
    base = mlp_case.make()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(**LORA, modules_to_save=["head"]))
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.1)
    adapted, trained_head = _out(model, mlp_case), model.head
    with rankwise.disabled(model):
        with rankwise.disabled(model):
            assert torch.equal(_out(model, mlp_case), _out(base, mlp_case))
        assert torch.equal(_out(model, mlp_case), _out(base, mlp_case))
    assert model.head is trained_head and torch.equal(_out(model, mlp_case), adapted)


def test_inside_disabled_lifecycle_calls_are_refused(mlp_case: ModelCase, tmp_path: Path) -> None:
    _, model = _trained_pair(mlp_case)
    before = _state(model)
    with rankwise.disabled(model):
        for call in (lambda: rankwise.merge(model), lambda: rankwise.unmerge(model), lambda: rankwise.detach(model),
                     lambda: rankwise.delete(model, "b"),
                     lambda: rankwise.attach(model, rankwise.LoraConfig(**LORA), name="c")):
            with pytest.raises(RuntimeError, match="inside `with rankwise.disabled"):
                call()
    _same_state(model, before)
    assert sorted(rankwise.state.adapter_set(model).adapters) == ["b", "default"]


def test_disabled_under_grad_gives_no_adapter_gradient_but_base_gradients_flow(mlp_case: ModelCase) -> None:
    """Inside the block the graph is the base model's: an input gradient equals the base's exactly."""
    base, model = _trained_pair(mlp_case)
    batch = mlp_case.batch(1)
    x1 = batch["x"].clone().requires_grad_(True)
    x2 = batch["x"].clone().requires_grad_(True)
    with rankwise.disabled(model):
        model(x=x1, labels=batch["labels"]).loss.backward()
    base(x=x2, labels=batch["labels"]).loss.backward()
    assert torch.equal(x1.grad, x2.grad)
    assert all(p.grad is None for p in rankwise.trainable_parameters(model).values())


# ---------------------------------------------------------------------------- named adapters: errors
def test_name_errors_are_raised_before_anything_changes(mlp_case: ModelCase, tmp_path: Path) -> None:
    _, model = _trained_pair(mlp_case)
    before, out = _state(model), _out(model, mlp_case)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cases = [
        (lambda: rankwise.attach(model, rankwise.LoraConfig(**LORA)), ValueError, "pass name="),
        (lambda: rankwise.attach(model, rankwise.LoraConfig(**LORA), name="b"), ValueError, "already has an adapter named 'b'"),
        (lambda: rankwise.attach(model, rankwise.LoraConfig(**LORA), name="x.y"), ValueError, "without '.'"),
        (lambda: rankwise.attach(model, rankwise.LoraConfig(**LORA, modules_to_save=["head"]), name="c"), ValueError,
         "only a model's first adapter"),
        (lambda: rankwise.attach(model, rankwise.LoraConfig(r=100, alpha=8, target_modules=["fc1"]), name="c"), ValueError,
         "rank 100"),  # fails inside the build: all or nothing
        (lambda: rankwise.set_active(model, "nope"), ValueError, "no adapter named 'nope'"),
        (lambda: rankwise.set_active(model, []), ValueError, "at least one"),
        (lambda: rankwise.delete(model, "nope"), ValueError, "no adapter named 'nope'"),
        (lambda: rankwise.save(model, tmp_path / "x", name="nope"), ValueError, "no adapter named 'nope'"),
        (lambda: rankwise.merge(model, "nope"), ValueError, "no adapter named 'nope'"),
        (lambda: rankwise.adapter_layers(model), ValueError, r"2 adapters \['b', 'default'\]: pass name="),
        (lambda: rankwise.load(model, tmp_path / "x"), ValueError, "pass name="),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        _same_state(model, before)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert torch.equal(_out(model, mlp_case), out)
    assert rankwise.state.adapter_set(model).active == ["default", "b"]
    assert not (tmp_path / "x").exists()


def test_set_active_delete_and_attach_are_refused_on_a_merged_model(mlp_case: ModelCase) -> None:
    _, model = _trained_pair(mlp_case)
    rankwise.merge(model)
    before = _state(model)
    for call in (lambda: rankwise.set_active(model, "b"), lambda: rankwise.delete(model, "b"),
                 lambda: rankwise.attach(model, rankwise.LoraConfig(**LORA), name="c"),
                 lambda: rankwise.merge(model, "b")):
        with pytest.raises(ValueError, match="merged"):
            call()
    _same_state(model, before)
    rankwise.merge(model, ["default", "b"])  # the adapters it holds, in their order: idempotent
    with pytest.raises(ValueError, match="merged"):  # another order computes another weight (b is DoRA): refused
        rankwise.merge(model, ["b", "default"])
    _same_state(model, before)


def test_merge_of_a_chosen_adapter(mlp_case: ModelCase, tmp_path: Path) -> None:
    _, model = _trained_pair(mlp_case)
    rankwise.save(model, tmp_path / "b", name="b")
    only_b = rankwise.load(mlp_case.make(), tmp_path / "b")
    rankwise.merge(model, "b")
    assert rankwise.state.adapter_set(model).active == ["b"]
    torch.testing.assert_close(_out(model, mlp_case), _out(only_b, mlp_case), rtol=1e-5, atol=1e-6)
    rankwise.unmerge(model)
    assert torch.equal(_out(model, mlp_case), _out(only_b, mlp_case))


def test_step_steps_the_trained_adapter_beside_a_frozen_one(mlp_case: ModelCase, tmp_path: Path) -> None:
    """A frozen "sft" adapter beside a trainable RAC-LoRA "dpo" one: step ends the chain's links, sft stays."""
    sft = mlp_case.make()
    rankwise.attach(sft, rankwise.LoraConfig(**LORA))
    with torch.no_grad():
        for p in rankwise.trainable_parameters(sft).values():
            p.add_(0.1)
    rankwise.save(sft, tmp_path / "sft")
    model = rankwise.load(mlp_case.make(), tmp_path / "sft", trainable=False, name="sft")
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, link_steps=2, target_modules=["fc2"], seed=0), name="dpo")
    assert set(rankwise.trainable_parameters(model)) == {"fc2.peers.dpo.lora_b"}
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.1)
    for i in range(2):
        model(**mlp_case.batch(i)).loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    assert rankwise.state.get_state(model, "dpo").step == 2 and rankwise.state.get_state(model, "sft").step == 0
    assert rankwise.adapter_layers(model, "dpo")["fc2"].chain_a.shape[0] == 2  # the link ended into the chain
    rankwise.set_active(model, "sft")
    assert torch.equal(_out(model, mlp_case), _out(sft, mlp_case))


# ---------------------------------------------------------------------------- PEFT's multi-adapter layout
@pytest.mark.parametrize("second", [rankwise.LoraConfig, rankwise.DoraConfig], ids=["lora", "dora"])
def test_export_peft_multi_adapter_layout_loads_in_peft(mlp_case: ModelCase, tmp_path: Path, second: type) -> None:
    """PEFT reads the layout and computes the same per adapter, and with both active for LoRA adapters. (With a
    DoRA adapter among several active ones PEFT rescales the running output, earlier adapters' updates included,
    so its result depends on their order; rankwise adds each adapter's own update: the sum of updates.)"""
    peft = pytest.importorskip("peft")
    base, model = _trained_pair(mlp_case, second)
    rankwise.export_peft(model, tmp_path / "peft")
    assert (tmp_path / "peft/adapter_model.safetensors").is_file() and (tmp_path / "peft/b/adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    theirs.load_adapter(tmp_path / "peft/b", adapter_name="b")
    for active in (["default"], ["b"], ["default", "b"])[: 3 if second is rankwise.LoraConfig else 2]:
        rankwise.set_active(model, active)
        theirs.base_model.set_adapter(active)
        torch.testing.assert_close(_out(model, mlp_case), _out(theirs, mlp_case), rtol=1e-5, atol=1e-6)
    # and back: PEFT's folders imported per name compute the same
    again = rankwise.import_peft(copy.deepcopy(base), tmp_path / "peft")
    rankwise.import_peft(again, tmp_path / "peft/b", name="b")
    rankwise.set_active(model, ["default", "b"])
    torch.testing.assert_close(_out(again, mlp_case), _out(model, mlp_case), rtol=1e-5, atol=1e-6)


def test_an_unexportable_adapter_is_named_and_nothing_is_written(mlp_case: ModelCase, tmp_path: Path) -> None:
    _, model = _trained_pair(mlp_case)
    with pytest.raises(ValueError, match=r"adapter 'b' cannot be exported to PEFT: dora is a DoRA-family method"):
        rankwise.export_peft(model, tmp_path / "vllm", vllm=True)
    assert not (tmp_path / "vllm").exists()


def test_one_adapter_without_a_name_writes_todays_files(mlp_case: ModelCase, tmp_path: Path) -> None:
    """The default name changes nothing on disk: no subfolder, the same keys, and an attach-then-delete of a
    second adapter leaves the very same file."""
    model = mlp_case.make()
    rankwise.attach(model, rankwise.LoraConfig(**LORA))
    rankwise.save(model, tmp_path / "one")
    rankwise.attach(model, rankwise.LoraConfig(**LORA), name="tmp")
    rankwise.delete(model, "tmp")
    rankwise.save(model, tmp_path / "again")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert (tmp_path / "one/adapter.safetensors").read_bytes() == (tmp_path / "again/adapter.safetensors").read_bytes()
    assert set(model.state_dict()) == {"fc1.weight", "fc1.bias", "fc1.lora_a", "fc1.lora_b", "fc2.weight", "fc2.bias",
                                       "fc2.lora_a", "fc2.lora_b", "head.weight", "head.bias", "rankwise_state"}


def test_state_dict_round_trip_of_two_adapters_merged_or_not(mlp_case: ModelCase) -> None:
    """``load_state_dict`` (HF Trainer's resume) of a model with two adapters: the peers' tensors, each
    adapter's step counter and a merged state come back; a merged host merges again only once its peers are in."""
    for merged in (False, True):
        _, model = _trained_pair(mlp_case)
        rankwise.state.get_state(model, "b").step = 5
        if merged:
            rankwise.merge(model)
        sd = model.state_dict()
        assert "fc2.peers.b.lora_a" in sd and "fc2.peers.b.weight" not in sd  # the base tensors once, as the host's
        fresh = mlp_case.make()
        rankwise.attach(fresh, rankwise.LoraConfig(**LORA))
        rankwise.attach(fresh, rankwise.DoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=9), name="b")
        fresh.load_state_dict(sd)
        assert torch.equal(_out(fresh, mlp_case), _out(model, mlp_case))
        assert rankwise.state.get_state(fresh, "b").step == 5 and rankwise.state.get_state(fresh, "default").step == 0
        assert all(layer.merged == merged for layer in rankwise.state.slot_layers(fresh).values())
        rankwise.unmerge(fresh)
        rankwise.unmerge(model)
        assert torch.equal(_out(fresh, mlp_case), _out(model, mlp_case))


def test_deleting_a_host_with_two_peers_keeps_both(mlp_case: ModelCase, tmp_path: Path) -> None:
    """Three adapters on fc2: deleting the slot's host promotes the first peer, which takes the other along."""
    _, model = _trained_pair(mlp_case)
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=2), name="c")
    with torch.no_grad():
        rankwise.adapter_layers(model, "c")["fc2"].lora_b.add_(0.1)
    for n in ("b", "c"):
        rankwise.save(model, tmp_path / n, name=n)
    rankwise.set_active(model, ["b", "c"])
    expected = _out(model, mlp_case)
    rankwise.delete(model, "default")
    assert type(model.fc2).__name__ == "DoraLinear" and list(model.fc2.peers) == ["c"]
    assert torch.equal(_out(model, mlp_case), expected)
    fresh = rankwise.load(mlp_case.make(), tmp_path / "b", name="b")
    rankwise.load(fresh, tmp_path / "c", name="c")
    assert torch.equal(_out(fresh, mlp_case), expected)
    assert set(model.state_dict()) == set(fresh.state_dict())
