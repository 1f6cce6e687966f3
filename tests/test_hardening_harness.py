"""Issue 20, harness half: what an adversarial review broke, each case a test (docs/reliability.md,
"Adversarial review, harness").

Resume after a real ``kill -9``; checkpoints that are never unpickled and hold only what training changes;
``rankwise import``/``export`` that never write over their input or a foreign folder and answer bad
adapters in one line; unreadable data rows; numeric flags checked before any work.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

import rankwise
from rankwise.registry import _METHODS, Method, get_method
from rankwise_harness.checkpoint import CKPT_DIR, RunError
from rankwise_harness.train import finetune
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

SRC = Path(__file__).resolve().parents[1] / "src"
QUIET = dict(show_progress=False, log=lambda _m: None)
OUTPUTS = ("config.json", "metrics.json", "predictions.jsonl", "loss_curve.png", "adapter/adapter.safetensors",
           "adapter/adapter_config.json")


# ---------------------------------------------------------------------------- 1. kill -9, then --resume
# the child runs the real CLI; a patched rankwise.step SIGKILLs the process right after optimizer step KILL_AT
_CHILD = """
import os, signal, sys
import rankwise
from rankwise_harness import cli
kill_at = int(os.environ.get("KILL_AT", "0"))
real_step, calls = rankwise.step, [0]
def step(model, optimizer=None, **kw):
    real_step(model, optimizer, **kw)
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
rankwise.step = step
sys.exit(cli.main(sys.argv[1:]))
"""


def _finetune_cli(args: list[str], kill_at: int = 0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", KILL_AT=str(kill_at),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _CHILD, "finetune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("method", ["lora", pytest.param("raclora", marks=pytest.mark.slow)])
def test_kill_9_then_resume_gives_the_uninterrupted_result(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                          method: str) -> None:
    """Killed (SIGKILL) in step 5 of 8 with checkpoints every 2 steps; ``--resume`` continues from step 4,
    writes its own step-6 checkpoint (which replaces the one it resumed from) and ends with every output,
    bit for bit the uninterrupted run's. Three CLI processes (~45 s on 2 busy cores); every method runs the
    same scenario in-process in test_harness_train.py::test_resume_after_interruption_equals_uninterrupted."""
    args = ["--task", "sst2", "--data", sst2, "--model", tiny_models["bert"], "--method", method, "--max-steps", "8",
            "--save-every", "2", "--batch-size", "8", "--max-length", "32", "--r", "4", "--lr", "5e-3",
            "--dropout", "0.1", "--warmup-ratio", "0", "--no-progress"]
    if method == "raclora":
        args += ["--set", "link_steps=3"]  # links end mid-run, on both sides of the kill
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    runs = [_finetune_cli([*args, "--output", str(whole)]), _finetune_cli([*args, "--output", str(killed)], kill_at=5)]
    (_, err_whole), (_, err_killed) = (p.communicate(timeout=600) for p in runs)
    assert runs[0].returncode == 0, err_whole[-2000:]
    assert runs[1].returncode == -signal.SIGKILL, err_killed[-2000:]
    assert (killed / CKPT_DIR / "LATEST").read_text() == "step-0000004" and not (killed / "metrics.json").exists()

    resumed = _finetune_cli([*args, "--output", str(killed), "--resume"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    for name in OUTPUTS:
        assert (killed / name).is_file(), name
    assert not (killed / CKPT_DIR).exists()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, killed))
    assert b["steps"] == 8 and b["steps_this_session"] == 4
    assert a["losses"] == b["losses"] and a["metrics"] == b["metrics"] and a["eval_history"] == b["eval_history"]
    ta, tb = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (whole, killed))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (whole / "predictions.jsonl").read_bytes() == (killed / "predictions.jsonl").read_bytes()


# ---------------------------------------------------------------------------- 2. checkpoints are never unpickled
class _Crash(RuntimeError):
    pass


def _crash_at(n: int):
    def hook(step: int, _loss: float) -> None:
        if step == n:
            raise _Crash

    return hook


def _interrupted(cfg) -> Path:
    """Run ``cfg`` until it crashes after step 3 (checkpoint at step 2); returns the checkpoint folder."""
    with pytest.raises(_Crash):
        finetune(cfg, hook=_crash_at(3), **QUIET)
    root = Path(cfg.output) / CKPT_DIR
    return root / (root / "LATEST").read_text()


class _Payload:
    """Unpickling this creates ``path``: the stand-in for arbitrary code in a foreign run folder."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_old_torch_save_checkpoint_is_refused_unread(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """A checkpoint in the old format (trainer.pt / rng-0.pt, torch.save) crafted to run code when loaded:
    ``--resume`` stops with a message and the code never runs."""
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=6, save_every=2)
    ckpt = _interrupted(cfg)
    marker = tmp_path / "code-ran"
    for f in ckpt.glob("*.json"):
        f.unlink()
    for name in ("trainer.pt", "rng-0.pt"):
        torch.save({"step": 2, "payload": _Payload(marker)}, ckpt / name)
    with pytest.raises(RunError, match=r"older rankwise with torch\.save \(trainer\.pt\).*--overwrite"):
        finetune(cfg, resume=True, **QUIET)
    assert not marker.exists()


def test_crafted_files_beside_a_checkpoint_are_ignored(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """The same payload at the old names beside a valid checkpoint is never read; the run resumes and
    ends exactly as an uninterrupted one."""
    whole = finetune(_cfg(tmp_path / "a", tiny_models, sst2, max_steps=6, save_every=2), **QUIET)
    cfg = _cfg(tmp_path / "b", tiny_models, sst2, max_steps=6, save_every=2)
    ckpt = _interrupted(cfg)
    marker = tmp_path / "code-ran"
    for name in ("trainer.pt", "rng-0.pt", "optimizer.pt"):
        torch.save(_Payload(marker), ckpt / name)
    resumed = finetune(cfg, resume=True, **QUIET)
    assert not marker.exists()
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]


@pytest.mark.parametrize("damage", ["garbage-json", "wrong-format", "tensor-ref", "bad-step", "latest-escapes"])
def test_damaged_checkpoint_is_named(tmp_path: Path, tiny_models: dict[str, str], sst2: str, damage: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged trainer state or LATEST pointer stops ``--resume`` with a RunError naming the file, before
    any model is loaded."""
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=6, save_every=2)
    ckpt = _interrupted(cfg)
    doc = json.loads((ckpt / "trainer.json").read_text())
    if damage == "garbage-json":
        (ckpt / "trainer.json").write_text("{not json")
    elif damage == "wrong-format":
        (ckpt / "trainer.json").write_text(json.dumps(dict(doc, format="rankwise-checkpoint/1")))
    elif damage == "tensor-ref":
        doc["state"]["optimizer"]["state"] = {"__tensor__": "999"}
        (ckpt / "trainer.json").write_text(json.dumps(doc))
    elif damage == "bad-step":
        doc["state"]["step"] = -3
        (ckpt / "trainer.json").write_text(json.dumps(doc))
    else:
        (ckpt.parent / "LATEST").write_text("../../elsewhere")
    import rankwise_harness.train as train_mod

    monkeypatch.setattr(train_mod, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    want = {"garbage-json": "trainer.json cannot be used", "wrong-format": "trainer.json cannot be used.*format",
            "tensor-ref": "tensor '999' is not in", "bad-step": r"field\(s\) \['step'\]",
            "latest-escapes": "not a checkpoint folder"}[damage]
    with pytest.raises(RunError, match=want):
        finetune(cfg, resume=True, **QUIET)


def test_no_unpickling_anywhere_in_src() -> None:
    """Grep-level guarantee: nothing under src/ imports pickle or calls torch.load / numpy's pickle loading."""
    pattern = re.compile(r"\b(c?pickle|dill|cloudpickle|joblib)\b|torch\.load\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True")
    hits = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_checkpoint_state_round_trips_exactly() -> None:
    """The JSON + safetensors codec gives back the optimizer, scheduler and RNG states exactly (types too)."""
    import random

    import numpy as np

    from rankwise_harness.checkpoint import decode, encode, rng_state

    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    p.grad = torch.randn(3, 2)
    opt.step()
    sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(), "x": [1, (2.5, None)]}
    tensors: dict[str, torch.Tensor] = {}
    back = decode(json.loads(json.dumps(encode(state, tensors))), tensors)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["optimizer"]["state"].keys() == {0}
    for k, v in state["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v) and back["optimizer"]["state"][0][k].dtype == v.dtype
    assert back["scheduler"] == state["scheduler"] and back["x"] == [1, (2.5, None)]
    assert back["rng"]["python"] == random.getstate() and torch.equal(back["rng"]["torch"], torch.get_rng_state())
    np_then, np_now = back["rng"]["numpy"], np.random.get_state()
    assert np_then[0] == np_now[0] and np.array_equal(np_then[1], np_now[1]) and np_then[1].dtype == np_now[1].dtype
    assert np_then[2:] == np_now[2:]


# ---------------------------------------------------------------------------- 14. only what training changes
def test_lora_checkpoint_holds_no_base_weight(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """A LoRA checkpoint's model tensors are exactly the trainable ones: no frozen base weight or bias."""
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=6, save_every=2, targets=("query", "value"))
    ckpt = _interrupted(cfg)
    saved = load_file(str(ckpt / "model_tensors.safetensors"))
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"])
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["query", "value"],
                                               modules_to_save=["classifier"]))
    assert set(saved) == set(rankwise.trainable_parameters(model))
    assert not [k for k in saved if re.search(r"\.(query|value)\.(weight|bias)$", k)]
    base = sum(m.weight.numel() + m.bias.numel() for m in rankwise.adapter_layers(model).values())
    assert sum(t.numel() for t in saved.values()) < base  # the old checkpoints held these base tensors too


