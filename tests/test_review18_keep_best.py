"""Review round 18: ``finetune --keep-best`` (src/rankwise_harness/keepbest.py) tried on two processes, on every kind of
result (full fine-tuning, RAC-LoRA's chain, GoRA's calibrated init), across crashes and resumes.

The held-out metric is scripted by step where a test needs the best evaluation in the middle of a run (the tiny
models' 12 held-out rows tie at the majority class's accuracy): the dev side, predictions and result files stay the
model's own, so the kept result, loaded onto a fresh base, must reproduce the best evaluation's dev metrics and
predictions (the tiny GPT-2's label words: predictions carry their probabilities, so two models' differ).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT and GPT-2, SST-2 rows)
from test_keep_best import _fresh_score, _predictions

from rankwise_harness import keepbest
from rankwise_harness import train as train_mod
from rankwise_harness.config import RUN_MARKER, RunConfig
from rankwise_harness.runfolder import prepare_output
from rankwise_harness.train import RunError, finetune

HERE = Path(__file__).resolve().parent
QUIET: dict[str, Any] = {"show_progress": False, "log": lambda _m: None}
VAL = {4: 0.5, 8: 0.6, 12: 0.75, 16: 0.6, 20: 0.75}  # held-out accuracy by step: the best is step 12 (20 ties it)


def _same_predictions(got: list[dict], want: list[dict], tol: float) -> bool:
    """The same predictions, the label words' probabilities within ``tol`` (0: bit for bit)."""
    def probs(r: dict) -> list[float]:
        return list(r.get("label_word_probs", {}).values())

    plain = [{k: v for k, v in r.items() if k != "label_word_probs"} for r in got]
    return plain == [{k: v for k, v in r.items() if k != "label_word_probs"} for r in want] and all(
        len(probs(a)) == len(probs(b)) and all(abs(x - y) <= tol for x, y in zip(probs(a), probs(b)))
        for a, b in zip(got, want))


def _assert_keeps_step_12(result: dict[str, Any], out: Path, data: str, tol: float = 0.0) -> None:
    """``tol``: a 2-process run evaluates each process's share of dev in batches of other lengths (padding) than one
    process does: its label-word probabilities differ from a fresh one-process evaluation's in the 7th digit."""
    assert [e["val"]["accuracy"] for e in result["eval_history"]] == list(VAL.values())
    assert result["best"]["step"] == 12 and result["steps"] == 20
    assert result["kept"] == {"which": "best", "step": 12} and result["metrics"] == result["best"]["dev"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["kept"] == result["kept"] and saved["metrics"] == result["best"]["dev"]
    metrics, records = _fresh_score(out, data)
    assert metrics == result["best"]["dev"]
    assert _same_predictions(_predictions(out), records, tol)
    assert not any((out / d).exists() for d in (keepbest.BEST, keepbest.TMP, keepbest.OLD))


@pytest.fixture
def scripted_val(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each evaluation's held-out accuracy is VAL's for its step."""
    entry = train_mod._eval_entry

    def scripted(step: int, epoch: float, dev: dict[str, float], run: Any) -> dict[str, Any]:
        return {**entry(step, epoch, dev, run), "val": {"accuracy": VAL[step]}}

    monkeypatch.setattr(train_mod, "_eval_entry", scripted)


def test_two_processes_keep_the_best_evaluation_and_agree_on_it(tmp_path: Path, tiny_models: dict[str, str],
                                                                sst2: str) -> None:
    """``--keep-best`` on 2 torchrun processes (gloo), rank 1 reaching the finish's choice of model 3 s after rank 0
    (a process descheduled for a moment). Before, every process read ``.best/`` itself, and rank 0 removes it once
    its outputs are written: rank 1 found no snapshot and returned the last model's result (``kept`` ``last``,
    ``metrics`` the final dev) while the folder held the best's, or, coming between the removal of ``best.json``'s
    folder and its read of the predictions, raised FileNotFoundError outside any exchange, and rank 0 waited for it
    until the collective's timeout (then called the finished run interrupted). Now rank 0 alone reads the snapshot
    and tells the others what it kept: both return the same result, the folder holds step 12's model, and the kept
    adapter on a fresh base reproduces step 12's dev metrics and predictions."""
    from harness_dist_worker import KEEP_BEST_VAL

    assert KEEP_BEST_VAL == VAL
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "harness_dist_worker.py"), "--model", tiny_models["gpt2"], "--data", sst2, "--root", str(tmp_path),
           "--scenarios", "keep-best", "--timeout-s", "60"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text())["keep-best"] for r in (0, 1))
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    for key in ("kept", "metrics", "best", "last", "eval_history"):
        assert r1[key] == r0[key], (key, r0[key], r1[key])
    assert r0["num_processes"] == 2
    _assert_keeps_step_12(r0, tmp_path / "keep-best", sst2, tol=1e-5)


