"""Issue 28, harness half (items 2, 3, 10, 12, 13, 17, 19): what a second adversarial review broke, each
case a test (docs/reliability.md, "Adversarial review, round 2").

Run folders owned by one live run (a lock naming its PID and host), ``compare --output`` that never writes
over foreign files, resume refused on other training data, non-finite regression labels named, a full disk
answered in one line with nothing lost, conflicting or equivalent flags on ``--resume``, Ctrl-C in one line.
The data-loss cases run real CLI processes on real folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rankwise_harness.checkpoint import CKPT_DIR, RunError
from rankwise_harness.config import ConfigError, RunConfig
from rankwise_harness.data import DataError, get_task, load_task_data
from rankwise_harness.train import finetune
from test_harness_data import FORMATS, _folder
from test_hardening_harness import _Crash, _crash_at
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

QUIET = dict(show_progress=False, log=lambda _m: None)


def _interrupted(cfg: RunConfig, at: int = 3) -> None:
    """Run ``cfg`` until it crashes after step ``at`` (a checkpoint every 2 steps)."""
    with pytest.raises(_Crash):
        finetune(cfg, hook=_crash_at(at), **QUIET)
    assert (Path(cfg.output) / CKPT_DIR / "LATEST").is_file()


def _copy_data(src: str, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst

SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------------------- 12. non-finite regression labels
@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "4e38", "-1e39"])
@pytest.mark.parametrize("split", ["train.tsv", "dev.tsv"])
def test_non_finite_scores_are_a_data_error_naming_file_and_line(tmp_path: Path, raw: str, split: str) -> None:
    """STS-B scores that are not finite as a float32 (the training dtype): ``DataError`` naming the file, the line
    and the value; with ``--skip-bad-rows`` that row is skipped and listed. Finite scores still parse."""
    header, rows, _ = FORMATS["stsb"]
    bad = rows[0].rsplit("\t", 1)[0] + f"\t{raw}"
    lines = [header, *rows, bad]
    train, dev = (lines, [header, *rows]) if split == "train.tsv" else ([header, *rows], lines)
    folder = _folder(tmp_path, "stsb", train, dev)
    with pytest.raises(DataError, match=rf"{split}:4: score '{raw}' is not a finite number"):
        load_task_data(get_task("stsb"), str(folder))
    splits = load_task_data(get_task("stsb"), str(folder), skip_bad_rows=True)
    assert len(splits.train) == len(splits.dev) == 2
    assert [s.split(": score")[0].rsplit("/", 1)[-1] for s in splits.skipped] == [f"{split}:4"]
    assert all(abs(e.label) < 6 for e in splits.train + splits.dev)


# ---------------------------------------------------------------------------- 10. --resume on other data
def _flip_labels(line: str) -> str:
    text, _, label = line.rpartition("\t")
    return f"{text}\t{1 - int(label)}"


@pytest.mark.parametrize("change", ["every-label-flipped", "one-text-edited", "a-row-appended", "dev-edited"])
def test_resume_on_other_data_is_refused_naming_the_file(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                         change: str) -> None:
    """The run records a SHA-256 of the examples each split uses (``config.json``: ``data_fingerprint``); a
    ``--resume`` whose data gives other examples (the review's every-label flip, one edited text, a row added,
    an edited dev file) is refused before any training, naming the file. Put back,
    the data resumes and the run ends as an uninterrupted one."""
    data = _copy_data(sst2, tmp_path / "data")
    cfg = _cfg(tmp_path, tiny_models, str(data), max_steps=6, save_every=2)
    whole = finetune(_cfg(tmp_path / "whole", tiny_models, str(data), max_steps=6, save_every=2), **QUIET)
    _interrupted(cfg)
    recorded = json.loads((Path(cfg.output) / "config.json").read_text())["data_fingerprint"]
    assert recorded["train"]["examples"] == 64 and recorded["train"]["file"].endswith("train.tsv")
    file = "dev.tsv" if change == "dev-edited" else "train.tsv"
    original = (data / file).read_text()
    head, *rows = original.splitlines()
    if change == "every-label-flipped":
        rows = [_flip_labels(r) for r in rows]
    elif change == "a-row-appended":
        rows = rows[:40] + ["an inserted row\t1"] + rows[40:]
    else:
        rows[5] = rows[5].replace(rows[5].split("\t")[0], "a different text")
    (data / file).write_text("\n".join([head, *rows]) + "\n")
    split = "dev" if file == "dev.tsv" else "train"
    with pytest.raises(RunError, match=rf"--resume: the {split} data changed since this run started: .*{file} now gives"):
        finetune(cfg, resume=True, **QUIET)
    (data / file).write_text(original)
    resumed = finetune(cfg, resume=True, **QUIET)
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]


# ---------------------------------------------------------------------------- 17. conflicting and equivalent flags
def test_resume_and_overwrite_together_are_one_clear_error(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """``--resume --overwrite`` on a finished run (the review's case: it printed "nothing to resume (pass
    --overwrite)" and exited 0) and on an interrupted one: ``ConfigError`` naming both flags, nothing touched."""
    finished = _cfg(tmp_path / "finished", tiny_models, sst2, max_steps=2)
    finetune(finished, **QUIET)
    interrupted = _cfg(tmp_path / "interrupted", tiny_models, sst2, max_steps=6, save_every=2)
    _interrupted(interrupted)
    for cfg in (finished, interrupted):
        before = {p: p.read_bytes() for p in Path(cfg.output).rglob("*") if p.is_file()}
        with pytest.raises(ConfigError, match="--resume and --overwrite contradict each other.*pass one"):
            finetune(cfg, resume=True, overwrite=True, **QUIET)
        assert {p: p.read_bytes() for p in Path(cfg.output).rglob("*") if p.is_file()} == before


