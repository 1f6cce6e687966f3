"""The rest of issue 8's speed section: inference latency unmerged vs merged, GoRA's initialisation
cost against ``n_steps``, and adapter file sizes. Packaged MiniLM, CPU, same targets and rank as
``bench/speed.py`` (rank 8 on query, key, value, dense).

- **Inference:** every variant (rankwise methods unmerged and merged, PEFT LoRA/DoRA unmerged and after
  ``merge_and_unload``) lives in one process; each round runs one ``no_grad`` eval forward of each on the
  same batch, order rotating; median per variant, ratio to the plain base model's forward.
- **GoRA init:** one subprocess per ``n_steps``: load the model, reset the peak-RSS mark, time
  ``rankwise.attach`` with ``n_steps`` calibration batches; report seconds, peak RSS growth over the
  resident size before ``attach``, and what GoRA's own report says.
- **File sizes:** bytes on disk of ``rankwise.save`` (``adapter.safetensors`` + ``adapter_config.json``), of
  ``rankwise.export_peft`` and, for LoRA/DoRA, of PEFT's own ``save_pretrained`` of the same adapter.
- **Overhead** (``--parts overhead``): the per-call cost where Python overhead shows most, small inputs: a
  training step (forward, backward, AdamW step, ``zero_grad``, ``rankwise.step``) at batch 4 x seq 16 and a
  ``no_grad`` eval forward at batch 1 x seq 8, of the base model, rankwise LoRA / DoRA / EDoRA unmerged and
  PEFT LoRA / DoRA unmerged, all in one process, order rotating each round; each sample is the mean of a few
  calls; reported: median ms, and the median over rounds of each round's ratio to the base model and to PEFT
  LoRA (same round, so the machine's load cancels). Uses only API the code of 2026-11-23 (``f117a9a``) has too,
  so this file alone, copied into a worktree of an older commit, measures that code the same way.

    python bench/extras.py            # writes docs/bench/extras.{json,md}
    python bench/extras.py --quick    # a smoke run (writes extras-quick.*)
    BENCH_THREADS=1 python bench/extras.py --parts overhead --rounds 30   # only the overhead part
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ROOT, TARGETS, _status_kb, batch_for, calibration, load_base, variants  # noqa: E402

import rankwise  # noqa: E402

METHODS = ("lora", "dora", "gora", "edora", "raclora")


def _make(label: str, base: torch.nn.Module, r: int, bs: int, sl: int) -> torch.nn.Module:
    """The model ``bench/speed.py`` times under ``label`` (same configs), built on ``base``."""
    return variants(r, bs, sl)[label](base)


def _train_a_little(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int = 2) -> None:
    """A few steps so adapters are non-zero (a zero update would make merged == base trivially fast)."""
    from rankwise.state import is_attached  # here, not at the top: the overhead part runs on code without it
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if is_attached(model):
            rankwise.step(model, opt)
    model.eval()


def inference(r: int, bs: int, sl: int, rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    base = load_base().eval()
    batch = batch_for(bs, sl)
    models: dict[str, torch.nn.Module] = {"base (no adapter)": base}
    for name in METHODS:
        m = _make(name, copy.deepcopy(base), r, bs, sl)
        _train_a_little(m, batch)
        models[f"{name} unmerged"] = m
        merged = copy.deepcopy(m)
        rankwise.merge(merged)
        models[f"{name} merged"] = merged
    for label in ("peft-lora", "peft-dora"):
        m = _make(label, copy.deepcopy(base), r, bs, sl)
        _train_a_little(m, batch)
        models[f"{label} unmerged"] = m
        models[f"{label} merged"] = copy.deepcopy(m).merge_and_unload()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    times: dict[str, list[float]] = {k: [] for k in models}
    labels = list(models)
    with torch.no_grad():
        for i in range(warmup + rounds):
            for label in labels[i % len(labels):] + labels[: i % len(labels)]:
                t0 = time.perf_counter()
                models[label](**inputs)
                if i >= warmup:
                    times[label].append(time.perf_counter() - t0)
    ref = statistics.median(times["base (no adapter)"])
    return {k: {"median_ms": 1000 * statistics.median(v), "ratio_to_base": statistics.median(v) / ref} for k, v in times.items()}


OVERHEAD_VARIANTS = ("lora", "dora", "edora", "peft-lora", "peft-dora")
OVERHEAD_SHAPES = {"train step": (4, 16), "eval forward": (1, 8)}


def _overhead_models(r: int) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer | None]]:
    """label -> (model in train mode, its AdamW); the base model trains nothing, so it has no optimizer."""
    base = load_base()
    out: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer | None]] = {"base (no adapter)": (copy.deepcopy(base).train(), None)}
    for label in OVERHEAD_VARIANTS:
        m = _make(label, copy.deepcopy(base), r, 4, 16).train()
        out[label] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3))
    return out


def _overhead_call(kind: str, label: str, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                   batch: dict[str, torch.Tensor]) -> None:
    """One call as a user makes it: an eval forward (no_grad outside), or a whole training step."""
    if kind == "eval forward":
        model(**batch)
        return
    out = model(**batch)
    if opt is None:
        return  # the base model: its forward alone (nothing trains)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if not label.startswith("peft"):
        rankwise.step(model, opt)


def _overhead_rounds(kind: str, models: dict, batch: dict[str, torch.Tensor], rounds: int, warmup: int,
                     inner: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per round (the mean of ``inner`` calls), order rotating."""
    labels = list(models)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for i in range(warmup + rounds):
        for label in labels[i % len(labels):] + labels[: i % len(labels)]:
            model, opt = models[label]
            t0 = time.perf_counter()
            for _ in range(inner):
                _overhead_call(kind, label, model, opt, batch)
            if i >= warmup:
                times[label].append((time.perf_counter() - t0) / inner)
    return times


