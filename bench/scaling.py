"""How a training step's time grows with rank and with layer width, for one adapted linear layer.

LoRA, DoRA (ours and HF PEFT's) and EDoRA, each wrapping the same ``width x width`` ``nn.Linear``;
one step = forward on ``tokens`` rows, backward, Adam step. Variants are interleaved in every round
(rotating order) and we report the median. EDoRA's row norm costs O(out·r²) per step, DoRA's
O(out·in·r): the curves show it.

    python bench/scaling.py            # writes docs/bench/scaling.{json,md,png}
    python bench/scaling.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import rankwise  # noqa: E402


class One(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def build(kind: str, width: int, r: int) -> nn.Module:
    torch.manual_seed(0)
    model = One(width)
    if kind.startswith("peft"):
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], use_dora=True))
    cfg = {"lora": rankwise.LoraConfig, "dora": rankwise.DoraConfig, "edora": rankwise.EdoraConfig}[kind]
    rankwise.attach(model, cfg(r=r, alpha=2 * r, target_modules=["lin"], seed=0))
    return model


def measure(width: int, r: int, tokens: int, rounds: int) -> dict[str, float]:
    kinds = ["lora", "dora", "peft-dora", "edora"]
    models = {k: build(k, width, r) for k in kinds}
    opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    x = torch.randn(tokens, width)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(rounds + 2):
        for k in kinds[i % len(kinds):] + kinds[: i % len(kinds)]:
            t0 = time.perf_counter()
            models[k](x).square().mean().backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    ranks, widths, width0 = ([4, 32], [256, 1024], 512) if args.quick else ([4, 8, 16, 32, 64, 128], [256, 512, 1024, 2048], 1024)
    rounds = 3 if args.quick else args.rounds
    by_rank = {r: measure(width0, r, args.tokens, rounds) for r in ranks}
    by_width = {w: measure(w, 16, args.tokens, rounds) for w in widths}
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "command": "python bench/scaling.py " + " ".join(sys.argv[1:]), "tokens": args.tokens, "rounds": rounds}
    out = ROOT / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stem = "scaling-quick" if args.quick else "scaling"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "by_rank": by_rank, "by_width": by_width}, indent=1))
    lines = [f"Measured {meta['date']} on {meta['machine']}; `{meta['command']}`; one `width x width` linear layer, "
             f"{args.tokens} tokens per step, median of {rounds} interleaved steps; ms per step.", "",
             f"**By rank (width {width0})**", "", "| r | LoRA | DoRA (ours) | DoRA (PEFT) | EDoRA | EDoRA / LoRA | DoRA ours / PEFT |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r, t in by_rank.items():
        lines.append(f"| {r} | {1e3 * t['lora']:.2f} | {1e3 * t['dora']:.2f} | {1e3 * t['peft-dora']:.2f} | {1e3 * t['edora']:.2f} | "
                     f"{t['edora'] / t['lora']:.2f} | {t['dora'] / t['peft-dora']:.2f} |")
    lines += ["", "**By width (r = 16)**", "", "| width | LoRA | DoRA (ours) | DoRA (PEFT) | EDoRA | EDoRA / LoRA | DoRA ours / PEFT |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for w, t in by_width.items():
        lines.append(f"| {w} | {1e3 * t['lora']:.2f} | {1e3 * t['dora']:.2f} | {1e3 * t['peft-dora']:.2f} | {1e3 * t['edora']:.2f} | "
                     f"{t['edora'] / t['lora']:.2f} | {t['dora'] / t['peft-dora']:.2f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, data, xlabel in ((axes[0], by_rank, f"rank (width {width0})"), (axes[1], by_width, "width (r = 16)")):
        xs = list(data)
        for k, label in (("lora", "LoRA"), ("dora", "DoRA (ours)"), ("peft-dora", "DoRA (PEFT)"), ("edora", "EDoRA")):
            ax.plot(xs, [1e3 * data[x][k] for x in xs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per training step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)


if __name__ == "__main__":
    main()