@dataclass(frozen=True)
class _BaseWriterConfig(rankwise.LoraConfig):
    method: ClassVar[str] = "base-writer"


def _shrink_base(model, layers, optimizer, state) -> None:  # noqa: ARG001
    """A stand-in method that writes into its frozen base weight after every step."""
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.mul_(0.99)


def test_a_method_that_writes_its_base_still_resumes_exactly(tmp_path: Path, tiny_models: dict[str, str],
                                                            sst2: str) -> None:
    """Method-agnostic: a checkpoint stores a frozen tensor exactly when it no longer equals the fresh
    base's, so a method that changes its base weight resumes bit for bit too (also across a second resume)."""
    lora = get_method("lora")
    _METHODS["base-writer"] = Method("base-writer", _BaseWriterConfig, lora.build, lora.rebuild, on_step=_shrink_base)
    try:
        kw = dict(method="base-writer", max_steps=8, save_every=2)
        whole = finetune(_cfg(tmp_path / "a", tiny_models, sst2, **kw), **QUIET)
        cfg = _cfg(tmp_path / "b", tiny_models, sst2, **kw)
        ckpt = _interrupted(cfg)
        stored = load_file(str(ckpt / "model_tensors.safetensors"))
        assert {k for k in stored if k.endswith((".query.weight", ".value.weight"))}  # the changed base weights
        assert not {k for k in stored if k.endswith((".query.bias", ".value.bias"))}  # unchanged: not stored
        with pytest.raises(_Crash):  # a second interruption, after the resumed part wrote its own checkpoint
            finetune(cfg, resume=True, hook=_crash_at(5), **QUIET)
        resumed = finetune(cfg, resume=True, **QUIET)
    finally:
        _METHODS.pop("base-writer", None)
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]


