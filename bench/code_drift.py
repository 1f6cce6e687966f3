"""Does a code change move the numbers? A drift check for experiments that run across sessions and commits.

The ledger's long experiments (``gora-mrpc``, ``edora-decided-r*``, ``raclora-rank``) run for days, and each
session continues them from whatever ``main`` is then, so one experiment's entries can come from several commits
(each entry's ``rankwise_commit``). This script trains the same small runs at two commits, one per kind of arm
those experiments use (MiniLM with LoRA, DoRA with a held-out split and per-epoch evaluation, EDoRA on the four
targets with the RoBERTa head, a RAC-LoRA chain with Adam's state kept, GoRA with LoRA+, full fine-tuning, and
SmolLM2 label words with LoRA and GoRA), and compares what must not change: every metric and loss (times,
memory, paths and versions left out), the predictions file, and the saved adapter's or model's bytes. The result
is appended to ``docs/bench/code-drift.md``; the experiment reports list the commits their entries span.

    python bench/code_drift.py 6e3eeb9              # that commit against HEAD
    python bench/code_drift.py OLD NEW              # two commits (or branches)

Each commit is checked out into a temporary ``git worktree`` (removed afterwards); the runs are single-threaded
and take a few minutes in all.

The probes pass ``--subset prefix``: their ``--max-train`` and ``--max-eval`` rows are the files' first rows at
every commit since ``--subset`` exists (``6e3eeb9`` has it). ``--max-eval`` drew the first dev rows until
2026-12-04 and a stratified sample since, so without it a check across that change would differ for that reason
alone. The prefix changes the probes' training rows too, on both sides alike: a check stays a like-for-like
comparison of the code, though its rows are no longer those of the default sample.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "glue"
OUT = ROOT / "docs" / "bench" / "code-drift.md"
MINILM = ["--task", "sst2", "--data", str(DATA / "SST-2"), "--max-train", "96", "--max-eval", "64", "--max-steps", "8",
          "--batch-size", "8", "--seed", "3", "--subset", "prefix"]
SMOLLM = ["--task", "mrpc", "--data", str(DATA / "MRPC"), "--model", "smollm2", "--max-train", "24", "--max-eval", "16",
          "--max-steps", "3", "--batch-size", "4", "--max-length", "96", "--seed", "1", "--targets", "q_proj,v_proj",
          "--r", "4", "--alpha", "8", "--subset", "prefix"]
PROBES: dict[str, list[str]] = {
    "minilm-lora": ["--method", "lora", *MINILM],
    "minilm-dora-heldout": ["--method", "dora", *MINILM, "--val-split", "0.25", "--eval-each-epoch", "--epochs", "2"],
    "minilm-edora-4targets": ["--method", "edora", *MINILM, "--targets", "query,value,output.dense", "--head", "roberta",
                              "--pooling", "mean"],
    "minilm-raclora-chain": ["--method", "raclora", *MINILM, "--set", "link_steps=3", "--set", "keep_optimizer_state=true",
                             "--head", "linear", "--pooling", "mean", "--targets", "query,value", "--r", "1", "--alpha", "2"],
    "minilm-gora-loraplus": ["--method", "gora", *MINILM, "--lora-plus-ratio", "16", "--set", "n_steps=2",
                             "--save-every", "2"],  # checkpoints as the experiments' GoRA runs write them
    "minilm-full": ["--method", "full", *MINILM, "--lr", "3e-5"],
    "smollm2-lora": ["--method", "lora", *SMOLLM, "--schedule", "cosine", "--warmup-ratio", "0.03"],
    "smollm2-gora": ["--method", "gora", *SMOLLM, "--lora-plus-ratio", "16", "--set", "gamma=0.05", "--set", "n_steps=2",
                     "--save-every", "2"],
}
VOLATILE = ("second", "time", "date", "utc", "peak", "rss", "memory", "output", "version", "host", "_ms", "command",
            "wall", "path", "session")


def stable(value: Any) -> Any:
    """``value`` without the keys that differ between identical runs (times, memory, paths, versions)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not any(s in k for s in VOLATILE)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def fingerprint(folder: Path) -> dict[str, Any]:
    """What a run must reproduce: its stable metrics, its predictions and its weights' bytes (sha256)."""
    weights = sorted(folder.glob("adapter/*.safetensors")) + sorted(folder.glob("model*.safetensors"))
    return {"metrics": stable(json.loads((folder / "metrics.json").read_text())),
            "predictions": (folder / "predictions.jsonl").read_text(),
            "weights": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in weights}}