def _ratio(times: dict[str, list[float]], label: str, ref: str) -> float:
    """Median over rounds of ``label``'s time over ``ref``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[label], times[ref]))


def overhead(r: int, rounds: int, warmup: int = 3, inner: int = 3) -> dict[str, dict[str, dict[str, float]]]:
    models = _overhead_models(r)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind, (bs, sl) in OVERHEAD_SHAPES.items():
        batch = batch_for(bs, sl)
        if kind == "eval forward":
            batch = {k: v for k, v in batch.items() if k != "labels"}
            for m, _ in models.values():
                m.eval()
            with torch.no_grad():
                times = _overhead_rounds(kind, models, batch, rounds, warmup, inner)
        else:
            times = _overhead_rounds(kind, models, batch, rounds, warmup, inner)
        out[kind] = {k: {"median_ms": 1000 * statistics.median(v), "ratio_to_base": _ratio(times, k, "base (no adapter)"),
                         "ratio_to_peft_lora": _ratio(times, k, "peft-lora")} for k, v in times.items()}
    return out


def _overhead_lines(data: dict[str, dict[str, dict[str, float]]], when: str, r: int) -> list[str]:
    """The overhead part's table: one row per variant, a column pair per kind of call."""
    kinds = list(data)
    shapes = ", ".join(f"{k} at batch {bs} x seq {sl}" for k, (bs, sl) in OVERHEAD_SHAPES.items() if k in data)
    head = " | ".join(f"{k} (ms) | ÷ base | ÷ PEFT LoRA" for k in kinds)
    lines = ["", f"**Per-call overhead on small inputs** (rank {r}; {shapes}; ratios are medians of per-round ratios; "
             f"the base model's train step is its forward and loss alone, nothing to train; {when})", "",
             f"| variant | {head} |", "|---|" + "---:|" * (3 * len(kinds))]
    for label in data[kinds[0]]:
        cells = " | ".join(f"{data[k][label]['median_ms']:.2f} | {data[k][label]['ratio_to_base']:.3f} | "
                           f"{data[k][label]['ratio_to_peft_lora']:.3f}" for k in kinds)
        lines.append(f"| {label} | {cells} |")
    return lines


def gora_init_child(n_steps: int, r: int, bs: int, sl: int) -> None:
    base = load_base()
    calib = calibration(n_steps, bs, sl)
    gc.collect()
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    report = rankwise.attach(base, rankwise.GoraConfig(r_ref=r, alpha=2 * r, n_steps=n_steps, target_modules=TARGETS, seed=0),
                             calibration=calib)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    stats = getattr(report, "gora", None) or getattr(report, "extra", None)
    print(json.dumps({"n_steps": n_steps, "attach_s": seconds, "peak_growth_mb": (peak - before) / 1024,
                      "trainable": report.trainable, "report_tail": str(stats)[:300] if stats is not None else None}))


