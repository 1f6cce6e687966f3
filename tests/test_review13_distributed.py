"""Review round 13: FSDP corners of ``save`` / ``export_peft`` and of the harness's checkpoint exchange, on 2 spawned
gloo processes (``harness_dist_worker``'s checks, only those named here: a spawn takes seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


HERE = Path(__file__).resolve().parent
WAIT_S = 30.0


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """This round's checks of ``harness_dist_worker.library_checks`` on 2 spawned processes; what each rank wrote."""
    import harness_dist_worker as w

    return w.spawn_library_checks(tmp_path_factory.mktemp("round13"), list(w.ROUND13_CHECKS), WAIT_S)


def test_save_refuses_a_sharded_modules_to_save_head_and_keeps_the_previous_adapter(checks: list[dict[str, Any]]) -> None:
    """Only the ``modules_to_save`` head sharded, the adapted layers whole: FSDP1 (the adapted layers ignored) wrote
    each rank's flat shard of the head's weight (rank 0: 22 of its 48 numbers as a 1-D tensor; rank 1: the rest, and
    an empty bias) as the adapter, over the previous one; FSDP2 raised numpy's error about tensor subclasses. Now
    every rank refuses, naming the head and the fix, and the previous adapter's file is as it was."""
    for r in checks:
        got = r["head_sharded"]
        for kind, fix in (("ignored", "summon_full_params"), ("wrapped_head", "summon_full_params"),
                          ("fsdp2_head", "get_model_state_dict")):
            for what in ("save", "export"):
                said = got[f"{kind}_{what}"]
                assert said.startswith("ValueError") and "'head'" in said and fix in said, (kind, what, said)
            assert got[f"{kind}_kept"] == "same", (kind, got)


def test_inside_summon_full_params_a_sharded_head_saves_what_one_process_saves(checks: list[dict[str, Any]]) -> None:
    """The fix the FSDP1 error names: inside ``summon_full_params`` every rank writes the file one process writes,
    byte for byte (the head whole)."""
    for r in checks:
        got = r["head_sharded"]
        for kind in ("ignored", "wrapped_head"):
            assert got[f"{kind}_summoned"] == "ok" and got[f"{kind}_summoned_file"] == "same", (kind, got)


def test_a_ctrl_c_on_one_rank_while_checkpointing_stops_every_rank_at_once(checks: list[dict[str, Any]]) -> None:
    """Rank 1 alone gets a Ctrl-C (``KeyboardInterrupt``) in a phase of the checkpoint write while rank 0 still writes.
    Before, rank 1 left without a word and rank 0 waited in the exchange of outcomes until the collective timed out
    (gloo's "Timed out waiting ... for send operation", after WAIT_S here; 30 min under Accelerate's default), or
    failed at once with "Connection closed by peer" if rank 1's process ended. Now rank 1 tells the others before
    leaving: both undo the phase and raise ``KeyboardInterrupt`` (the harness's ``RunInterrupted`` with the resume
    hint), rank 0's naming rank 1 and that the previous checkpoint is kept, well before the timeout."""
    r0, r1 = (r["ctrl_c"] for r in checks)
    assert r1["said"] == "KeyboardInterrupt: " and r1["undone"] == "True", r1
    assert r0["said"].startswith("KeyboardInterrupt: process 1 was interrupted") and "step-0000004" in r0["said"], r0
    assert "previous checkpoint (step-0000002) is kept" in r0["said"] and r0["undone"] == "True", r0
    assert float(r0["seconds"]) < WAIT_S / 2, r0
    assert r0["told"] == r1["told"] == "True", (r0, r1)  # every process knows: none is ended early (peers.leave_alone)


def test_a_ctrl_c_on_one_rank_while_the_harness_checkpoints_interrupts_every_rank(tmp_path: Path, still_bert: str) -> None:
    """The same in ``finetune`` on 2 torchrun processes: rank 1 alone is interrupted while it writes its part of the
    checkpoint of step 4. Both raise ``RunInterrupted`` at that step (rank 0 naming rank 1's Ctrl-C), the checkpoint of
    step 2 stays in force, readable, and no half-written folder is left. Collectives wait WAIT_S at most."""
    from conftest import write_sst2_slice
    from harness_dist_worker import FULL_AT

    import rankwise

    (tmp_path / "sst2").mkdir()
    data = write_sst2_slice(tmp_path / "sst2", 64, 32)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "harness_dist_worker.py"), "--model", still_bert, "--data", data, "--root", str(tmp_path),
           "--scenarios", "ctrl-c-ckpt", "--timeout-s", str(WAIT_S)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text())["ctrl-c-ckpt"].get("error", "") for r in (0, 1))
    new, old = f"step-{FULL_AT:07d}", f"step-{FULL_AT - 2:07d}"
    for said in (r0, r1):
        assert said.startswith("RunInterrupted: interrupted at step 5 of") and f"({old}) is kept" in said, (r0, r1)
    assert f"process 1 was interrupted (Ctrl-C) writing checkpoint {new}" in r0, r0
    told = [json.loads((tmp_path / f"rank{r}.json").read_text())["ctrl-c-ckpt"]["alone"] for r in (0, 1)]
    assert told == [False, False], told  # told to every process: the command line ends neither early
    folder = tmp_path / "ctrl-c-ckpt" / "checkpoints"
    assert (folder / "LATEST").read_text().strip() == old
    assert sorted(p.name for p in folder.iterdir()) == ["LATEST", old]
    rankwise.read_adapter(folder / old / "adapter")  # whole: its checksums verified