def run_probes(commit: str, work: Path) -> tuple[str, dict[str, dict[str, Any] | str]]:
    """Check ``commit`` out into ``work`` and run every probe there; returns its full sha and each probe's
    fingerprint (or the tail of its log when it failed)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", commit], capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = work / sha[:12]
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), sha], check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(tree / "src"))
    found: dict[str, dict[str, Any] | str] = {}
    try:
        for name, flags in PROBES.items():
            out = work / f"{sha[:12]}-{name}"
            done = subprocess.run([sys.executable, "-m", "rankwise_harness.cli", "finetune", *flags, "--output", str(out),
                                   "--no-progress", "--overwrite"], cwd=tree, env=env, capture_output=True, text=True)
            found[name] = fingerprint(out) if done.returncode == 0 else "failed: " + (done.stdout + done.stderr)[-300:]
            print(f"{sha[:12]} {name}: {'ran' if done.returncode == 0 else 'FAILED'}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return sha, found


def common(old: Any, new: Any, where: str = "") -> tuple[Any, Any, list[str]]:
    """``old`` and ``new`` cut to the dict keys both have (recursively), and the keys only one has (``+key``: new
    only, ``-key``: old only). A field a later commit adds (or drops) moves no number the two share."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return old, new, []
    only = [f"+{where}{k}" for k in new if k not in old] + [f"-{where}{k}" for k in old if k not in new]
    kept_old, kept_new = {}, {}
    for k in old.keys() & new.keys():
        kept_old[k], kept_new[k], deeper = common(old[k], new[k], f"{where}{k}.")
        only += deeper
    return kept_old, kept_new, only


def compare(old: dict[str, Any] | str, new: dict[str, Any] | str) -> list[str]:
    """One cell per compared part: ``same`` or ``differs`` (``failed`` when a run did not finish); the metrics are
    compared on the fields both commits write, and a field only one writes is named beside the verdict."""
    if isinstance(old, str) or isinstance(new, str):
        return ["failed"] * 3
    shared_old, shared_new, only = common(old["metrics"], new["metrics"])
    cells = ["same" if shared_old == shared_new else "differs"]
    if only:
        cells[0] += f" (fields in one commit only: {', '.join(sorted(only))})"
    return cells + ["same" if old[k] == new[k] else "differs" for k in ("predictions", "weights")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="the earlier commit (e.g. the one an experiment's first entries came from)")
    ap.add_argument("new", nargs="?", default="HEAD", help="the later commit (default HEAD)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="code-drift-") as tmp:
        (old_sha, old), (new_sha, new) = (run_probes(c, Path(tmp)) for c in (args.old, args.new))
    rows = [f"| {name} | {' | '.join(compare(old[name], new[name]))} |" for name in PROBES]
    same = all(row.count("| same") == 3 for row in rows)
    lines = [f"## {old_sha[:12]} → {new_sha[:12]}: {'identical' if same else 'NUMBERS MOVED'}", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, `python bench/code_drift.py {args.old} {args.new}`; "
             "single-threaded CPU runs (SmolLM2-135M-Instruct dequantised from Q4_1).", "",
             "| probe | metrics and losses | predictions | weights (bytes) |", "|---|---|---|---|", *rows, ""]
    header = ("# Code drift checks\n\nDoes a commit change the numbers the ledger's experiments produce? Each section is one "
              "`bench/code_drift.py` check of two commits on the same small runs (see the script). An experiment whose "
              "entries span commits is comparable across them where a check here says identical.\n\n")
    OUT.write_text((OUT.read_text() if OUT.is_file() else header) + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
