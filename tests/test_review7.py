"""Review round 7 (2026-12-04): items left open by earlier reviews (docs/reliability.md, that section)."""

from __future__ import annotations

import copy
import dataclasses
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


# ---------------------------------------------------------------------------- 3: --max-grad-norm
# (still_bert: conftest.py)


def _run_capturing_start(cfg: object, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Run ``cfg``; what a plain loop needs, captured before the first step: the run, the model's copy, the
    optimizer's groups (hyper-parameters, by parameter name); and the trained model after."""
    import rankwise_harness.train as train
    from rankwise_harness.train import finetune

    seen: dict[str, object] = {}
    real = train._set_up_training

    def spy(run, *args):  # noqa: ANN001, ANN202
        training = real(run, *args)
        model = training.raw_model
        names = {id(p): n for n, p in model.named_parameters()}
        seen.update(run=run, start=copy.deepcopy(model), trained=model,
                    groups=[{**{k: v for k, v in g.items() if k != "params"}, "names": [names[id(p)] for p in g["params"]]}
                            for g in training.optimizer.optimizer.param_groups])
        return training

    monkeypatch.setattr(train, "_set_up_training", spy)
    finetune(cfg, show_progress=False, log=lambda _m: None)
    return seen


@pytest.mark.parametrize("method", ["full", "lora"])
def test_max_grad_norm_makes_the_updates_of_a_plain_loop_with_clip_grad_norm(
        tmp_path: Path, still_bert: str, sst2: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--max-grad-norm 0.05`` (below every step's norm here, so every step clips): the run's trained tensors equal
    a plain PyTorch loop's on the same batches, which sums the accumulated micro-batches' gradients, calls
    ``torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)`` and steps AdamW with the run's groups."""
    from rankwise_harness.batches import micro_batch_indices
    from rankwise_harness.config import RunConfig

    extra = {} if method == "full" else {"r": 2, "alpha": 4}
    cfg = RunConfig(task="sst2", method=method, data=sst2, model=still_bert, output=str(tmp_path / "run"), max_steps=3,
                    grad_accum=2, batch_size=8, lr=1e-2, max_length=32, max_grad_norm=0.05, **extra)
    seen = _run_capturing_start(cfg, monkeypatch)
    run, ref = seen["run"], seen["start"]
    params = dict(ref.named_parameters())
    opt = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "names"}, "params": [params[n] for n in g["names"]]}
                             for g in seen["groups"]])
    norms, micro = [], 0
    ref.train()
    for _ in range(3):
        for _ in range(2):
            idx = micro_batch_indices(len(run.train), 8, cfg.seed, micro)
            micro += 1
            (run.task_type.loss(ref, run.task_type.train_batch([run.train[i] for i in idx])) / 2).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert min(norms) > 0.05  # every step clipped: the test tells clipping from none
    trained = dict(seen["trained"].named_parameters())
    for name, p in params.items():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-7, msg=name)


def test_max_grad_norm_is_off_by_default_recorded_and_checked(tmp_path: Path, still_bert: str, sst2: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Default: no clipping call at all (runs as before); the value is in config.json; a resume with another value
    is refused like any other changed setting; a bad value is refused before anything is written."""
    from accelerate import Accelerator

    from rankwise_harness.config import ConfigError, RunConfig
    from rankwise_harness.train import RunError, finetune

    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("clip_grad_norm_ called without --max-grad-norm")

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", never)
    cfg = RunConfig(task="sst2", method="lora", data=sst2, model=still_bert, output=str(tmp_path / "run"), max_steps=4,
                    batch_size=8, max_length=32, save_every=2, r=2)
    finetune(cfg, show_progress=False, log=lambda _m: None)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["max_grad_norm"] is None
    with pytest.raises(RunError, match="different settings \\(max_grad_norm\\)"):
        finetune(dataclasses.replace(cfg, max_grad_norm=1.0), resume=True, show_progress=False, log=lambda _m: None)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--max-grad-norm"):
            RunConfig(task="sst2", method="lora", max_grad_norm=bad)


@pytest.mark.slow
def test_max_grad_norm_under_two_processes_clips_the_whole_batchs_gradient(tmp_path: Path, still_bert: str,
                                                                         sst2: str) -> None:
    """torchrun, 2 CPU processes x 4 rows: the clip acts on the gradient after the processes' all-reduce (clipping
    before it, or on one process only, would make them differ), so the trained tensors equal one process's on the
    same 8-row global batches."""
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    common = ["finetune", "--task", "sst2", "--data", sst2, "--model", still_bert, "--max-steps", "3", "--grad-accum", "2",
              "--max-length", "32", "--rank", "2", "--lr", "0.01", "--max-grad-norm", "0.05", "--no-progress"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rankwise_harness.cli", *common,
           "--batch-size", "4", "--output", str(tmp_path / "two")]
    one = [sys.executable, "-m", "rankwise_harness.cli", *common, "--batch-size", "8", "--output", str(tmp_path / "one")]
    for cmd in (two, one):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = (load_file(str(tmp_path / n / "adapter" / "adapter.safetensors")) for n in ("two", "one"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_full_run_recorded_with_adapter_flags_still_resumes(tmp_path: Path, tiny_models: dict[str, str],
                                                              sst2: str) -> None:
    """A full fine-tuning run started before the refusal recorded the adapter flags it was given (a regime's
    ``--targets query,value``): its config.json still reads, and the run resumes (and counts as finished) with the
    command that leaves them out."""
    from rankwise_harness.config import RunConfig
    from rankwise_harness.train import finetune

    cfg = _cfg(tmp_path, tiny_models, sst2, method="full", max_steps=2)
    finetune(cfg, show_progress=False, log=lambda _m: None)
    config = tmp_path / "run" / "config.json"
    recorded = json.loads(config.read_text())
    recorded["run"].update(r=8, alpha=16.0, targets=["query", "value"], overrides={"use_rslora": "true"},
                           lora_plus_ratio=4.0)
    config.write_text(json.dumps(recorded))
    assert RunConfig.from_dict(recorded["run"]).identity() == cfg.identity()
    result = finetune(cfg, resume=True, show_progress=False, log=lambda _m: None)  # finished: its result
    assert result["steps"] == 2
