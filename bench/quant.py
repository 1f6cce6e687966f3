"""Training-step speed and memory on a 4-bit (nf4) SmolLM2-135M, rankwise vs HF PEFT QLoRA / QDoRA (CPU).

The fp32 SmolLM2-135M-Instruct checkpoint the harness caches (dequantised from the Q4_1 GGUF) (``rankwise_harness.models.smollm2_path``)
is loaded with transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_compute_dtype=float32)`` and ``device_map="cpu"``, once per variant (bitsandbytes models are
not deep-copied). Adapters: rank 8 on the attention projections ``q_proj, k_proj, v_proj, o_proj``
(120 layers).

Timing: in each round every variant runs one training step (forward, backward, AdamW, zero_grad,
``rankwise.step``) on the same batch, the order rotating each round; median step time and its ratio to
PEFT QLoRA's, in one process. Memory: each variant in its own subprocess, peak RSS (``VmHWM``, reset
after setup) over a few steps, and its growth over the resident size before training.

The per-step cost of DoRA's dequantisation (its row norm needs W0) shows in the DoRA / LoRA ratio; EDoRA's
norm comes from terms computed once at attach, so EDoRA / LoRA shows it pays none.

    python bench/quant.py                        # writes docs/bench/quant.{json,md}
    python bench/quant.py --quick                # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import rankwise  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from speed import _status_kb, adapter_maker, peft_maker, step_times, summarise, train_step  # noqa: E402  (shared)
from speed import memory as speed_memory  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
VOCAB_LOW, VOCAB_HIGH = 1000, 40000


def load_base() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from rankwise_harness.models import smollm2_path

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(smollm2_path(), quantization_config=qc, device_map="cpu")


def batch_for(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB_LOW, VOCAB_HIGH, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def variants(r: int, batch_size: int, seq_len: int) -> dict[str, Callable[[torch.nn.Module], torch.nn.Module]]:
    """label -> function turning a freshly loaded nf4 base into the model to train."""
    def calib() -> list[dict[str, torch.Tensor]]:
        return [batch_for(batch_size, seq_len, 100 + i) for i in range(4)]

    def dora_dequantising(base):
        """rankwise DoRA made to dequantise W0 for its norm every step, as PEFT's QDoRA does (the cost avoided)."""
        adapter_maker("dora", TARGETS, r=r, alpha=2 * r)(base)
        for layer in rankwise.adapter_layers(base).values():
            layer.norm_n0 = None  # falls back to weight_norm(): dequantise, then ‖W0 + s·B A‖_row
        return base

    return {
        "peft-qlora": peft_maker(r, TARGETS, False),
        "peft-qdora": peft_maker(r, TARGETS, True),
        "lora": adapter_maker("lora", TARGETS, r=r, alpha=2 * r),
        "dora": adapter_maker("dora", TARGETS, r=r, alpha=2 * r),
        "dora-dequant": dora_dequantising,
        "edora": adapter_maker("edora", TARGETS, r=r, alpha=2 * r),
        "gora": adapter_maker("gora", TARGETS, calib, r_ref=r, alpha=2 * r, n_steps=4),
        "raclora": adapter_maker("raclora", TARGETS, r=r, alpha=2 * r, link_steps=10),
    }


def make_trainable(make: Callable) -> tuple[torch.nn.Module, torch.optim.Optimizer, float]:
    t0 = time.perf_counter()
    model = make(load_base())
    setup = time.perf_counter() - t0
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), setup


def time_interleaved(r: int, batch_size: int, seq_len: int, rounds: int, warmup: int,
                     only: list[str] | None = None) -> dict[str, dict[str, float]]:
    models = {label: make_trainable(make) for label, make in variants(r, batch_size, seq_len).items()
              if only is None or label in only}
    out = summarise(step_times(models, batch_for(batch_size, seq_len), rounds, warmup), models, "peft-qlora")
    for label, row in out.items():
        row["setup_s"] = models[label][2]
    return out


