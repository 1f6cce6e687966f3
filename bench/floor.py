"""Training-step time of the LoRA family against the floor: the frozen model's own step.

The floor is one training step of the frozen model with gradients flowing back to the input (the
input embeddings' output requires grad) and the head trained: no adapter step can cost less. Every
variant trains the head too. Variants: the floor, rankwise LoRA / DoRA / EDoRA / GoRA / RAC-LoRA on
the fused path (``rankwise.fused``, the default) and on the plain reference path (``-ref``: the code
before the fused path, forced with ``rankwise.fused.reference_path``), and HF PEFT LoRA / DoRA.

Timing reuses ``bench/speed.py``'s helpers: every variant gets its own copy of the model and, in each
round, runs one full step (forward, backward, AdamW step, zero_grad) on the same batch, in an order
that rotates each round. We report median step times and their ratios to the floor and to PEFT LoRA.

Shapes: ``minilm`` (the packaged MiniLM, r 8 on query/key/value/dense, batch 32 x 64 tokens) and
``smollm`` (SmolLM2-135M's shapes, randomly initialised since the hub is offline: d 576, 30 layers,
MLP 1536, 9 heads / 3 KV heads, all seven linear layers per block targeted, a 2-label
sequence-classification head, vocabulary cut to 32000 (SmolLM2: 49152) since only the linear layers' shapes matter).

    python bench/floor.py --shape minilm --rounds 15      # writes docs/bench/floor-minilm.{json,md}; runs kept as floor-minilm-runN
    python bench/floor.py --shape smollm --batch 4 --seq 64 --rounds 6
    python bench/floor.py --shape minilm --profile        # torch profiler table per op, fused vs reference
    python bench/floor.py --shape minilm --memory         # training RSS growth per variant
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import speed  # noqa: E402  (bench/speed.py: load_base, batch_for, variants, train_step)

from rankwise.fused import reference_path  # noqa: E402

SMOLLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEADS = ("classifier", "score")  # the sequence-classification head of BERT / Llama
OURS = ("lora", "dora", "edora", "gora", "raclora")


def load_smollm_shapes() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True,
                      num_labels=2, pad_token_id=0)
    return LlamaForSequenceClassification(cfg)


def floor(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen model, gradients flowing to the input embeddings' output (the head is trained below)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    return model


def build(shape: str, r: int, batch: int, seq: int, only: str | None = None) -> tuple[dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]], dict]:
    """label -> (model, AdamW over its trainable tensors) for every variant (or just ``only``), and trainable counts."""
    if shape == "smollm":
        speed.TARGETS[:] = SMOLLM_TARGETS  # variants() reads the module's target list
        base = load_smollm_shapes()
    else:
        base = speed.load_base()
    makers: dict[str, Callable] = speed.variants(r, batch, seq)
    makers.pop("full", None)
    makers = {"floor": floor, **makers}
    for name in OURS:
        if name in makers:
            makers[f"{name}-ref"] = makers[name]
    if only is not None:
        makers = {only: makers[only]}
    models = {}
    for label, make in makers.items():
        model = make(copy.deepcopy(base))
        for n, p in model.named_parameters():
            if any(h in n.split(".") for h in HEADS):
                p.requires_grad_(True)  # the head is trained in every variant
        model.train()
        models[label] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    return models, {label: sum(p.numel() for p in m.parameters() if p.requires_grad) for label, (m, _) in models.items()}


def step(label: str, model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    with reference_path() if label.endswith("-ref") else nullcontext():
        speed.train_step(model, opt, batch)


def time_all(models: dict, batch: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {label: [] for label in models}
    labels = list(models)
    for i in range(warmup + rounds):
        order = labels[i % len(labels):] + labels[: i % len(labels)]
        for label in order:
            t0 = time.perf_counter()
            step(label, *models[label], batch)
            if i >= warmup:
                times[label].append(time.perf_counter() - t0)
    return times


def profile(models: dict, batch: dict, labels: list[str], steps: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    out = []
    for label in labels:
        step(label, *models[label], batch)
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(steps):
                step(label, *models[label], batch)
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
        out += [f"### {label} ({steps} steps)", "", "```", table, "```", ""]
    return "\n".join(out)


def memory_child(args: argparse.Namespace) -> None:
    """Train one variant a few steps; print its RSS growth over the state right before training (``speed._status_kb``)."""
    import gc

    models, _ = build(args.shape, args.r, args.batch, args.seq, only=args.memory_child)
    model, opt = models[args.memory_child]
    batch = speed.batch_for(args.batch, args.seq)
    gc.collect()
    before = speed._status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak mark: loading must not mask training's peak
    for _ in range(3):
        step(args.memory_child, model, opt, batch)
    print(json.dumps({"train_growth_mb": (speed._status_kb("VmHWM") - before) / 1024}))


def memory(args: argparse.Namespace, labels: list[str]) -> dict[str, float]:
    """Training RSS growth (MB) of each variant, each in its own process."""
    out = {}
    for label in labels:
        cmd = [sys.executable, __file__, "--memory-child", label, "--shape", args.shape, "--r", str(args.r),
               "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[label] = json.loads(res.stdout.strip().splitlines()[-1])["train_growth_mb"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("minilm", "smollm"), default="minilm")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="a per-op profiler table for floor, lora, lora-ref, dora, dora-ref")
    ap.add_argument("--memory", action="store_true", help="training RSS growth per variant (subprocesses), no timing")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help="print the markdown table of a saved run (its .json) and exit")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    args = ap.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print(table(saved["meta"], saved["results"]), end="")
        return
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    if args.memory:
        labels = ["floor", "peft-lora", "peft-dora", "lora", "lora-ref", "dora", "dora-ref", "edora", "edora-ref"]
        rss = memory(args, labels)
        lines = [f"Training RSS growth over 3 steps (MB), `python bench/floor.py {' '.join(sys.argv[1:])}`, batch {args.batch} x {args.seq}:",
                 "", "| variant | RSS growth (MB) | × PEFT LoRA |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.0f} | {v / rss['peft-lora']:.2f} |" for k, v in rss.items()]
        (Path(args.out) / f"floor-{args.shape}-memory.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    models, trainable = build(args.shape, args.r, args.batch, args.seq)
    batch = speed.batch_for(args.batch, args.seq)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    if args.profile:
        text = f"`python bench/floor.py {' '.join(sys.argv[1:])}`\n\n" + profile(models, batch, ["floor", "lora", "lora-ref", "dora", "dora-ref"], 3)
        (out / f"floor-{args.shape}-profile.md").write_text(text)
        print(text)
        return
    times = time_all(models, batch, args.rounds, args.warmup)
    med = {label: statistics.median(ts) for label, ts in times.items()}
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}",
        "command": "python bench/floor.py " + " ".join(sys.argv[1:]),
        "shape": f"batch {args.batch} x {args.seq} tokens, r {args.r}, median of {args.rounds} interleaved steps",
    }
    rows = {label: {"median_s": med[label], "to_floor": med[label] / med["floor"], "to_peft_lora": med[label] / med["peft-lora"],
                    "trainable": trainable[label], "times_s": times[label]} for label in times}
    (out / f"floor-{args.shape}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    text = table(meta, rows)
    (out / f"floor-{args.shape}.md").write_text(text)
    print(text)


def paired(rows: dict, label: str, ref: str) -> float:
    """Median over rounds of ``t_label / t_ref`` within the same round (robust to load drifting between rounds)."""
    return statistics.median(a / b for a, b in zip(rows[label]["times_s"], rows[ref]["times_s"]))


def table(meta: dict, rows: dict) -> str:
    """The markdown table of one run: medians, ratios of medians and paired (per-round) ratios."""
    lines = [f"Measured {meta['date']} on {meta['machine']}; `{meta['command']}`; {meta.get('shape', '')}.", "",
             "| variant | trainable | median step (ms) | × floor | × PEFT LoRA | × floor, paired | × PEFT LoRA, paired |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, v in rows.items():
        lines.append(f"| {label} | {v['trainable']:,} | {1000 * v['median_s']:.1f} | {v['to_floor']:.3f} | {v['to_peft_lora']:.3f} | "
                     f"{paired(rows, label, 'floor'):.3f} | {paired(rows, label, 'peft-lora'):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
