"""``--keep-best``: the run's result is the model of its best held-out evaluation (src/rankwise_harness/keepbest.py).

The properties: the kept adapter, loaded onto a fresh base, scores on dev exactly what the best evaluation recorded;
``metrics`` and ``predictions.jsonl`` are that evaluation's; without the flag the last model is kept; a run resumed
after a crash keeps the same bytes as an uninterrupted one; a snapshot that is not the history's best is never used.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import rankwise
from rankwise_harness import keepbest
from rankwise_harness.config import ConfigError, RunConfig
from rankwise_harness.data import get_task, load_task_data
from rankwise_harness.evaluation import evaluate
from rankwise_harness.tasktypes import task_type_for
from rankwise_harness.train import finetune
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

QUIET = {"show_progress": False, "log": lambda _m: None}
SABOTAGE_AT = 8  # the end of epoch 2 (36 training rows, batch 8: 4 steps an epoch)


def _sabotage(model_holder: dict) -> object:
    """A step hook that, after the evaluation at SABOTAGE_AT, pushes every LoRA B far off, so later held-out
    evaluations are worse and the best one is at or before SABOTAGE_AT."""

    def hook(step: int, _loss: float) -> None:
        if step == SABOTAGE_AT:
            model = model_holder["model"]
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.add_(torch.randn(p.shape, generator=g) * 5.0)
    return hook


def _run(tmp_path: Path, models: dict[str, str], data: str, name: str, hook=None, **kw) -> tuple[dict, Path]:
    """Label words on the tiny GPT-2 (its predictions carry the label words' probabilities, so two models'
    predictions.jsonl differ even where their accuracies tie)."""
    cfg = _cfg(tmp_path, models, data, model=models["gpt2"], output=str(tmp_path / name), max_train=48,
               val_split=0.25, max_steps=None, epochs=5, eval_each_epoch=True, lr=2e-2, **kw)
    return finetune(cfg, hook=hook, **QUIET), Path(cfg.output)


@pytest.fixture
def grab_model(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The run's model, as the training loop holds it (for the sabotage hook)."""
    from rankwise_harness import train as train_mod

    holder: dict = {}
    real = train_mod._train

    def spy(run, training, loop, show_progress):
        holder["model"] = training.raw_model
        return real(run, training, loop, show_progress)

    monkeypatch.setattr(train_mod, "_train", spy)
    return holder


def _fresh_score(out: Path, data: str) -> tuple[dict[str, float], list[dict]]:
    """The run's result files (``adapter/`` or ``model.safetensors``) on a fresh base, loaded as the run's task type
    loads it: its dev metrics and predictions, evaluated apart from the run."""
    from accelerate import Accelerator

    from rankwise_harness.interop_cli import load_trained_tensors

    saved = json.loads((out / "config.json").read_text())
    cfg = RunConfig.from_dict({**saved["run"], "output": str(out)})
    task = get_task(cfg.task)
    tt = task_type_for(task, saved["model_path"], cfg)
    model = tt.load(torch.device("cpu"), lambda _m: None)
    if (out / "adapter").is_dir():
        rankwise.load(model, out / "adapter")
    else:
        load_trained_tensors(model, out / "model.safetensors")
    model.eval()
    records: list[dict] = []
    metrics = evaluate(model, tt, load_task_data(task, data).dev, Accelerator(cpu=True), cfg.batch_size * 2, records,
                       "dev", sparse=True)
    return metrics, records