def memory_child(label: str, r: int, batch_size: int, seq_len: int, steps: int) -> None:
    import gc

    model, opt, _ = make_trainable(variants(r, batch_size, seq_len)[label])
    batch = batch_for(batch_size, seq_len)
    gc.collect()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak mark: loading must not mask training's peak
    for _ in range(steps):
        train_step(model, opt, batch)
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_rss_mb": peak / 1024, "train_growth_mb": (peak - before) / 1024}))


def memory(label: str, r: int, batch_size: int, seq_len: int, steps: int) -> dict[str, float]:
    return speed_memory(label, r, batch_size, seq_len, steps, script=__file__)


RATIOS = [  # (numerator, denominator, goal)
    ("lora", "peft-qlora", 1.0),
    ("dora", "peft-qdora", 0.8),
    ("edora", "lora", 1.15),
    ("gora", "lora", None),
    ("raclora", "lora", None),
    ("dora", "lora", None),
    ("dora-dequant", "lora", None),
    ("peft-qdora", "peft-qlora", None),
]


def report(results: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['machine']}; `{meta['command']}`; SmolLM2-135M-Instruct nf4 "
             f"(bitsandbytes {meta['bitsandbytes']}, compute dtype fp32), rank {meta['rank']}, targets {TARGETS}, "
             f"median of {meta['rounds']} interleaved steps.", ""]
    for res in results:
        v = res["variants"]
        lines += [f"**batch {res['batch_size']} x seq {res['seq_len']}**", "",
                  "| variant | trainable | median step (ms) | IQR (ms) | ratio to PEFT QLoRA | peak RSS (MB) | RSS growth in training (MB) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for label, x in v.items():
            lines.append(f"| {label} | {x['trainable']:,} | {1000 * x['median_s']:.0f} | {1000 * x['iqr_s']:.0f} | "
                         f"{x['ratio_to_peft_qlora']:.3f} | {x.get('peak_rss_mb', float('nan')):.0f} | "
                         f"{x.get('train_growth_mb', float('nan')):.0f} |")
        lines += ["", "| ratio of median step times | value | goal | met |", "|---|---:|---:|---|"]
        for num, den, goal in RATIOS:
            if num not in v or den not in v:
                continue
            ratio = v[num]["median_s"] / v[den]["median_s"]
            met = "—" if goal is None else ("yes" if ratio <= goal else "**no**")
            lines.append(f"| {num} / {den} | {ratio:.3f} | {'—' if goal is None else f'≤ {goal}'} | {met} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch-sizes", default="8")
    ap.add_argument("--seq-lens", default="64")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--variants", help="comma-separated subset (default: all; peft-qlora is always included)")
    ap.add_argument("--tag", default="", help="suffix of the output files (quant<tag>.json/.md)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if args.memory_child:
        memory_child(args.memory_child, args.r, int(args.batch_sizes), int(args.seq_lens), args.rounds)
        return
    if args.quick:
        args.batch_sizes, args.seq_lens, args.rounds, args.warmup, args.memory_steps = "2", "16", 2, 1, 1
    results = []
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        for sl in [int(x) for x in args.seq_lens.split(",")]:
            only = ["peft-qlora", *args.variants.split(",")] if args.variants else None
            timing = time_interleaved(args.r, bs, sl, args.rounds, args.warmup, only)
            if not args.no_memory:
                for label in timing:
                    timing[label].update(memory(label, args.r, bs, sl, args.memory_steps))
            results.append({"batch_size": bs, "seq_len": sl, "variants": timing})
            print(json.dumps(results[-1], indent=1), flush=True)
    import bitsandbytes

    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "bitsandbytes": bitsandbytes.__version__,
        "command": "python bench/quant.py " + " ".join(sys.argv[1:]),
        "rank": args.r,
        "rounds": args.rounds,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("quant-quick" if args.quick else "quant") + args.tag
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    text = report(results, meta)
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