# ---------------------------------------------------------------------------- 3 + 13. rankwise import / export
def _interop(*argv: str) -> int:
    import argparse

    from rankwise_harness import interop_cli

    parser = argparse.ArgumentParser(prog="rankwise")
    interop_cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return interop_cli.run(parser.parse_args(list(argv)))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def adapters(bert_case, tmp_path: Path) -> Path:
    """``base/`` (a tiny BERT), ``peft/`` (a PEFT LoRA adapter for it) and ``rw/`` (a rankwise adapter)."""
    import copy

    peft = pytest.importorskip("peft")
    base = bert_case.make()
    base.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    rankwise.attach(ours, rankwise.LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    rankwise.save(ours, tmp_path / "rw")
    return tmp_path


def test_import_never_writes_over_a_peft_adapter_or_foreign_files(adapters: Path, capsys) -> None:
    """``rankwise import P --out P`` (and --out onto another PEFT adapter, or a folder of other files) is
    refused in one line with exit status 2; every file stays byte-identical. A previous import is replaced."""
    t = adapters
    (t / "other").mkdir()
    (t / "other" / "notes.txt").write_text("keep me")
    (t / "peft2").mkdir()
    for f in (t / "peft").iterdir():
        (t / "peft2" / f.name).write_bytes(f.read_bytes())
    before = {d: _snapshot(t / d) for d in ("peft", "peft2", "other", "base")}
    for out, says in (("peft", "is an input"), ("peft2", "holds a PEFT adapter"), ("other", "notes.txt"),
                      ("base", "is an input")):
        assert _interop("import", str(t / "peft"), "--base", str(t / "base"), "--out", str(t / out)) == 2
        err = capsys.readouterr().err
        assert says in err and "refus" in err or says == "is an input", err
        assert err.count("\n") == 1 and err.startswith("rankwise import: error: --out"), err
    assert {d: _snapshot(t / d) for d in before} == before
    assert _interop("import", str(t / "peft"), "--base", str(t / "base"), "--out", str(t / "new")) == 0
    assert _interop("import", str(t / "peft"), "--base", str(t / "base"), "--out", str(t / "new")) == 0  # its own kind
    assert _interop("import", str(t / "peft"), "--base", str(t / "base"), "--out", str(t / "rw")) == 0


def test_export_never_writes_over_its_input_or_a_rankwise_adapter(adapters: Path, capsys) -> None:
    """``rankwise export A --out A``, onto another rankwise adapter, or ``--format merged --out BASE``: exit
    status 2, one line, nothing changed. A previous export of the same format is replaced."""
    t = adapters
    (t / "rw2").mkdir()
    for f in (t / "rw").iterdir():
        (t / "rw2" / f.name).write_bytes(f.read_bytes())
    before = {d: _snapshot(t / d) for d in ("rw", "rw2", "base", "peft")}
    for out, fmt, says in (("rw", "peft", "is an input"), ("rw2", "peft", "holds a rankwise adapter"),
                           ("rw2", "vllm", "holds a rankwise adapter"), ("base", "merged", "is an input"),
                           ("rw2", "merged", "holds a rankwise adapter"), ("peft", "merged", "holds a PEFT adapter")):
        assert _interop("export", str(t / "rw"), "--base", str(t / "base"), "--out", str(t / out), "--format", fmt) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert {d: _snapshot(t / d) for d in before} == before
    for fmt in ("peft", "peft", "merged", "merged"):  # twice each: a previous export of that kind is replaced
        assert _interop("export", str(t / "rw"), "--base", str(t / "base"), "--out", str(t / fmt), "--format", fmt) == 0


def _rewrite_rankwise(folder: Path, change) -> None:
    """Re-save ``folder``'s adapter with its metadata changed by ``change(meta)`` (checksum still valid)."""
    from safetensors.torch import save as st_save

    meta, tensors = rankwise.read_adapter(folder)
    change(meta)
    (folder / "adapter.safetensors").write_bytes(st_save(tensors, metadata={"rankwise": json.dumps(meta)}))


@pytest.mark.parametrize("case", ["no-layers", "layers-a-list", "rank-0", "config-a-list", "bad-header",
                                  "peft-without-r", "peft-config-a-list"])
def test_malformed_adapters_get_one_line_not_a_traceback(adapters: Path, capsys, case: str) -> None:
    """Every malformed adapter the review tried, through the CLI: exit status 2 and one line naming it."""
    t = adapters
    if case.startswith("peft"):
        cfg = json.loads((t / "peft" / "adapter_config.json").read_text())
        cfg.pop("r")
        (t / "peft" / "adapter_config.json").write_text(json.dumps(cfg if case == "peft-without-r" else [cfg]))
        code = _interop("import", str(t / "peft"), "--base", str(t / "base"), "--out", str(t / "out"))
    else:
        if case == "bad-header":
            blob = (t / "rw" / "adapter.safetensors").read_bytes()
            (t / "rw" / "adapter.safetensors").write_bytes(b"\xff" * 8 + blob[8:])
        else:
            change = {"no-layers": lambda m: m.pop("layers"),
                      "layers-a-list": lambda m: m.update(layers=list(m["layers"])),
                      "rank-0": lambda m: [v.update(rank=0) for v in m["layers"].values()],
                      "config-a-list": lambda m: m.update(config=[m["config"]])}[case]
            _rewrite_rankwise(t / "rw", change)
        code = _interop("export", str(t / "rw"), "--base", str(t / "base"), "--out", str(t / "out"))
    err = capsys.readouterr().err  # transformers' own progress bars may precede the line
    lines = [line for line in err.splitlines() if "rankwise" in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("rankwise ") and "Traceback" not in err, err
    assert "error:" in lines[0]
    assert not (t / "out").exists()


# ---------------------------------------------------------------------------- 13. unreadable rows, numeric flags
def _sst2_bytes(folder: Path, bad: bytes) -> Path:
    """An SST-2 folder whose train.tsv has ``bad`` as its line 3 (of 5); dev.tsv is clean."""
    folder.mkdir()
    good = [b"sentence\tlabel", b"a fine film\t1", bad, b"a bad film\t0", b"fine again\t1"]
    (folder / "train.tsv").write_bytes(b"\n".join(good) + b"\n")
    (folder / "dev.tsv").write_bytes(b"\n".join(good[:2] + good[3:]) + b"\n")
    return folder


@pytest.mark.parametrize("bad,says", [
    (b"caf\xe9 au lait\t1", r"train\.tsv:3: not valid UTF-8 \(byte 0xe9 at character 4\)"),
    (b"x" * (200 * 1024) + b"\t1", r"train\.tsv:3: field larger than field limit \(131072\)"),
])
def test_unreadable_tsv_rows_are_named_and_skipped_when_asked(tmp_path: Path, bad: bytes, says: str) -> None:
    """A non-UTF-8 byte or a field over csv's 128 KiB limit: a DataError with file and line (not a raw
    UnicodeDecodeError / _csv.Error); ``--skip-bad-rows`` skips that row and keeps every other."""
    from rankwise_harness.data import DataError, get_task, load_task_data

    folder = _sst2_bytes(tmp_path / "sst2", bad)
    with pytest.raises(DataError, match=says + r".*--skip-bad-rows"):
        load_task_data(get_task("sst2"), str(folder))
    splits = load_task_data(get_task("sst2"), str(folder), skip_bad_rows=True)
    assert [e.text for e in splits.train] == ["a fine film", "a bad film", "fine again"]
    assert len(splits.skipped) == 1 and re.search(says, splits.skipped[0])


def test_non_utf8_gsm8k_line_is_named(tmp_path: Path) -> None:
    from rankwise_harness.data import DataError, read_gsm8k_jsonl

    path = tmp_path / "train.jsonl"
    rows = [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}).encode() for i in range(3)]
    path.write_bytes(b"\n".join([rows[0], rows[1].replace(b"q1", b"q\xff1"), rows[2]]) + b"\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid UTF-8 \(byte 0xff"):
        read_gsm8k_jsonl(path)
    skipped: list[str] = []
    assert [e.text for e in read_gsm8k_jsonl(path, skip_bad_rows=True, skipped=skipped)] == ["q0", "q2"]
    assert len(skipped) == 1