def test_equivalent_spellings_compare_equal_and_real_differences_are_named(tmp_path: Path) -> None:
    """``RunConfig.identity`` (what ``--resume`` and ``compare`` compare) is one spelling per setting: the default
    model, ``minilm`` and the packaged MiniLM's folder; ``--r 8`` / ``--alpha 16`` / ``--set r=8`` and the
    method's defaults; ``--targets all-linear`` and none; the default pooling spelled out; the task's default
    template and label words; a data folder by a relative or absolute path or a symlink. A real difference
    still differs, named by field."""
    from rankwise_harness.models import minilm_path
    from rankwise_harness.train import _settings_diff
    from rankwise_harness.verbalize import DEFAULT_VERBALIZERS

    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    base = RunConfig(task="sst2", data=str(data)).identity()
    v = DEFAULT_VERBALIZERS["sst2"]
    same = [dict(model="minilm"), dict(model=minilm_path()), dict(model=minilm_path() + "/"), dict(r=8), dict(alpha=16),
            dict(overrides={"r": "8", "alpha": "16.0"}), dict(targets=("all-linear",)), dict(pooling="mean"),
            dict(template=v.template, label_words=v.label_words), dict(data=str(tmp_path / "link")),
            dict(data=os.path.relpath(data))]
    for kw in same:
        kw.setdefault("data", str(data))
        assert RunConfig(task="sst2", **kw).identity() == base, kw
    different = {"method_config.r": dict(r=4), "method_config.target_modules": dict(targets=("query",)),
                 "pooling": dict(pooling="cls"), "model": dict(model=str(tmp_path)), "lr": dict(lr=1e-4)}
    for field, kw in different.items():
        diff = _settings_diff(base, RunConfig(task="sst2", data=str(data), **kw).identity())
        assert diff == ([field, "pooling"] if field == "model" else [field]), field  # another model: its own pooling


def test_resume_with_the_default_model_spelled_out(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """End to end: a run started with the model's folder and default targets resumes when the same model is
    spelled through a symlink and the targets as ``all-linear``, and ends as the uninterrupted run."""
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=6, save_every=2)
    whole = finetune(_cfg(tmp_path / "whole", tiny_models, sst2, max_steps=6, save_every=2), **QUIET)
    _interrupted(cfg)
    (tmp_path / "model-link").symlink_to(tiny_models["bert"])
    respelled = RunConfig(**{**cfg.to_dict(), "model": str(tmp_path / "model-link"), "targets": ("all-linear",),
                             "r": None, "overrides": {"r": "4"}})
    resumed = finetune(respelled, resume=True, **QUIET)
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]