def _predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_keep_best_keeps_the_best_evaluation_and_its_adapter_reproduces_it(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, grab_model: dict) -> None:
    result, out = _run(tmp_path, tiny_models, sst2, "best", hook=_sabotage(grab_model), keep_best=True)
    best, last = result["best"], result["last"]
    assert best["step"] <= SABOTAGE_AT < result["steps"] == last["step"], "the test needs a best before the last"
    assert result["kept"] == {"which": "best", "step": best["step"]}
    assert result["metrics"] == best["dev"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == best["dev"] and saved["last"] == last
    # the kept adapter, on a fresh base, scores what the best evaluation recorded, with the same predictions
    # (label-word probabilities included)
    metrics, records = _fresh_score(out, sst2)
    assert metrics == best["dev"]
    assert _predictions(out) == records
    # the same run keeping its last model predicts otherwise (the sabotage moved it): the check can fail
    last_run, last_out = _run(tmp_path, tiny_models, sst2, "same-last", hook=_sabotage(grab_model))
    assert last_run["eval_history"] == result["eval_history"]
    assert _predictions(last_out) != records
    assert not any((out / d).exists() for d in (keepbest.BEST, keepbest.TMP, keepbest.OLD))


def test_without_keep_best_the_last_model_is_kept(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                  grab_model: dict) -> None:
    result, out = _run(tmp_path, tiny_models, sst2, "last", hook=_sabotage(grab_model))
    assert result["kept"] == {"which": "last", "step": result["steps"]}
    assert result["metrics"] == result["last"]["dev"]
    metrics, records = _fresh_score(out, sst2)
    assert metrics == result["last"]["dev"] and _predictions(out) == records
    assert not (out / keepbest.BEST).exists()


class _Crash(Exception):
    pass


def test_a_resumed_keep_best_run_keeps_the_uninterrupted_runs_bytes(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, grab_model: dict) -> None:
    sabotage = _sabotage(grab_model)
    whole, whole_out = _run(tmp_path, tiny_models, sst2, "whole", hook=sabotage, keep_best=True, save_every=6)
    assert whole["kept"]["which"] == "best" and whole["kept"]["step"] < whole["steps"]

    def crash(step: int, loss: float) -> None:
        sabotage(step, loss)
        if step == 14:  # after the best snapshot and a checkpoint (step 12)
            raise _Crash

    with pytest.raises(_Crash):
        _run(tmp_path, tiny_models, sst2, "cut", hook=crash, keep_best=True, save_every=6)
    cut = tmp_path / "cut"
    assert (cut / keepbest.BEST / keepbest.ENTRY).is_file()
    cfg = RunConfig.from_dict({**json.loads((cut / "config.json").read_text())["run"], "output": str(cut)})
    resumed = finetune(cfg, resume=True, hook=sabotage, **QUIET)
    for key in ("metrics", "best", "last", "kept", "eval_history"):
        assert resumed[key] == whole[key], key
    for rel in ("adapter/adapter.safetensors", "predictions.jsonl"):
        assert (cut / rel).read_bytes() == (whole_out / rel).read_bytes(), rel


def test_a_snapshot_of_another_evaluation_is_never_kept(tmp_path: Path) -> None:
    entry = {"step": 8, "epoch": 2.0, "accuracy": 0.5, "val": {"accuracy": 0.75}}
    keepbest.snapshot(tmp_path, entry, lambda folder: (folder / "model.safetensors").write_bytes(b"x"), b"p\n")
    kept, why = keepbest.find(tmp_path, {"step": 8, "val": {"accuracy": 0.75}})
    assert kept is not None and kept.dev == {"accuracy": 0.5} and kept.step == 8 and why == ""
    assert kept.result_files() == {Path("model.safetensors"): b"x"} and kept.predictions() == b"p\n"
    for other in ({"step": 12, "val": {"accuracy": 0.75}}, {"step": 8, "val": {"accuracy": 0.8}}):
        kept, why = keepbest.find(tmp_path, other)
        assert kept is None and "is of step 8" in why
    # a crash between the two renames of a later snapshot: the old one is read in its place
    (tmp_path / keepbest.BEST).rename(tmp_path / keepbest.OLD)
    assert keepbest.find(tmp_path, {"step": 8, "val": {"accuracy": 0.75}})[0] is not None
    keepbest.clear(tmp_path)
    assert keepbest.find(tmp_path, {"step": 8, "val": {"accuracy": 0.75}})[0] is None


def test_a_failed_snapshot_leaves_the_previous_one(tmp_path: Path) -> None:
    first = {"step": 4, "val": {"accuracy": 0.6}, "accuracy": 0.5}
    keepbest.snapshot(tmp_path, first, lambda folder: (folder / "model.safetensors").write_bytes(b"a"), b"")

    def fail(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        keepbest.snapshot(tmp_path, {"step": 8, "val": {"accuracy": 0.7}, "accuracy": 0.6}, fail, b"")
    kept, _ = keepbest.find(tmp_path, {"step": 4, "val": {"accuracy": 0.6}})
    assert kept is not None and kept.result_files() == {Path("model.safetensors"): b"a"}


def test_keep_best_needs_held_out_evaluations() -> None:
    with pytest.raises(ConfigError, match="--keep-best .* needs --val-split"):
        RunConfig(task="sst2", keep_best=True, eval_each_epoch=True)
    with pytest.raises(ConfigError, match="--eval-each-epoch or --eval-every"):
        RunConfig(task="sst2", keep_best=True, val_split=0.1)
    assert RunConfig(task="sst2", keep_best=True, val_split=0.1, eval_every=5).keep_best
    assert "keep_best" in RunConfig(task="sst2").identity()
    # a run recorded before the flag existed reads as without it (and resumes so)
    old = dataclasses.asdict(RunConfig(task="sst2"))
    old.pop("keep_best")
    assert RunConfig.from_dict(old).keep_best is False
