"""bench/gora_regime.py's held-out split (the lr sweep never sees dev) and its run commands."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("gora_regime", Path(__file__).resolve().parents[1] / "bench" / "gora_regime.py")
gr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gr)


def _glue(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "glue" / "CoLA").mkdir(parents=True)
    (data / "glue" / "MRPC").mkdir(parents=True)
    (data / "glue" / "CoLA" / "train.tsv").write_text("".join(f"src\t{i % 2}\t\tsentence {i} .\n" for i in range(50)))
    (data / "glue" / "MRPC" / "train.tsv").write_text(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(f"{i % 2}\t{i}\t{i}\tA {i}.\tB {i}.\n" for i in range(40)),
        encoding="utf-8")
    return data


def test_heldout_split_is_a_fixed_disjoint_tenth_in_the_release_format(tmp_path: Path) -> None:
    from rankwise_harness.data import get_task, read_glue_tsv

    data = _glue(tmp_path)
    for task, n in (("cola", 50), ("mrpc", 40)):
        args = argparse.Namespace(runs=str(tmp_path / "runs"), data=str(data), max_train=None)
        folder = gr.heldout_folder(task, args)
        train = read_glue_tsv(get_task(task), folder / "train.tsv")  # the harness reads both files
        dev = read_glue_tsv(get_task(task), folder / "dev.tsv")
        assert len(dev) == n // 10 and len(train) + len(dev) == n
        assert not {e.text for e in dev} & {e.text for e in train}
        whole = read_glue_tsv(get_task(task), data / "glue" / gr.TASKS[task][0] / "train.tsv")
        assert sorted(e.text for e in train + dev) == sorted(e.text for e in whole)
        again = gr.heldout_folder(task, argparse.Namespace(runs=str(tmp_path / "runs2"), data=str(data), max_train=None))
        assert (again / "dev.tsv").read_text() == (folder / "dev.tsv").read_text()  # fixed, not seed-dependent


def test_run_commands_follow_the_protocol(tmp_path: Path) -> None:
    args = argparse.Namespace(model="smollm2", calibration_batches=64, max_train=None)
    cmd = gr.run_args("mrpc", "gora", 1, 1e-4, "DATA", tmp_path / "out", args)
    flat = " ".join(cmd)
    for part in ("--method gora", "--lora-plus-ratio 16", "gamma=0.05", "n_steps=64", "--epochs 1", "--batch-size 32",
                 "--schedule cosine", "--warmup-ratio 0.03", "--lr 0.0001", "--r 8 --alpha 16", f"--targets {gr.TARGETS}"):
        assert part in flat, part
    assert "--targets" not in gr.run_args("mrpc", "full", 1, 2e-5, "DATA", tmp_path / "o", args)
