"""``compare``: every (method, seed) on one task, then a Markdown + CSV table and a plot.

Each run writes its own folder ``<output>/<method>-seed<seed>``; a finished run (``metrics.json``
present with the same settings) is reused, so an interrupted comparison picks up where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig, check_method
from .deps import can_plot
from .train import finetune


def run_folder(output: Path, method: str, seed: int) -> Path:
    return output / f"{method}-seed{seed}"


def _finished(folder: Path, cfg: RunConfig) -> dict[str, Any] | None:
    metrics, config = folder / "metrics.json", folder / "config.json"
    if not (metrics.is_file() and config.is_file()):
        return None
    old = RunConfig.from_dict(json.loads(config.read_text()).get("run", {})).identity()
    return json.loads(metrics.read_text()) if old == cfg.identity() else None


def compare(base: RunConfig, methods: list[str], seeds: list[int], output: Path, *, lr: float | None = None,
            overwrite: bool = False, show_progress: bool = True, log: Any = print) -> list[dict[str, Any]]:
    """Run every (method, seed); write ``compare.md``, ``compare.csv``, ``compare.png`` in ``output``.

    ``lr`` applies to every method; ``None`` gives each method its default (its config's ``default_lr``; full 5e-5).
    """
    for m in methods:
        check_method(m)
    results = []
    for method in methods:
        for seed in seeds:
            folder = run_folder(output, method, seed)
            cfg = dataclasses.replace(base, method=method, seed=seed, output=str(folder), lr=lr)
            done = None if overwrite else _finished(folder, cfg)
            if done is not None:
                log(f"reusing finished run {folder}")
                results.append(done)
                continue
            # an unfinished run with the same settings continues; a different run there is refused
            # (finetune says so) unless --overwrite
            started = (folder / "config.json").is_file() and not overwrite
            results.append(finetune(cfg, resume=started, overwrite=overwrite, show_progress=show_progress, log=log))
    rows = aggregate(results)
    write_tables(rows, output)
    if can_plot("compare.png"):
        plot_compare(rows, output / "compare.png", results[0]["task"] if results else "")
    log((output / "compare.md").read_text())
    return results


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: mean and std (over seeds) of each metric, params, step time, memory."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for method, runs in by_method.items():
        row: dict[str, Any] = {"method": method, "seeds": len(runs), "headline": runs[0]["headline_metric"]}
        for name in runs[0]["metrics"]:
            vals = np.array([r["metrics"][name] for r in runs], dtype=np.float64)
            row[f"{name}_mean"] = float(vals.mean())
            row[f"{name}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        row["trainable_params"] = runs[0]["trainable_params"]
        row["step_ms"] = 1000 * float(np.mean([r["step_seconds"] for r in runs]))
        row["init_seconds"] = float(np.mean([r["init_seconds"] for r in runs]))
        row["peak_memory_mb"] = float(np.max([r["peak_memory_mb"] for r in runs]))
        rows.append(row)
    return rows


def write_tables(rows: list[dict[str, Any]], output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    metric_names = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean")]
    header = ["method", *[f"{m} (mean ± std)" for m in metric_names], "trainable params", "step (ms)",
              "init (s)", "peak memory (MB)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["method"], *[f"{r[m + '_mean']:.4f} ± {r[m + '_std']:.4f}" for m in metric_names],
                 f"{r['trainable_params']:,}", f"{r['step_ms']:.1f}", f"{r['init_seconds']:.2f}",
                 f"{r['peak_memory_mb']:.0f}", str(r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    (output / "compare.md").write_text("\n".join(lines) + "\n")
    fields = ["method", *[f"{m}_{s}" for m in metric_names for s in ("mean", "std")], "trainable_params",
              "step_ms", "init_seconds", "peak_memory_mb", "seeds"]
    with (output / "compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_compare(rows: list[dict[str, Any]], path: Path, task: str) -> None:
    """Headline metric (mean ± std over seeds) against trainable parameters, log-scaled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    metric = rows[0]["headline"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.errorbar(r["trainable_params"], r[f"{metric}_mean"], yerr=r[f"{metric}_std"], fmt="o", capsize=4)
        ax.annotate(r["method"], (r["trainable_params"], r[f"{metric}_mean"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"{task}: {metric} vs trainable parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
