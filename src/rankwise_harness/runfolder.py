"""A run's folder: whether it holds a finished run, checking (and clearing) it before a run, and the closing
summary and pictures a run leaves there."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CKPT_DIR, RunError, latest_checkpoint, read_run_json
from .config import RUN_MARKER, RunConfig
from .runlock import LOCK_NAME


# what a differing setting means when its name alone does not say it
DIFF_NOTES = {"eval_subset": "eval_subset is how --max-eval's dev rows are drawn (--subset; a run recorded before "
                             "--max-eval sampled took the dev file's first rows, as --subset prefix does)"}


def finished(out: Path) -> bool:
    """Whether ``out`` holds a finished run: its metrics and its result written, its checkpoints gone (a finish
    stopped by a full disk leaves them, so ``--resume`` finishes it)."""
    result = (out / "adapter" / "adapter.safetensors").is_file() or (out / "model.safetensors").is_file()
    return (out / "metrics.json").is_file() and result and not (out / CKPT_DIR / "LATEST").is_file()


def prepare_output(cfg: RunConfig, resume: bool, overwrite: bool, delete: bool = True) -> Path | None:
    """Check the output folder; returns the checkpoint to resume from, if any. Never deletes a
    folder that is not a rankwise run; ``delete``: clear one that ``overwrite`` replaces now (:func:`clear_run`;
    ``finetune`` clears it later, just before its first write)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} exists and is not a folder")
    config_file = out / "config.json"
    has_run = config_file.is_file()
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not has_run:
            raise RunError(f"--output {out} is not empty and holds no rankwise run; refusing to write into it")
        previous = read_run_json(config_file)
        if not isinstance(previous, dict):
            raise RunError(f"--output {out} has a config.json that rankwise did not write; refusing to use it")
        if resume:
            was = RunConfig.from_dict(previous.get("run", {}))
            diff = settings_diff(was.identity(), cfg.identity())
            if diff:
                notes = "".join(f"; {DIFF_NOTES[k]}" for k in diff if k in DIFF_NOTES)
                if "keep_best" in diff:
                    notes += f"; {keep_best_note(was.keep_best)}"
                raise RunError(f"--resume: {out} holds a run with different settings ({', '.join(diff)}){notes}; "
                               "resume with the same settings or choose another --output")
            return latest_checkpoint(out)
        if not overwrite:
            raise RunError(f"--output {out} holds another run ({previous.get('run', {}).get('method')} on "
                           f"{previous.get('run', {}).get('task')}); pass --overwrite to replace it or --resume to continue it")
        if previous.get("format") != RUN_MARKER:
            raise RunError(f"--output {out} has a config.json that rankwise did not write; refusing to delete it")
        if delete:
            clear_run(out)
    return None


def clear_run(out: Path) -> None:
    """Delete a run folder's contents but the lock this run holds (``--overwrite``, once the new run is about to
    write: bad input found before then leaves the old run whole)."""
    if not out.is_dir():
        return
    for child in out.iterdir():
        if child.name != LOCK_NAME:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def keep_best_note(started_with: bool) -> str:
    """Why a run's ``--keep-best`` cannot change on ``--resume``, and what to pass (``started_with``: the run's)."""
    if started_with:
        return ("keep_best: the run was started with --keep-best (its snapshot of the best held-out evaluation is "
                "kept as it trains); resume it with --keep-best, or start again with --overwrite")
    return ("keep_best: the run was started without --keep-best, so no snapshot of its earlier evaluations' models "
            "was kept; resume it without --keep-best, or start again with --keep-best and --overwrite")


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings (``RunConfig.identity``) that differ, by flag name; the method config's by field."""
    diff = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b and isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diff.append(key)
    return diff


def loss_window(n_steps: int) -> int:
    """How many steps the first/last loss means cover: 10, or half the run (at least 1) when it is shorter
    than 20 steps, so the two windows never share a step."""
    return max(1, min(10, n_steps // 2))


def fmt_metrics(m: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in m.items())


def summary(result: dict[str, Any], out: Path, saved: str = "adapter/") -> str:
    """The run's closing lines; ``saved``: what holds its result in ``out`` (``adapter/`` or ``model.safetensors``)."""
    lines = [f"== {result['method']} on {result['task']} (seed {result['seed']}) =="]
    if result.get("metrics_before"):
        lines.append(f"before:      {fmt_metrics(result['metrics_before'])}")
    lines.append(f"after:       {fmt_metrics(result['metrics'])}")
    losses = result["losses"]
    if len(losses) == 1:
        lines.append(f"loss:        {losses[0]:.4f} (one step)")
    elif losses:
        k = loss_window(len(losses))
        lines.append(f"loss:        {np.mean(losses[:k]):.4f} (mean of the first {k} steps) -> "
                     f"{np.mean(losses[-k:]):.4f} (last {k})")
    lines.append(f"trainable:   {result['trainable_params']:,} of {result['total_params']:,} parameters"
                 f" (task head {result.get('head_params') or 0:,})")
    if result.get("best"):
        b = result["best"]
        lines.append(f"best on val: step {b['step']} (epoch {b['epoch']}): val {fmt_metrics(b['val'])}; "
                     f"dev {fmt_metrics(b['dev'])}")
    kept = result.get("kept") or {}
    if kept.get("which") == "best" and kept.get("step") != result["steps"]:
        lines.append(f"kept:        the model of step {kept['step']}, the best held-out evaluation (--keep-best): "
                     "`after` is its dev result, metrics.json's `last` the final model's")
    lines.append(f"time:        {result['train_seconds']:.1f}s training ({result['steps']} steps, "
                 f"{1000 * result['step_seconds']:.1f} ms/step), init {result['init_seconds']:.2f}s")
    lines.append(f"peak memory: {result['peak_memory_mb']:.0f} MB ({result['peak_memory_kind']})")
    lines.append(f"outputs:     {out}/ (config.json, metrics.json, predictions.jsonl, loss_curve.png, "
                 f"{saved})")
    return "\n".join(lines)


def plot_loss(losses: list[float], path: Path, title: str) -> None:
    """The training loss per optimizer step (and its running mean) as ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 5:
        w = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.8, label=f"mean of {w}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically (a full disk leaves no partial file) and close it."""
    import matplotlib.pyplot as plt
    from rankwise.adapter_file import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