@pytest.mark.parametrize("method, extra", [
    ("full", {"lr": 2e-3}),
    ("raclora", {"overrides": {"link_steps": "2"}}),  # 6 links merged into the chain by step 12, 4 more after
    ("gora", {"overrides": {"n_steps": "2", "r_min": "2", "r_max": "8"}}),  # calibrated init
])
def test_every_kind_of_result_is_the_best_evaluations_model(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                            scripted_val: None, method: str, extra: dict) -> None:
    """Found correct: full fine-tuning's ``model.safetensors``, RAC-LoRA's adapter with links merged into its chain
    during training (``link_steps=2``), GoRA's data-initialised adapter, kept at step 12 of 20, each on a fresh base
    reproduces step 12's dev metrics and label-word probabilities, not the final model's."""
    cfg = _cfg(tmp_path, tiny_models, sst2, model=tiny_models["gpt2"], method=method, max_train=48, val_split=0.25,
               max_steps=None, epochs=5, eval_each_epoch=True, lr=extra.get("lr", 2e-2), keep_best=True,
               **{k: v for k, v in extra.items() if k != "lr"})
    result = finetune(cfg, **QUIET)
    _assert_keeps_step_12(result, Path(cfg.output), sst2)
    assert _predictions(Path(cfg.output)) != _last_models_predictions(tmp_path, cfg)


def _last_models_predictions(tmp_path: Path, cfg: RunConfig) -> list[dict]:
    """The same run keeping its last model: its predictions (the check above can fail)."""
    last = dataclasses.replace(cfg, keep_best=False, output=str(tmp_path / "last"))
    finetune(last, **QUIET)
    return _predictions(Path(last.output))


def test_a_snapshot_interrupted_twice_leaves_the_first_in_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between a snapshot's two renames leaves the previous one as ``.best.old/`` (read in its place). The
    next snapshot (the resumed run's, at the same or a later evaluation) began by deleting ``.best.old/``: crashed
    again before its own rename, it left no snapshot at all, and a run whose history's best is the first one (a
    resumed replay that did not repeat the later evaluation) kept its last model. Now it first puts ``.best.old/``
    back as ``.best/``, so the first snapshot stays in force through both crashes."""
    first = {"step": 4, "epoch": 1.0, "accuracy": 0.5, "val": {"accuracy": 0.75}}
    keepbest.snapshot(tmp_path, first, lambda folder: (folder / "model.safetensors").write_bytes(b"4"), b"p4\n")
    real = os.replace

    class Crash(Exception):
        pass

    def crash_at_the_swap(src: Any, dst: Any) -> None:
        if Path(dst).name == keepbest.BEST:
            raise Crash
        real(src, dst)

    monkeypatch.setattr(keepbest.os, "replace", crash_at_the_swap)
    for step in (8, 12):
        entry = {"step": step, "epoch": step / 4, "accuracy": 0.6, "val": {"accuracy": 0.8}}
        with pytest.raises(Crash):
            keepbest.snapshot(tmp_path, entry, lambda folder: (folder / "model.safetensors").write_bytes(b"x"), b"px\n")
        kept, why = keepbest.find(tmp_path, {"step": 4, "val": {"accuracy": 0.75}})
        assert kept is not None, (step, why)
        assert kept.result_files() == {Path("model.safetensors"): b"4"} and kept.predictions() == b"p4\n"
    monkeypatch.setattr(keepbest.os, "replace", real)
    later = {"step": 16, "epoch": 4.0, "accuracy": 0.7, "val": {"accuracy": 0.9}}
    keepbest.snapshot(tmp_path, later, lambda folder: (folder / "model.safetensors").write_bytes(b"16"), b"p16\n")
    kept, _ = keepbest.find(tmp_path, {"step": 16, "val": {"accuracy": 0.9}})
    assert kept is not None and kept.result_files() == {Path("model.safetensors"): b"16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [keepbest.BEST]


@pytest.mark.parametrize("started_with", [False, True])
def test_resuming_with_keep_best_changed_says_what_to_pass(tmp_path: Path, started_with: bool) -> None:
    """``--resume`` with ``--keep-best`` added or dropped is refused as a change of settings, as before; the message
    named only ``keep_best``. Now it says how the run was started and what to pass."""
    cfg = RunConfig(task="sst2", output=str(tmp_path), val_split=0.25, eval_each_epoch=True, keep_best=started_with)
    (tmp_path / "config.json").write_text(json.dumps({"format": RUN_MARKER, "run": cfg.to_dict()}))
    with pytest.raises(RunError) as exc:
        prepare_output(dataclasses.replace(cfg, keep_best=not started_with), resume=True, overwrite=False)
    said = str(exc.value)
    assert "different settings (keep_best)" in said
    if started_with:
        assert "started with --keep-best" in said and "resume it with --keep-best" in said, said
    else:
        assert "started without --keep-best" in said and "resume it without --keep-best" in said, said
    assert "--overwrite" in said