@pytest.mark.parametrize("flag,value,says", [
    ("--lr", "-1e-3", "--lr must be positive"), ("--lr", "nan", "--lr must be a finite number"),
    ("--lr", "inf", "--lr must be a finite number"), ("--max-train", "0", r"--max-train must be at least 1 \(omit it"),
    ("--max-train", "-5", "--max-train must be at least 1"), ("--max-eval", "-1", "--max-eval must be at least 1"),
    ("--batch-size", "-2", "--batch-size must be at least 1"), ("--epochs", "-1", "--epochs must be positive"),
    ("--epochs", "nan", "--epochs must be a finite number"), ("--max-steps", "-3", "--max-steps must be at least 1"),
    ("--warmup-ratio", "1.5", r"--warmup-ratio must be in \[0, 1\)"), ("--warmup-ratio", "-0.1", "--warmup-ratio"),
    ("--warmup-ratio", "nan", "--warmup-ratio"), ("--weight-decay", "-0.01", "--weight-decay must be 0 or more"),
    ("--lora-plus-ratio", "0", "--lora-plus-ratio must be positive"), ("--seed", "-1", "--seed must be 0 or more"),
    ("--save-every", "-1", "--save-every must be 0 or more"), ("--eval-every", "-2", "--eval-every must be 0 or more"),
    ("--grad-accum", "0", "--grad-accum must be at least 1"), ("--max-length", "0", "--max-length must be at least 1"),
    ("--r", "0", "r must be a positive integer"), ("--alpha", "nan", "alpha must be a positive finite number"),
    ("--dropout", "1.5", r"dropout must be in \[0, 1\)"), ("--set", "r=-2", "r must be a positive integer"),
])
def test_every_numeric_flag_is_checked_before_any_work(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch,
                                                      sst2: str, flag: str, value: str, says: str) -> None:
    """Each bad number: exit status 2 and a message naming the flag, before the model or the data is
    read and before the output folder is made."""
    import rankwise_harness.train as train_mod
    from rankwise_harness import cli

    monkeypatch.setattr(train_mod, "load_task_data", lambda *a: pytest.fail("the data was read"))
    monkeypatch.setattr(train_mod, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    assert cli.main(["finetune", "--task", "sst2", "--data", sst2, "--output", str(out), f"{flag}={value}"]) == 2
    assert re.search(says, capsys.readouterr().err)
    assert not out.exists()
