"""``compare``: every (method, seed) on one task, then a Markdown + CSV table and a plot.

Each run writes its own folder ``<output>/<method>-seed<seed>``; a finished run (``metrics.json``
present with the same settings) is reused, so an interrupted comparison picks up where it stopped.

``<output>`` is refused when it holds anything but a comparison (files that are not its tables, run
folders and ``compare.json`` marker), and its tables are replaced only when they are rankwise's (marked
by ``compare.json``, or beside rankwise runs) or ``--overwrite`` says so. A comparison holds the
folder's lock while it runs (``runlock.py``), as each of its runs holds its own.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from rankwise.adapter_file import atomic_write_bytes

from .checkpoint import RunError, read_run_json
from .config import RUN_MARKER, ConfigError, RunConfig, check_method
from .deps import can_plot
from .models import check_tokenizer
from .runlock import LOCK_NAME, acquire
from .runfolder import finished, save_figure
from .sources import adapter_source, flag_name, for_method
from .train import finetune

COMPARE_MARKER = "rankwise-compare/1"
MARKER_FILE = "compare.json"
TABLES = ("compare.md", "compare.csv", "compare.png")
_RUN_FOLDER = re.compile(r".+-seed\d+")


def run_folder(output: Path, method: str, seed: int) -> Path:
    return output / f"{method}-seed{seed}"


def _finished(folder: Path, cfg: RunConfig) -> bool:
    """Whether ``folder`` holds a finished run of ``cfg``'s settings (``finetune(resume=True)`` returns its result)."""
    config = folder / "config.json"
    if not (finished(folder) and config.is_file()):
        return False
    return RunConfig.from_dict(read_run_json(config).get("run", {})).identity() == cfg.identity()


def _is_run(folder: Path) -> bool:
    try:
        return folder.is_dir() and read_run_json(folder / "config.json").get("format") == RUN_MARKER
    except (RunError, AttributeError):
        return False


def check_compare_output(output: Path, overwrite: bool) -> None:
    """Refuse ``output`` when it holds anything but a comparison, or tables rankwise cannot tell are its own
    (no ``compare.json`` and no rankwise run beside them) without ``overwrite``; :class:`RunError` names them."""
    if output.exists() and not output.is_dir():
        raise RunError(f"--output {output} exists and is not a folder")
    held = sorted(p for p in output.iterdir() if p.name != LOCK_NAME) if output.is_dir() else []
    foreign = [p.name for p in held if p.name not in (*TABLES, MARKER_FILE)
               and not (p.is_dir() and _RUN_FOLDER.fullmatch(p.name))]
    if foreign:
        raise RunError(f"--output {output} holds files that are not a rankwise comparison ({', '.join(foreign[:6])}"
                       f"{', ...' if len(foreign) > 6 else ''}); refusing to write into it: choose another --output")
    marker = output / MARKER_FILE
    ours = (marker.is_file() and isinstance(m := read_run_json(marker), dict) and m.get("format") == COMPARE_MARKER)
    tables = [p.name for p in held if p.name in TABLES]
    if tables and not ours and not overwrite and not any(_is_run(p) for p in held if p.is_dir()):
        raise RunError(f"--output {output} holds {', '.join(tables)} that rankwise did not write (no {MARKER_FILE}, no "
                       "rankwise run beside them); pass --overwrite to replace them, or choose another --output")


def compare(base: RunConfig, methods: list[str], seeds: list[int], output: Path, *, lr: float | None = None,
            overwrite: bool = False, show_progress: bool = True, log: Any = print) -> list[dict[str, Any]]:
    """Run every (method, seed); write ``compare.md``, ``compare.csv``, ``compare.png`` in ``output``.

    ``lr`` applies to every method; ``None`` gives each method its default (its config's ``default_lr``; full 5e-5).
    """
    for m in methods:
        check_method(m)
    for flag, values in (("--methods", methods), ("--seeds", seeds)):
        twice = [str(v) for i, v in enumerate(values) if v in values[:i]]
        if twice:  # one run counted twice: a mean over it, a spread of 0
            raise ConfigError(f"{flag} names {', '.join(dict.fromkeys(twice))} more than once; each (method, seed) "
                              "run is counted once in the means: name each once")
    for m in methods:  # each run's settings (its --set fields, its flags) checked before the first run trains
        for_method(base, m, lr=lr)
    if base.model is not None:  # (the default models come with theirs)
        check_tokenizer(base.model)  # every run would be refused: refused before the folder is made
    check_compare_output(output, overwrite)
    lock = acquire(output, log)
    try:
        atomic_write_bytes(output / MARKER_FILE, (json.dumps({"format": COMPARE_MARKER, "task": base.task,
                                                              "methods": methods, "seeds": seeds}) + "\n").encode())
        return _compare(base, methods, seeds, output, lr, overwrite, show_progress, log)
    finally:
        lock.release()