def gora_init(n_steps_list: list[int], r: int, bs: int, sl: int) -> list[dict]:
    out = []
    for n in n_steps_list:
        cmd = [sys.executable, __file__, "--gora-child", str(n), "--r", str(r), "--batch", str(bs), "--seq", str(sl)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(out[-1], flush=True)
    return out


def _folder_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def file_sizes(r: int, bs: int, sl: int) -> dict[str, dict]:
    base = load_base()
    batch = batch_for(bs, sl)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in METHODS:
            m = _make(name, copy.deepcopy(base), r, bs, sl)
            _train_a_little(m, batch)
            rankwise.save(m, Path(tmp) / name / "rankwise")
            rankwise.export_peft(m, Path(tmp) / name / "peft")
            out[name] = {"trainable": rankwise.count_parameters(m)[0],
                         "rankwise": _folder_bytes(Path(tmp) / name / "rankwise"),
                         "export_peft": _folder_bytes(Path(tmp) / name / "peft")}
        for label in ("peft-lora", "peft-dora"):
            m = _make(label, copy.deepcopy(base), r, bs, sl)
            m.save_pretrained(Path(tmp) / label)
            out[label] = {"trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
                          "peft save_pretrained": _folder_bytes(Path(tmp) / label)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--n-steps", default="1,2,4,8,16")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    ap.add_argument("--parts", default="inference,gora_init,file_sizes",
                    help="which parts to measure now; the others are kept from the previous results file")
    ap.add_argument("--gora-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.gora_child is not None:
        gora_init_child(args.gora_child, args.r, args.batch, args.seq)
        return
    if args.quick:
        args.batch, args.seq, args.rounds, args.n_steps = 2, 16, 2, "1,2"
    suffix = "-quick" if args.quick else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    # parts not run now are taken from the previous results file (each part keeps its own stamp)
    prev = json.loads((out / f"extras{suffix}.json").read_text()) if (out / f"extras{suffix}.json").is_file() else {}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # a shared machine: what else ran shows here
    stamp = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
             "load": f"load average {load} at the start", "command": "python bench/extras.py " + " ".join(sys.argv[1:])}
    res = {}
    for part, run in (("inference", lambda: inference(args.r, args.batch, args.seq, args.rounds, warmup=2)),
                      ("gora_init", lambda: gora_init([int(n) for n in args.n_steps.split(",")], args.r, args.batch, args.seq)),
                      ("file_sizes", lambda: file_sizes(args.r, args.batch, args.seq)),
                      ("overhead", lambda: overhead(args.r, args.rounds))):
        if part in parts:
            res[part] = {"measured": stamp, "data": run()}
            print(json.dumps(res[part], indent=1), flush=True)
        elif part in prev:  # a part stamped before stamps named the machine was measured on the file's machine
            res[part] = {**prev[part], "measured": {"machine": prev["meta"]["machine"], **prev[part]["measured"]}}
    meta = {"machine": machine, "rank": args.r, "batch": args.batch, "seq": args.seq}
    (out / f"extras{suffix}.json").write_text(json.dumps({"meta": meta, **res}, indent=1))

    def when(part: str) -> str:
        m = res[part]["measured"]
        load = f", {m['load']}" if "load" in m else ""
        return f"{m['date']}, {m['machine']}{load}, `{m['command']}`"

    lines = [f"Rank {args.r} on {TARGETS}; the first three parts at batch {args.batch} x seq {args.seq}."]
    if "inference" in res:
        lines += ["", f"**Inference (eval forward, no_grad), median of interleaved rounds** ({when('inference')})", "",
                  "| variant | median (ms) | ratio to base model |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['median_ms']:.1f} | {v['ratio_to_base']:.3f} |" for k, v in res["inference"]["data"].items()]
    if "gora_init" in res:
        lines += ["", f"**GoRA initialisation against n_steps** (calibration batches of {args.batch} x {args.seq}; {when('gora_init')})", "",
                  "| n_steps | attach (s) | peak RSS growth during attach (MB) |", "|---:|---:|---:|"]
        lines += [f"| {g['n_steps']} | {g['attach_s']:.2f} | {g['peak_growth_mb']:.0f} |" for g in res["gora_init"]["data"]]
    if "file_sizes" in res:
        lines += ["", f"**Adapter files (bytes)** ({when('file_sizes')})", "",
                  "| method | trainable | rankwise.save | export_peft | PEFT save_pretrained |", "|---|---:|---:|---:|---:|"]
        for name, v in res["file_sizes"]["data"].items():
            cell = lambda key: f"{sum(v[key].values()):,}" if key in v else "—"  # noqa: E731
            lines.append(f"| {name} | {v['trainable']:,} | {cell('rankwise')} | {cell('export_peft')} | {cell('peft save_pretrained')} |")
    if "overhead" in res:
        lines += _overhead_lines(res["overhead"]["data"], when("overhead"), args.r)
    (out / f"extras{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