# ---------------------------------------------------------------------------- 2. one live run per folder
# the real CLI; a patched rankwise.step waits after step 1 until the file GATE exists (a run that lasts as long
# as the test needs) and SIGKILLs the process after step KILL_AT
_CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C, even under a shell's `cmd &` (SIG_IGN)
import rankwise
from rankwise_harness import cli
kill_at, gate = int(os.environ.get("KILL_AT", "0")), os.environ.get("GATE")
real_step, calls = rankwise.step, [0]
def step(model, optimizer=None, **kw):
    real_step(model, optimizer, **kw)
    calls[0] += 1
    while gate and not os.environ.get("PAUSE_AT") and not os.path.exists(gate):
        time.sleep(0.05)
    if calls[0] == int(os.environ.get("PAUSE_AT", "0")):  # say so, then wait for GATE or a signal
        open(os.environ["READY"], "w").close()
        while not (gate and os.path.exists(gate)):
            time.sleep(0.05)
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
rankwise.step = step
sys.exit(cli.main(sys.argv[1:]))
"""


def _cli(args: list[str], **env: str) -> subprocess.Popen:
    full = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1", **env)
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run_args(tiny_models: dict[str, str], sst2: str, out: Path, steps: int = 6) -> list[str]:
    return ["finetune", "--task", "sst2", "--data", sst2, "--model", tiny_models["bert"], "--max-steps", str(steps),
            "--save-every", "2", "--batch-size", "8", "--max-length", "32", "--r", "4", "--lr", "5e-3", "--no-progress",
            "--output", str(out)]


def test_two_runs_on_one_output_second_refused_at_once(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """The review's case: two ``rankwise finetune`` processes started together on one ``--output``. Exactly one
    runs (exit 0, every output, checkpoints all its own); the other exits 2 while the first is still
    training, with one line naming the owner's PID and host; no lock file is left. The same for a second run
    with ``--resume`` or ``--overwrite`` against a live one: refused, nothing deleted."""
    out, gate = tmp_path / "run", tmp_path / "gate"
    args = _run_args(tiny_models, sst2, out, steps=6)
    procs = [_cli(args, GATE=str(gate)), _cli(args, GATE=str(gate))]
    try:
        _race(procs, args, gate, out)
    finally:
        gate.write_text("go")  # a failed assertion must not leave a child waiting
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


_SLOW_OWNER = """
import fcntl, json, os, socket, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))  # the window between taking the lock and writing the record
record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "command": "slow owner"}
os.ftruncate(fd, 0)
os.pwrite(fd, (json.dumps(record) + "\\n").encode(), 0)
time.sleep(30)
"""


@pytest.mark.parametrize("stale", [False, True], ids=["empty-file", "dead-owners-record"])
def test_a_refusal_inside_the_owners_first_moments_still_names_the_owner(tmp_path: Path, stale: bool) -> None:
    """CI's race (stop 39): the second run tried the lock after the owner had taken it but before it had written its
    record, and was refused with "its owner has not written its PID yet". The refusal now waits for the record, so
    it names the live owner; the same when the file still holds a killed run's record the owner has not yet
    replaced (the refusal must not name the dead PID)."""
    import socket

    from rankwise_harness.runlock import LOCK_NAME, acquire

    folder = tmp_path / "run"
    folder.mkdir()
    if stale:  # a record left by a process that is gone (a child that has ended)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (folder / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                    "started": "earlier", "command": "killed run"}) + "\n")
    owner = subprocess.Popen([sys.executable, "-c", _SLOW_OWNER, str(folder / LOCK_NAME), "0.8"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=rf"in use by another rankwise run \(pid {owner.pid} on host "):
            acquire(folder)
    finally:
        owner.kill()
        owner.wait()


def _race(procs: list[subprocess.Popen], args: list[str], gate: Path, out: Path) -> None:
    import socket

    loser, deadline = None, time.monotonic() + 300
    while loser is None:  # the refused one ends first, while the owner trains
        if time.monotonic() > deadline:  # a lock that lets both in: both wait at the gate (round 66: it hung CI)
            pytest.fail("neither run was refused within 300 s: both took --output (the run lock let them in)")
        time.sleep(0.05)
        loser = next((p for p in procs if p.poll() is not None), None)
    winner = procs[1 - procs.index(loser)]
    _, err = loser.communicate()
    assert loser.returncode == 2 and winner.poll() is None, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert f"is in use by another rankwise run (pid {winner.pid} on host {socket.gethostname()}" in err, err
    others = [_cli([*args, extra]) for extra in ("--resume", "--overwrite")]  # while the owner still runs
    for other in others:
        _, err2 = other.communicate(timeout=300)
        assert other.returncode == 2 and f"pid {winner.pid}" in err2, err2
    assert winner.poll() is None
    gate.write_text("go")
    _, err_w = winner.communicate(timeout=600)
    assert winner.returncode == 0, err_w[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["steps_this_session"] == 6
    assert (out / "adapter" / "adapter.safetensors").is_file() and not (out / ".rankwise-run.lock").exists()


def test_stale_lock_of_a_killed_run_is_named_and_taken_over(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """``kill -9`` leaves the lock file (its ``flock`` dies with the process): ``--resume`` names the dead owner's
    PID, takes the folder over and finishes; a lock file from another host is refused with the command that
    removes it, and after that command the run resumes."""
    out = tmp_path / "run"
    args = _run_args(tiny_models, sst2, out)
    killed = _cli(args, KILL_AT="3")
    killed.communicate(timeout=600)
    assert killed.returncode == -9
    lock = out / ".rankwise-run.lock"
    assert json.loads(lock.read_text())["pid"] == killed.pid
    record = lock.read_text()
    lock.write_text(record.replace(json.loads(record)["host"], "elsewhere.example"))
    refused = _cli([*args, "--resume"])
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 2 and f"locked by a run on another host (pid {killed.pid} on host elsewhere.example" in err
    assert f"remove the lock (rm {lock})" in err and lock.is_file()
    lock.write_text(record)
    resumed = _cli([*args, "--resume"])
    out_text, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert f"was left by pid {killed.pid} on this host" in out_text and "taking the folder over" in out_text
    assert json.loads((out / "metrics.json").read_text())["steps_this_session"] == 4 and not lock.exists()


# ---------------------------------------------------------------------------- 3. compare --output
def _compare_args(tiny_models: dict[str, str], sst2: str, out: Path) -> list[str]:
    return ["compare", "--methods", "lora", "--task", "sst2", "--data", sst2, "--model", tiny_models["bert"],
            "--seeds", "0", "--max-steps", "2", "--batch-size", "8", "--max-length", "32", "--r", "2", "--no-progress",
            "--output", str(out)]


def _bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_compare_never_overwrites_a_users_tables(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """The review's case, as a real process: ``rankwise compare --output DIR`` where DIR holds the user's own
    ``compare.csv`` / ``compare.md``: exit 2, one line naming them and ``--overwrite``; every byte unchanged."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "compare.csv").write_text("method,accuracy\nmy-model,0.93\n")
    (out / "compare.md").write_text("# my notes\n")
    before = _bytes(out)
    proc = subprocess.run([sys.executable, "-m", "rankwise_harness.cli", *_compare_args(tiny_models, sst2, out)],
                          env=dict(os.environ, PYTHONPATH=str(SRC)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "holds compare.csv, compare.md that rankwise did not write" in proc.stderr and "--overwrite" in proc.stderr
    assert _bytes(out) == before


@pytest.mark.parametrize("holds", ["foreign-file", "foreign-folder", "tables-only", "a-file-path"])
def test_compare_refuses_every_foreign_output(tmp_path: Path, holds: str) -> None:
    """The class: anything but a comparison's own files (its tables, ``compare.json``, ``<method>-seed<N>`` run
    folders) is refused, with or without ``--overwrite``; unmarked tables without rankwise runs beside them need
    ``--overwrite``. Refused before any run starts; nothing changed."""
    from rankwise_harness.compare import check_compare_output

    out = tmp_path / "out"
    if holds == "a-file-path":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "compare.md").write_text("mine")
        if holds == "foreign-file":
            (out / "results.txt").write_text("mine")
        elif holds == "foreign-folder":
            (out / "checkpoints").mkdir()
    want = {"foreign-file": "results.txt", "foreign-folder": "checkpoints", "tables-only": "rankwise did not write",
            "a-file-path": "is not a folder"}[holds]
    with pytest.raises(RunError, match=want):
        check_compare_output(out, overwrite=False)
    if holds == "tables-only":
        check_compare_output(out, overwrite=True)
    else:
        with pytest.raises(RunError, match=want):
            check_compare_output(out, overwrite=True)


def test_compare_reuses_its_own_folder(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """A comparison's own folder (marked by ``compare.json``; or an older one, unmarked but with its rankwise
    runs) is continued: finished runs reused, tables rewritten, no lock left behind."""
    from rankwise_harness import cli

    out = tmp_path / "cmp"
    args = _compare_args(tiny_models, sst2, out)
    assert cli.main(args) == 0
    assert json.loads((out / "compare.json").read_text())["format"] == "rankwise-compare/1"
    (out / "compare.json").unlink()  # as an older rankwise left it
    stamp = (out / "lora-seed0" / "metrics.json").stat().st_mtime_ns
    assert cli.main(args) == 0
    assert (out / "lora-seed0" / "metrics.json").stat().st_mtime_ns == stamp
    assert (out / "compare.json").is_file() and not (out / ".rankwise-run.lock").exists()


# ---------------------------------------------------------------------------- 19. Ctrl-C
@pytest.mark.parametrize("checkpointed", [True, False])
def test_ctrl_c_is_one_line_with_the_command_that_resumes(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                          checkpointed: bool) -> None:
    """SIGINT to a real ``rankwise finetune`` in step 3 of 6: exit 130 and one line (no traceback) naming the step,
    the checkpoint kept and the command that resumes; that command, run as printed, finishes the run (4 steps
    this session). Without checkpoints the line says none was written and gives the command that starts
    over. The folder's lock is released either way."""
    import shlex
    import signal

    out, ready = tmp_path / "run", tmp_path / "ready"
    args = _run_args(tiny_models, sst2, out)
    if not checkpointed:
        args[args.index("--save-every") + 1] = "0"
    proc = _cli([*args, "--overwrite"], PAUSE_AT="3", READY=str(ready))
    deadline = time.time() + 600
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("rankwise: interrupted at step 3 of 6 (2 done); "), lines[0]
    assert not (out / ".rankwise-run.lock").exists()
    if not checkpointed:
        assert "no checkpoint was written" in lines[0] and lines[0].split("; ")[-1].startswith("start again with: rankwise finetune")
        assert lines[0].endswith("--overwrite") and "--resume" not in lines[0]
        return
    assert f"the last checkpoint (step-0000002) is kept in {out / CKPT_DIR}" in lines[0]
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[:2] == ["rankwise", "finetune"] and command[-1] == "--resume" and "--overwrite" not in command
    resumed = _cli(command[1:])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["steps_this_session"] == 4


# ---------------------------------------------------------------------------- 13. disk full
def _full_disk(monkeypatch: pytest.MonkeyPatch, when: dict[str, bool], only: str = "") -> None:
    """From when["full"] on, every fsync of a file whose path contains ``only`` fails with ENOSPC, as a full
    disk makes it (every harness and library write goes through write, fsync, rename)."""
    import errno

    real = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if when["full"] and only in path and not os.path.isdir(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("where", ["checkpoint", "final-everything", "final-adapter-only"])
def test_disk_full_is_one_error_keeps_everything_and_resume_finishes(tmp_path: Path, tiny_models: dict[str, str],
                                                                     sst2: str, monkeypatch: pytest.MonkeyPatch,
                                                                     where: str) -> None:
    """ENOSPC while writing the step-4 checkpoint, or the final outputs (all of them, or only the adapter after
    metrics.json fitted): one ``DiskFullError`` naming the folder, what it wrote, the space needed and what is
    kept; no temp file left; the last good checkpoint intact; ``--resume`` after space is freed ends exactly as
    the uninterrupted run."""
    from rankwise_harness.checkpoint import DiskFullError, latest_checkpoint, read_checkpoint

    whole = finetune(_cfg(tmp_path / "whole", tiny_models, sst2, max_steps=6, save_every=2), **QUIET)
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=6, save_every=2)
    when = {"full": False}
    _full_disk(monkeypatch, when, only="adapter.safetensors" if where == "final-adapter-only" else "")
    full_after = 3 if where == "checkpoint" else 6

    def hook(step: int, _loss: float) -> None:
        when["full"] = when["full"] or step == full_after

    out = Path(cfg.output)
    want = (r"writing checkpoint step-0000004 needs about [\d.]+ MB \([\d.]+ MB free\); the previous checkpoint "
            r"\(step-0000002\) is kept" if where == "checkpoint" else
            r"writing the run's final outputs needs about [\d.]+ MB .*the last checkpoint \(step-0000004\) is kept")
    with pytest.raises(DiskFullError, match=rf"no space left on device in {out}.*{want}.*--resume"):
        finetune(cfg, hook=hook, **QUIET)
    assert _leftovers(out) == [] and not (out / ".rankwise-run.lock").exists()
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == ("step-0000002" if where == "checkpoint" else "step-0000004")
    read_checkpoint(ckpt, 0)  # intact
    assert (out / "metrics.json").is_file() == (where == "final-adapter-only")
    if where == "final-adapter-only":  # the metrics fitted: kept, and they are the run's
        assert json.loads((out / "metrics.json").read_text())["metrics"] == whole["metrics"]
    assert not (out / "adapter" / "adapter.safetensors").exists()
    when["full"] = False  # space freed
    resumed = finetune(cfg, resume=True, **QUIET)
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]
    assert not (out / CKPT_DIR).exists() and (out / "adapter" / "adapter.safetensors").is_file()


def _tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk_gets_one_line_and_resume_finishes(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """A real full filesystem (a small tmpfs, filled by a ballast file after the step-2 checkpoint): the real
    ``rankwise finetune`` exits 2 with one line naming the folder and the space needed; no temp file left, the
    step-2 checkpoint intact; with the ballast removed the printed remedy (``--resume``) finishes the run.
    Needs ``mount`` (root); skipped where it is not allowed."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    out, ready, gate = disk / "run", tmp_path / "ready", tmp_path / "gate"
    args = _run_args(tiny_models, sst2, out)
    proc = _cli(args, PAUSE_AT="3", READY=str(ready), GATE=str(gate))
    try:
        while not ready.exists() and proc.poll() is None:
            time.sleep(0.05)
        with (disk / "ballast").open("wb", buffering=0) as fh:  # fill the disk
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        gate.write_text("go")
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2, err[-2000:]
        assert err.strip().count("\n") == 0 and "Traceback" not in err, err
        assert f"rankwise: error: no space left on device in {out / CKPT_DIR}: writing checkpoint step-0000004 needs about" in err
        assert "the previous checkpoint (step-0000002) is kept" in err and "--resume" in err
        assert _leftovers(out) == [] and (out / CKPT_DIR / "LATEST").read_text() == "step-0000002"
        (disk / "ballast").unlink()
        resumed = _cli([*args, "--resume"])
        _, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err[-2000:]
        assert json.loads((out / "metrics.json").read_text())["steps_this_session"] == 4
    finally:
        gate.write_text("go")  # a failed assertion must not leave the child waiting
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", str(disk)], capture_output=True)