def _compare(base: RunConfig, methods: list[str], seeds: list[int], output: Path, lr: float | None, overwrite: bool,
             show_progress: bool, log: Any) -> list[dict[str, Any]]:
    results = []
    for method in methods:
        left_out = adapter_source(method).given_unused(base)
        if left_out:
            log(f"{method}: {', '.join(flag_name(n) for n in left_out)} left out (no use for them; its config.json "
                "records the run without them)")
        for seed in seeds:
            folder = run_folder(output, method, seed)
            cfg = for_method(base, method, seed=seed, output=str(folder), lr=lr)
            if not overwrite and _finished(folder, cfg):
                log(f"reusing finished run {folder}")  # finetune checks that its data is this data
            # an unfinished run with the same settings continues; a different run there is refused
            # (finetune says so) unless --overwrite
            started = (folder / "config.json").is_file() and not overwrite
            results.append(finetune(cfg, resume=started, overwrite=overwrite, show_progress=show_progress, log=log))
    rows, base_rows = aggregate(results), baselines(results)
    write_tables(rows, output, base_rows)
    if can_plot("compare.png"):
        plot_compare(rows, output / "compare.png", results[0]["task"] if results else "", base_rows)
    log((output / "compare.md").read_text())
    return results


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: mean and std (over seeds; ``None`` with one seed) of each metric, params, step time,
    memory. ``trainable_params`` is the seeds' count when they agree, else their mean, with ``trainable_params_min``
    and ``_max`` (a method that allocates its ranks from data can train a different number per seed)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for method, runs in by_method.items():
        row: dict[str, Any] = {"method": method, "seeds": len(runs), "headline": runs[0]["headline_metric"]}
        row.update(_mean_std([r["metrics"] for r in runs]))
        row.update(param_counts([r["trainable_params"] for r in runs]))
        row["step_ms"] = 1000 * float(np.mean([r["step_seconds"] for r in runs]))
        row["init_seconds"] = float(np.mean([r["init_seconds"] for r in runs]))
        row["peak_memory_mb"] = float(np.max([r["peak_memory_mb"] for r in runs]))
        rows.append(row)
    return rows


def param_counts(counts: list[int]) -> dict[str, float | int]:
    """``trainable_params`` (the count, or the mean when seeds differ) and its min and max over seeds."""
    low, high = min(counts), max(counts)
    return {"trainable_params": low if low == high else float(np.mean(counts)), "trainable_params_min": low,
            "trainable_params_max": high}


def count_cell(counts: list[int]) -> str:
    """One count, or ``min–max`` where the runs (seeds) trained different numbers of parameters."""
    low, high = min(counts), max(counts)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def _params_cell(row: dict[str, Any]) -> str:
    return count_cell([row["trainable_params_min"], row["trainable_params_max"]])


