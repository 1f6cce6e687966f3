"""Review round 7 (2026-12-04): items left open by earlier reviews (docs/reliability.md, that section)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import rankwise
from conftest import ModelCase
from rankwise_harness import cli
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

LORA = dict(r=4, alpha=8, target_modules=["fc1", "fc2"], seed=0)


# ---------------------------------------------------------------------------- 1: an idle adapter's trained head
def _two_adapters(case: ModelCase, shift: float) -> nn.Module:
    """LoRA "default" training ``head`` fully, LoRA "b" on fc2; every trainable tensor moved by ``shift``."""
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(**LORA, modules_to_save=["head"]))
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=1), name="b")
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(shift)
    return model


def _enter(model: nn.Module, state: str) -> AbstractContextManager[object]:
    """Put ``model`` in ``state``: "active" (default active), "idle" (only b active) or "disabled"."""
    rankwise.set_active(model, "b" if state == "idle" else ["default", "b"])
    return rankwise.disabled(model) if state == "disabled" else nullcontext()


def _head(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in rankwise.state.fully_trained_modules(model, "default")["head"].state_dict().items()}


@pytest.mark.parametrize("saved_in", ["active", "idle", "disabled"])
@pytest.mark.parametrize("loaded_in", ["active", "idle"])
def test_a_state_dict_round_trip_keeps_the_trained_head_in_any_state(mlp_case: ModelCase, saved_in: str,
                                                                      loaded_in: str) -> None:
    """``torch.save(model.state_dict())`` with "default"'s trained head set aside (its adapter idle, or inside
    ``disabled``), loaded into a model in any state: the trained head arrives in the trained copy, the loading
    model's original head is untouched, and the model computes what the saved one did (HF PEFT keeps every
    adapter's copy in its state_dict whatever is active: ``head.modules_to_save.default``)."""
    model = _two_adapters(mlp_case, 0.1)
    trained = _head(model)  # captured while it is in the model (active)
    with _enter(model, saved_in):
        sd = copy.deepcopy(model.state_dict())
    rankwise.set_active(model, ["default", "b"])
    expected = mlp_case.output(model, mlp_case.batch(0)).detach()
    fresh = _two_adapters(mlp_case, -0.3)
    original = {k: v.clone() for k, v in rankwise.state.get_state(fresh, "default").original_modules["head"].state_dict().items()}
    rankwise.set_active(fresh, "b" if loaded_in == "idle" else ["default", "b"])
    fresh.load_state_dict(sd)
    for k, v in _head(fresh).items():
        assert torch.equal(v, trained[k]), f"the trained head's {k} was lost"
    for k, v in rankwise.state.get_state(fresh, "default").original_modules["head"].state_dict().items():
        assert torch.equal(v, original[k]), f"the original head's {k} was overwritten"
    rankwise.set_active(fresh, ["default", "b"])
    assert torch.equal(mlp_case.output(fresh, mlp_case.batch(0)).detach(), expected)


def test_the_head_keys_hold_the_trained_copy_in_every_state_as_peft(mlp_case: ModelCase) -> None:
    """In each state our ``head.*`` keys equal HF PEFT's ``head.modules_to_save.default.*`` for the same trained head
    (PEFT's state_dict does not depend on the active adapter or ``disable_adapter``)."""
    peft = pytest.importorskip("peft")
    model = _two_adapters(mlp_case, 0.1)
    pm = peft.get_peft_model(mlp_case.make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                                            modules_to_save=["head"]))
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc2"]))
    pm.base_model.model.head.modules_to_save["default"].load_state_dict(_head(model))
    peft_states: dict[str, Callable[[], object]] = {"active": lambda: pm.set_adapter("default"),
                                                    "idle": lambda: pm.set_adapter("b")}
    for state in ("active", "idle", "disabled"):
        if state in peft_states:
            peft_states[state]()
        with _enter(model, state), (pm.disable_adapter() if state == "disabled" else nullcontext()):
            ours, theirs = model.state_dict(), pm.state_dict()
        for k in ("weight", "bias"):
            assert torch.equal(ours[f"head.{k}"], theirs[f"base_model.model.head.modules_to_save.default.{k}"]), (state, k)


def test_a_head_of_the_wrong_shape_loaded_while_idle_is_an_error(mlp_case: ModelCase) -> None:
    model = _two_adapters(mlp_case, 0.1)
    sd = model.state_dict()
    sd["head.weight"] = torch.zeros(sd["head.weight"].shape[0] + 1, sd["head.weight"].shape[1])
    rankwise.set_active(model, "b")
    with pytest.raises(RuntimeError, match="head"):
        model.load_state_dict(sd)


# ---------------------------------------------------------------------------- 2: adapter-only flags with --method full
ADAPTER_ONLY = [["--r", "4"], ["--alpha", "8"], ["--dropout", "0.1"], ["--lora-plus-ratio", "4"],
                ["--targets", "query"], ["--set", "use_rslora=true"]]


@pytest.mark.parametrize("flag", ADAPTER_ONLY, ids=lambda f: f[0])
def test_finetune_full_refuses_an_adapter_only_flag(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                    flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Full fine-tuning has no adapter: such a flag changed nothing while config.json recorded it."""
    out = tmp_path / "run"
    code = cli.main(["finetune", "--method", "full", "--task", "sst2", "--data", sst2, "--model", tiny_models["bert"],
                     "--max-steps", "1", "--output", str(out), "--no-progress", *flag])
    assert code == 2
    assert flag[0] in capsys.readouterr().err
    assert not out.exists()


def test_compare_passes_adapter_flags_to_adapter_methods_only(tmp_path: Path, tiny_models: dict[str, str],
                                                              sst2: str) -> None:
    """``compare --methods full,lora --r 2 ...``: LoRA gets them; full trains without them and its config.json says
    so (the values it used: none), and it is the very run ``finetune --method full`` makes without them."""
    out = tmp_path / "cmp"
    common = ["--task", "sst2", "--data", sst2, "--model", tiny_models["bert"], "--max-steps", "2", "--batch-size", "8",
              "--max-length", "32", "--no-progress"]
    given = {"r": 2, "alpha": 4.0, "dropout": 0.05, "lora_plus_ratio": 4.0}
    assert cli.main(["compare", "--methods", "full,lora", "--seeds", "0", "--r", "2", "--alpha", "4", "--dropout", "0.05",
                     "--lora-plus-ratio", "4", "--output", str(out), *common]) == 0
    run = {m: json.loads((out / f"{m}-seed0" / "config.json").read_text())["run"] for m in ("full", "lora")}
    assert {k: run["lora"][k] for k in given} == given
    assert {k: run["full"][k] for k in given} == dict.fromkeys(given)
    assert cli.main(["finetune", "--method", "full", "--output", str(tmp_path / "plain"), *common]) == 0
    full = load_file(str(out / "full-seed0" / "model.safetensors"))
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert full.keys() == plain.keys() and all(torch.equal(full[k], plain[k]) for k in full)
    assert cli.main(["compare", "--methods", "full", "--seeds", "0", "--r", "2", "--output", str(tmp_path / "c2"),
                     *common]) == 2  # a flag no compared method uses