def test_flat_parameters_save_inside_summon_full_params_what_one_process_saves(checks: list[dict[str, Any]]) -> None:
    """``use_orig_params=False`` inside ``summon_full_params``: every tensor whole (views into the gathered flat
    parameter, its storage allocated on every rank), so ``save`` there writes, byte for byte, the file one process
    writes of the same adapter, and ``export_peft`` the same config, metadata and tensors (also with a
    ``modules_to_save`` head). Before, refused as outside it. Outside it (the flat storage freed again), still
    refused with the fix, which now names this way too. (``merge`` there stays refused: not checked.)"""
    for r in checks:
        got = r["flat_summoned"]
        for kind in ("lora", "head"):
            for what in ("save", "export"):
                assert got[f"{kind}_{what}"] == "ok" and got[f"{kind}_{what}_file"] == "same", (kind, what, got)
            after = got[f"{kind}_after"]
            assert after.startswith("ValueError") and "use_orig_params=True" in after, (kind, got)


def _launch_cli(root: Path, argv: list[str], env: dict[str, str]) -> list[tuple[int, str]]:
    """``harness_dist_worker.py cli``: the command line on 2 gloo processes started by hand (torch's environment
    variables, a free port; no torchrun, which would stop the other process itself); each one's exit status and
    stderr. Collectives wait WAIT_S at most, each process 240 s (then killed: the test fails, never hangs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        penv = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "harness_dist_worker.py"), "cli", str(root),
                                       str(WAIT_S), *argv], env=penv, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err))
    return out


def test_a_ctrl_c_on_one_process_in_a_training_step_ends_every_process_at_once_and_the_run_resumes(
        tmp_path: Path, still_bert: str) -> None:
    """``rankwise finetune`` on 2 processes; rank 1 alone gets a SIGINT in step 3's first micro-batch, rank 0 goes on
    into that step's collectives. Before, rank 1 printed its message and its ``main`` returned while rank 0 waited in
    its collective until rank 1's process ended (seconds of interpreter teardown; a process that lives on, as here
    where rank 1 lingers WAIT_S: the collective's timeout, 30 min by default), then died on gloo's bare "Connection
    closed by peer" / "Timed out" traceback. Now rank 1 ends its process right after its own cleanup (its ``main``
    never returns: no lingering), and rank 0 says at once that process 1 was interrupted, at which step, and which
    checkpoint is kept, with the command to resume; both exit 130. The run folder holds step 2's checkpoint, whole,
    and no half-written one; the same command with ``--resume`` on 2 processes finishes the run."""
    from conftest import write_sst2_slice

    import rankwise

    (tmp_path / "sst2").mkdir()
    data = write_sst2_slice(tmp_path / "sst2", 64, 32)
    out = tmp_path / "run"
    argv = ["finetune", "--task", "sst2", "--method", "lora", "--data", data, "--model", still_bert,
            "--output", str(out), "--r", "4", "--batch-size", "4", "--grad-accum", "2", "--epochs", "3",
            "--max-length", "32", "--max-train", "31", "--max-eval", "13", "--val-split", "0.23", "--eval-every", "1",
            "--save-every", "2", "--lr", "2e-2", "--warmup-ratio", "0", "--precision", "no", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    (c0, e0), (c1, e1) = _launch_cli(tmp_path, argv, dict(env, RANKWISE_TEST_SIGINT_AT="3"))
    said = (e0.strip().splitlines() or [""])[-1], (e1.strip().splitlines() or [""])[-1]
    assert (c0, c1) == (130, 130), (c0, c1, e0[-3000:], e1[-3000:])
    kept = f"the last checkpoint (step-0000002) is kept in {out / 'checkpoints'}; resume with: rankwise finetune"
    assert said[1].startswith("rankwise: interrupted at step 3 of 6 (2 done); ") and kept in said[1], said
    assert said[0].startswith("rankwise: interrupted at step 3 of 6 (2 done) (process 1 was interrupted (Ctrl-C)); "), said
    assert kept in said[0] and said[0].endswith(" --resume"), said
    assert not (tmp_path / "rank1.json").exists()  # rank 1 ended inside main, after its message
    waited = json.loads((tmp_path / "rank0.json").read_text())["at"] - json.loads((tmp_path / "signal.json").read_text())["at"]
    assert waited < WAIT_S / 2, waited  # measured 0.3 s; before: until rank 1's process ended, or WAIT_S
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["LATEST", "step-0000002"]
    assert (folder / "LATEST").read_text().strip() == "step-0000002"
    rankwise.read_adapter(folder / "step-0000002" / "adapter")  # whole: its checksums verified
    (c0, e0), (c1, e1) = _launch_cli(tmp_path, [*argv, "--resume"], env)
    assert (c0, c1) == (0, 0), (e0[-3000:], e1[-3000:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["steps_this_session"] == 4, metrics