def _mean_std(metrics: list[dict[str, float]]) -> dict[str, float | None]:
    """``{name_mean, name_std}`` over runs; the std only from two runs on (one run has no spread to show)."""
    out: dict[str, float | None] = {}
    for name in metrics[0]:
        vals = np.array([m[name] for m in metrics], dtype=np.float64)
        out[f"{name}_mean"] = float(vals.mean())
        out[f"{name}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else None
    return out


def baselines(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for what a method must beat: the majority class (classification) and, where runs evaluated before
    training (``--eval-before``), the untrained model: for a causal LM on label words its zero-shot score."""
    rows = []
    majority = next((r["majority_baseline"] for r in results if r.get("majority_baseline")), None)
    if majority:
        rows.append({"method": "majority class", "seeds": 0, **_mean_std([majority])})
    return rows + _before_training(results)


def _before_training(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``--eval-before`` rows: each run's scores after its adapter's init, before any step. Methods that start
    from the same model (the same scores, seed by seed: an update initialised to zero) share one row; a method whose
    init already changes the model (a data-driven initial step) gets its own row, named, never averaged in."""
    by_method: dict[str, dict[int, dict[str, float]]] = {}
    for r in results:
        if r.get("metrics_before"):
            by_method.setdefault(r["method"], {})[r["seed"]] = r["metrics_before"]
    groups: list[tuple[list[str], dict[int, dict[str, float]]]] = []
    for method, per_seed in by_method.items():
        same = next((g for g in groups if g[1] == per_seed), None)
        same[0].append(method) if same else groups.append(([method], per_seed))
    name = "zero-shot (before training)" if any(r.get("label_words") for r in results) else "before training"
    return [{"method": name if len(groups) == 1 else f"{name}: {', '.join(methods)}", "seeds": len(per_seed),
             **_mean_std(list(per_seed.values()))} for methods, per_seed in groups]


def _cell(row: dict[str, Any], metric: str) -> str:
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None:
        return "—"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _beats(row: dict[str, Any], majority: dict[str, Any] | None, metric: str) -> str:
    if majority is None:
        return "—"
    return "yes" if row[f"{metric}_mean"] > majority[f"{metric}_mean"] else "**no**"


def write_tables(rows: list[dict[str, Any]], output: Path, base_rows: list[dict[str, Any]] | None = None) -> None:
    """``compare.md`` (methods, then the baselines; a column saying whether each method beats the majority class
    on the headline metric) and ``compare.csv`` (the same rows, ``kind`` telling methods from baselines)."""
    output.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    base_rows = base_rows or []
    metric_names = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean")]
    headline = rows[0]["headline"]
    majority = next((b for b in base_rows if b["method"] == "majority class"), None)
    several = any(r["seeds"] > 1 for r in rows)
    header = ["method", *[f"{m} (mean ± std)" if several else m for m in metric_names],
              f"beats majority ({headline})", "trainable params", "step (ms)", "init (s)", "peak memory (MB)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["method"], *[_cell(r, m) for m in metric_names], _beats(r, majority, headline),
                 _params_cell(r), f"{r['step_ms']:.1f}", f"{r['init_seconds']:.2f}",
                 f"{r['peak_memory_mb']:.0f}", str(r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    for b in base_rows:
        lines.append("| " + " | ".join([f"*{b['method']}*", *[_cell(b, m) for m in metric_names], "", "", "", "", "",
                                        str(b["seeds"] or "")]) + " |")
    notes = ["", "Dev metrics; ± is the sample standard deviation over seeds (n − 1 in its denominator; shown from 2 "
             "seeds on)."]
    if majority is not None:
        notes.append("*majority class*: always predicting the most frequent training label; a method marked **no** "
                     "scores no better than that on the headline metric.")
    if any(r["trainable_params_min"] != r["trainable_params_max"] for r in rows):
        notes.append("trainable params: min–max over seeds where they differ (the method allocates its ranks from "
                     "data, so each seed trained its own number); compare.csv has the mean, min and max.")
    notes.append("step (ms): wall-clock time per optimizer step while the run ran; other load on the machine "
                 "inflates it, so compare step times only between runs made under the same load.")
    atomic_write_bytes(output / "compare.md", ("\n".join(lines + notes) + "\n").encode())
    fields = ["kind", "method", *[f"{m}_{s}" for m in metric_names for s in ("mean", "std")], "trainable_params",
              "trainable_params_min", "trainable_params_max", "step_ms", "init_seconds", "peak_memory_mb", "seeds"]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows([{"kind": "method", **r} for r in rows] + [{"kind": "baseline", **b} for b in base_rows])
    atomic_write_bytes(output / "compare.csv", buf.getvalue().encode())


def plot_compare(rows: list[dict[str, Any]], path: Path, task: str, base_rows: list[dict[str, Any]] | None = None) -> None:
    """Headline metric (mean; ± std over seeds from two seeds on) against trainable parameters (log scale; the
    mean, a horizontal bar spanning min to max where seeds differ), one marker per method named in the legend, the
    baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    if not rows:
        return
    metric = rows[0]["headline"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "osD^vP*Xh<>"
    for i, r in enumerate(rows):
        x, low, high = r["trainable_params"], r["trainable_params_min"], r["trainable_params_max"]
        ax.errorbar(x, r[f"{metric}_mean"], yerr=r[f"{metric}_std"], xerr=None if low == high else [[x - low], [high - x]],
                    fmt=markers[i % len(markers)],
                    ms=8, capsize=4, label=f"{r['method']} ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})")
    for i, b in enumerate(base_rows or []):
        style = ("--", ":", "-.")[i % 3]
        ax.axhline(b[f"{metric}_mean"], color="grey", ls=style, lw=1.3, label=f"{b['method']}: {b[f'{metric}_mean']:.3f}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the decades are labelled
    ax.margins(x=0.25, y=0.15)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"dev {metric}" + (" (mean ± std over seeds)" if any(r["seeds"] > 1 for r in rows) else ""))
    ax.set_title(f"{task}: {metric} vs trainable parameters")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
