"""Review round 10: the harness under 2 processes (torchrun, gloo on CPU) against one process.

One torchrun launch (``tests/harness_dist_worker.py``) runs ``finetune`` several times on 2 processes x 4 rows;
the references here run one process x 8 rows (the same global batches) on a BERT without dropout, so the two
must agree: the sampled rows, the losses, the evaluations and the early-stopping decision, GoRA's
calibration, the trained tensors; an interrupted 2-process run resumed must equal the uninterrupted one
bit for bit; a NaN on one rank must stop both at the same step. The launch and the references take about
26 s together (measured on the shared 2-core box under load), so these run in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_sst2_slice
from harness_dist_worker import CUT_AT, FULL_AT, NAN_AT, QUIET, run_config

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory, still_bert: str) -> dict[str, Any]:
    """The worker's scenarios on 2 processes; per rank, what each returned or raised."""
    data = write_sst2_slice(tmp_path_factory.mktemp("sst2"), 64, 32)
    root = tmp_path_factory.mktemp("two")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "harness_dist_worker.py"), "--model", still_bert, "--data", data, "--root", str(root)]
    from rankwise_harness.runlock import acquire

    held = acquire(root / "locked")  # a live run (this process) holds the "locked" scenario's folder
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        held.release()
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"root": root, "data": data, "model": still_bert, "ranks": ranks}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, launched: dict[str, Any]) -> dict[str, Any]:
    """The same run on one process x 8 rows."""
    from rankwise_harness.train import finetune

    out = tmp_path_factory.mktemp("one") / "run"
    return finetune(run_config(launched["model"], launched["data"], out, 8), **QUIET) | {"out": str(out)}


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter.safetensors"))


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_equal_one_on_the_same_global_batches(launched: dict[str, Any], one_process: dict[str, Any]) -> None:
    """Rows sampled, losses, every evaluation (dev 13 rows and held-out 7: neither a multiple of 2), the
    early-stopping step, GoRA's ranks and the trained tensors: 2 processes x 4 rows = 1 process x 8 rows."""
    two = launched["ranks"][0]["whole"]
    assert "error" not in two, two
    for key in ("metrics", "steps", "eval_history", "losses"):  # every rank the same result, the same stop
        assert launched["ranks"][1]["whole"][key] == two[key], key
    assert (two["train_examples"], two["dev_examples"], two["val_examples"]) == (24, 13, 7)
    config = [json.loads((Path(p) / "config.json").read_text()) for p in (launched["root"] / "whole", one_process["out"])]
    assert config[0]["data_fingerprint"] == config[1]["data_fingerprint"]
    assert config[0]["method_config"] == config[1]["method_config"]
    a, b = _adapter(launched["root"] / "whole"), _adapter(Path(one_process["out"]))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}, "GoRA allocated other ranks"
    assert two["steps"] == one_process["steps"] and two["stopped_early"] == one_process["stopped_early"]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one_process["losses"]), rtol=1e-4, atol=1e-6)
    assert [e["val"] for e in two["eval_history"]] == [e["val"] for e in one_process["eval_history"]]
    assert two["eval_history"] == one_process["eval_history"]
    assert two["metrics"] == one_process["metrics"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_two_process_evaluation_is_the_one_process_evaluation_of_the_same_model(launched: dict[str, Any]) -> None:
    """The 2-process run's adapter, evaluated by one process on the same 13 dev rows, gives its metrics.json and
    its predictions.jsonl: every row once, in dev order (no row padded in or counted twice)."""
    import rankwise
    from rankwise_harness.data import get_task, load_task_data
    from rankwise_harness.evaluation import evaluate
    from rankwise_harness.selection import sample_indices, sample_rows
    from rankwise_harness.tasktypes import task_type_for

    folder = launched["root"] / "whole"
    cfg = run_config(launched["model"], launched["data"], folder, 4)
    task = get_task("sst2")
    tt = task_type_for(task, launched["model"], cfg)
    model = tt.load(torch.device("cpu"), lambda _m: None)
    rankwise.load(model, folder / "adapter")
    dev = sample_rows(load_task_data(task, launched["data"]).dev, 13, cfg.data_seed)

    class One:
        process_index, num_processes, is_main_process, device = 0, 1, True, torch.device("cpu")

        @staticmethod
        def autocast():
            import contextlib

            return contextlib.nullcontext()

    records: list[dict[str, Any]] = []
    metrics = evaluate(model, tt, dev, One(), 8, records)
    written = json.loads((folder / "metrics.json").read_text())
    assert metrics == written["metrics"]
    rows = _rows(folder / "predictions.jsonl")
    # each record names its dev file row (the sample's rows, in file order); otherwise the one-process records
    file_rows = sample_indices(load_task_data(task, launched["data"]).dev, 13, cfg.data_seed)
    assert [r["index"] for r in rows] == file_rows and len(set(file_rows)) == 13
    assert rows == [{**r, "index": file_rows[r["index"]]} for r in records]


def test_two_process_run_resumed_equals_uninterrupted(launched: dict[str, Any]) -> None:
    """Stopped during step 3 (checkpoint of step 2), resumed on 2 processes: the losses, evaluations, metrics,
    predictions and adapter bytes of the uninterrupted 2-process run."""
    whole, cut = (launched["ranks"][0][k] for k in ("whole", "cut"))
    assert "error" not in cut, cut
    assert cut["steps_this_session"] == whole["steps"] - (CUT_AT - 1)
    for key in ("losses", "eval_history", "metrics", "steps"):
        assert cut[key] == whole[key], key
    a, b = (launched["root"] / k for k in ("whole", "cut"))
    assert (a / "adapter" / "adapter.safetensors").read_bytes() == (b / "adapter" / "adapter.safetensors").read_bytes()
    assert (a / "predictions.jsonl").read_text() == (b / "predictions.jsonl").read_text()


def test_a_two_process_checkpoint_is_refused_by_one_process(launched: dict[str, Any]) -> None:
    from rankwise_harness.train import RunError, finetune

    folder = launched["root"] / "left"
    assert (folder / "checkpoints" / "LATEST").read_text().strip() == f"step-{CUT_AT - 1:07d}"
    before = sorted(p.name for p in folder.rglob("*"))
    with pytest.raises(RunError, match="started with 2 processes .* resumed by 1"):
        finetune(run_config(launched["model"], launched["data"], folder, 4), resume=True, **QUIET)
    assert sorted(p.name for p in folder.rglob("*")) == before  # nothing lost


@pytest.mark.parametrize("kind", ["nan-loss", "nan-grad"])
def test_a_nan_on_one_rank_stops_every_rank_at_that_step(launched: dict[str, Any], kind: str) -> None:
    errors = [launched["ranks"][r][kind].get("error", "") for r in (0, 1)]
    what = "training loss" if kind == "nan-loss" else "gradient"
    for e in errors:
        assert f"non-finite {what}" in e and f"at step {NAN_AT} of" in e, errors
    assert not (launched["root"] / kind / "adapter").exists()


def test_a_full_disk_on_one_rank_while_checkpointing_stops_every_rank_and_keeps_the_previous(launched: dict[str, Any]) -> None:
    """Review round 12: rank 0's disk fills while it writes the checkpoint of step 4. Before, rank 0 raised and
    rank 1 waited at the barrier after the write (until torchrun killed it, or a later collective of rank 0's met
    it). Now both raise at once, rank 0 the full disk, rank 1 naming it; the checkpoint of step 2 stays in force,
    readable, and no half-written folder is left."""
    import rankwise

    r0, r1 = (launched["ranks"][r]["disk-full"].get("error", "") for r in (0, 1))
    new, old = f"step-{FULL_AT:07d}", f"step-{FULL_AT - 2:07d}"
    assert r0.startswith("DiskFullError") and new in r0, (r0, r1)
    assert r1.startswith("RunError") and f"process 0 failed writing checkpoint {new} (DiskFullError" in r1, (r0, r1)
    assert f"previous checkpoint ({old}) is kept" in r1, r1
    folder = launched["root"] / "disk-full" / "checkpoints"
    assert (folder / "LATEST").read_text().strip() == old
    assert sorted(p.name for p in folder.iterdir()) == ["LATEST", old]
    rankwise.read_adapter(folder / old / "adapter")  # whole: its checksums verified


def test_a_full_disk_on_one_rank_at_the_end_stops_every_rank(launched: dict[str, Any]) -> None:
    """The same for the finished run's outputs (rank 0 writes them while the others waited at a barrier): both raise,
    rank 1 naming rank 0's full disk; no metrics.json, the checkpoints are kept for ``--resume``."""
    r0, r1 = (launched["ranks"][r]["disk-full-end"].get("error", "") for r in (0, 1))
    assert r0.startswith("DiskFullError") and "final outputs" in r0, (r0, r1)
    assert r1.startswith("RunError") and "process 0 failed writing the run's final outputs (DiskFullError" in r1, r1
    folder = launched["root"] / "disk-full-end"
    assert not (folder / "metrics.json").exists() and (folder / "checkpoints" / "LATEST").is_file()


def test_a_run_folder_another_live_run_holds_stops_every_rank_at_once(launched: dict[str, Any]) -> None:
    """Review round 12: rank 0 cannot take the run folder's lock (a live run holds it). Before, rank 0 raised and
    rank 1 waited at the barrier after it (until the collective timed out or torchrun killed it). Now both raise
    at once, rank 0 the lock's error, rank 1 naming it; nothing is written into the folder."""
    r0, r1 = (launched["ranks"][r]["locked"].get("error", "") for r in (0, 1))
    assert r0.startswith("RunError") and "process 0" not in r0, (r0, r1)
    assert r1.startswith("RunError") and "process 0 failed opening the run folder (RunError" in r1, (r0, r1)
    # the test's lock, released, removed the folder it had made: it could only if the run wrote nothing there
    assert not (launched["root"] / "locked").exists()


class _Indices:
    """A batcher whose batch is the rows themselves (integers), to see which rows a process gets."""

    def train_batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {"rows": torch.tensor(rows)}


@pytest.mark.parametrize("n_rows", [40, 11, 5])
def test_each_process_gets_its_share_of_the_one_process_calibration_batch(n_rows: int) -> None:
    """Calibration and head warm-up batches: process r of 2 with batch size 4 gets rows 4r..4r+3 of the batch one
    process with batch size 8 draws from the same seed; with fewer rows than the global batch each process still
    gets 4 (the draw wraps, as the training order does), and one process keeps its short batch as before."""
    from rankwise_harness.batches import random_batches

    rows = list(range(n_rows))
    one = [b["rows"].tolist() for b in random_batches(_Indices(), rows, 3, 8, 17, torch.device("cpu"))]
    parts = [[b["rows"].tolist() for b in random_batches(_Indices(), rows, 3, 4, 17, torch.device("cpu"), (r, 2))]
             for r in (0, 1)]
    for k in range(3):
        assert len(parts[0][k]) == len(parts[1][k]) == 4
        whole = parts[0][k] + parts[1][k]
        if n_rows >= 8:
            assert whole == one[k]
        else:  # one process: its n_rows distinct rows; two: those rows, in the same order, wrapped to 8
            assert len(set(one[k])) == len(one[k]) == n_rows and whole == (one[k] * 2)[:8]



@pytest.fixture(scope="module")
def library_checks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """``harness_dist_worker.library_checks`` on 2 spawned gloo processes; what each rank wrote."""
    import harness_dist_worker as w

    return w.spawn_library_checks(tmp_path_factory.mktemp("library"))


def test_a_nan_in_one_ranks_fsdp2_shard_stops_rankwise_step_on_every_rank(library_checks: list[dict[str, Any]]) -> None:
    """``rankwise.step``'s finiteness check under FSDP2: a NaN in rank 0's shard of ``fc1.lora_b`` is every rank's
    (each checks its shard, then the flags are combined), so both raise naming it; none steps alone or hangs."""
    said = [r["fsdp2_nan"] for r in library_checks]
    for s in said:
        assert s.startswith("raised:") and "'fc1.lora_b'" in s, said


def test_several_named_chains_step_together_under_ddp(library_checks: list[dict[str, Any]]) -> None:
    """Two named adapters (RAC-LoRA and COLA with a broadcast seed) stepped by one ``rankwise.step`` under DDP, links
    ending at different steps: identical on both ranks and equal to one process accumulating the two halves."""
    for r in library_checks:
        got = r["several"]
        assert got["ranks_identical"] and got["links"] == {"default": 2, "b": 4}, got
        assert got["moved"] > 1e-3 and got["max_abs_diff"] <= 1e-6, got


# ---------------------------------------------------------------- review round 11: the same spawn's further checks
def test_a_nan_in_one_ranks_fsdp1_shard_stops_every_rank(library_checks: list[dict[str, Any]]) -> None:
    """FSDP1 (``use_orig_params=True``) outside ``summon_full_params``: a NaN in rank 0's flat shard of ``fc1.lora_b``
    (its gradient for ``check_finite_grads``, the tensor for ``rankwise.step``) makes both ranks raise naming it,
    although rank 1 holds none of fc1 (an empty shard, no gradient); finite, both step."""
    said = [r["fsdp1_nan"] for r in library_checks]
    for s in said:
        assert s["grads"].startswith("FloatingPointError") and "'fc1.lora_b'" in s["grads"], said
        assert s["clean"] == "ok", said
        assert s["step"].startswith("FloatingPointError") and "'fc1.lora_b'" in s["step"], said


def test_fsdp1_flat_parameters_are_refused_with_the_fix(library_checks: list[dict[str, Any]]) -> None:
    """``FullyShardedDataParallel(use_orig_params=False)`` leaves the adapter's tensors as views into freed flat
    storage (reading them crashed the process): ``rankwise.step`` and ``check_finite_grads`` refuse it on both ranks."""
    for r in library_checks:
        for what in ("step", "grads"):
            said = r["fsdp1_flat"][what]
            assert said.startswith("ValueError") and "use_orig_params=True" in said and "fully_shard" in said, r


def test_gora_calibration_failing_on_one_rank_stops_every_rank(library_checks: list[dict[str, Any]]) -> None:
    """Rank 1's calibration batches fail (a NaN, too few: an iterator that ends, a short list) while rank 0's do not:
    both ranks raise at that step (rank 1 its own error, rank 0 the NaN's layer or "another process"), none waits in
    a collective the other never joins."""
    r0, r1 = (r["gora_rank1_fails"] for r in library_checks)
    for kind in ("nan", "nan_early"):
        for said in (r0[kind], r1[kind]):
            assert said.startswith("FloatingPointError") and "calibration step 2" in said, (r0, r1)
    for kind in ("ran_out", "short"):
        assert r1[kind].startswith("ValueError") and "calibration batches" in r1[kind], r1
        assert r0[kind].startswith("RuntimeError") and "another process" in r0[kind], r0


# ---------------------------------------------------------------- review round 12: the same spawn's further checks
def test_save_export_and_merge_refuse_fsdp_shards_and_keep_the_previous_adapter(library_checks: list[dict[str, Any]]) -> None:
    """FSDP1 outside ``summon_full_params`` and FSDP2 hold each rank's shards of the adapter tensors: ``save`` wrote
    rank 0's flat shards as the adapter over the previous one (and ``export_peft`` did on both ranks), FSDP2 and
    ``use_orig_params=False`` crashed unclearly (``export_peft``: SIGSEGV). Now every rank refuses with the fix, and
    the previous adapter's file is as it was."""
    for r in library_checks:
        got = r["save_sharded"]
        for what in ("fsdp1_save", "fsdp1_export", "fsdp1_merge"):
            assert got[what].startswith("ValueError") and "summon_full_params" in got[what], got
        assert got["fsdp1_kept"] == "same", got
        for what in ("fsdp2_save", "fsdp2_export"):
            assert got[what].startswith("ValueError") and "get_model_state_dict" in got[what], got
        for what in ("flat_save", "flat_export", "flat_merge"):
            assert got[what].startswith("ValueError") and "use_orig_params=True" in got[what], got


def test_the_fixes_the_errors_name_save_what_one_process_saves(library_checks: list[dict[str, Any]]) -> None:
    """Inside FSDP1's ``summon_full_params`` every rank saves the whole adapter, and FSDP2's state gathered by
    ``get_model_state_dict`` into an unsharded copy saves it too: byte for byte the file one process saves."""
    for r in library_checks:
        assert r["save_sharded"]["fsdp1_summoned"] == "ok" and r["save_sharded"]["fsdp1_summoned_file"] == "same", r
    assert library_checks[0]["save_sharded"]["fsdp2_gathered_file"] == "same", library_checks[0]
