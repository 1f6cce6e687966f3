"""Training-step speed and memory of adapters on convolutions, rankwise vs HF PEFT, on two small CNNs (CPU).

The method is ``bench/speed.py``'s, reusing its code: every variant gets its own copy of the model; in each round
every variant runs one full training step (forward, backward, AdamW step, zero_grad, ``rankwise.step``) on the
*same* batch, the order rotating each round; we report the median step and its ratio to PEFT LoRA's median in the
same process. Memory: each variant runs a few steps in its own subprocess; peak RSS (``VmHWM``, reset after setup)
and its growth over the resident size right before training.

The models, built from a seeded random init (no download):

* ``resnet``: transformers' ``ResNetForImageClassification``, a bottleneck ResNet (4 stages of one block,
  widths 64-512, 10 classes), batch 8 of 3 x 64 x 64 images; adapters on every bottleneck convolution
  (``...layer.0/1/2.convolution``: eight 1x1 and four 3x3 ``nn.Conv2d``, two of the 3x3 with stride 2), not on the
  7x7 stem nor the shortcuts.
* ``conv1d``: a plain torch stack of residual blocks, each an ``nn.Conv1d`` with kernel 5 (``mix``) and one with
  kernel 1 (``proj``), batch 8 of 32 channels x 256 steps; adapters on every ``mix`` and ``proj``.

Pairs are checked before timing: each rankwise LoRA / DoRA model is attached (seed 0), its ``B`` set to seeded
random values (so the update is not zero), and exported with ``rankwise.export_peft``; the PEFT model is
``PeftModel.from_pretrained`` of that folder (trainable). The pair's logits on the batch (training mode) must
agree to ``PAIR_TOLERANCE`` (else the run stops before timing); the max abs difference is recorded beside how far the logits moved from the base model's. EDoRA and
GoRA have no PEFT counterpart: their ratio is to PEFT LoRA too, labelled so.

    python bench/conv_speed.py                  # full run, writes docs/bench/conv-speed.{json,md}
    python bench/conv_speed.py --quick          # a smoke run, writes docs/bench/conv-speed-quick.*
    python bench/conv_speed.py --profile        # what one step copies, writes docs/bench/conv-speed-profile.md

``--profile`` counts, for one training step of each LoRA / DoRA variant, the calls of the ops that copy, allocate
or fill activation-sized tensors (and the matmuls), with the elements of their first input (torch profiler's
recorded shapes; inputs under 10,000 elements left out), and the autograd graph's nodes by kind: counts, not
times, so the machine's load does not blur them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from speed import adapter_maker, step_times, summarise, train_step, training_peak

import rankwise

Batch = dict[str, torch.Tensor]
Maker = Callable[[nn.Module], nn.Module]
PAIRS = {"lora": "peft-lora", "dora": "peft-dora"}  # rankwise label -> its PEFT counterpart
B_STD = 0.05  # the std of the seeded random B set before the pair check (the update is zero at init)
PAIR_TOLERANCE = 1e-4  # max abs logit difference beyond which a pair computes something else: no timing then


@dataclass
class Out:
    """What the plain conv1d model returns: ``.loss`` as a transformers model's output has it."""

    loss: torch.Tensor
    logits: torch.Tensor


class Block1d(nn.Module):
    """``h + proj(gelu(mix(h)))``: ``mix`` an ``nn.Conv1d`` with kernel 5, ``proj`` one with kernel 1."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = nn.Conv1d(width, width, 5, padding=2)
        self.proj = nn.Conv1d(width, width, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(F.gelu(self.mix(h)))


class Conv1dNet(nn.Module):
    """A 1-D CNN: a 1x1 stem, ``blocks`` residual :class:`Block1d`, a mean-pooled linear head;
    ``forward(input_values, labels)`` returns an :class:`Out`."""

    def __init__(self, channels: int = 32, width: int = 128, blocks: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv1d(channels, width, 1)
        self.blocks = nn.Sequential(*(Block1d(width) for _ in range(blocks)))
        self.head = nn.Linear(width, classes)

    def forward(self, input_values: torch.Tensor, labels: torch.Tensor) -> Out:
        logits = self.head(self.blocks(self.stem(input_values)).mean(dim=-1))
        return Out(F.cross_entropy(logits, labels), logits)


@dataclass(frozen=True)
class Case:
    """One benchmarked model: how to build it (seeded), its batch, its targets (a full-match regex)."""

    name: str
    describe: str
    targets: str
    build: Callable[[], nn.Module]
    batch: Callable[[int, int], Batch]  # (batch size, seed) -> batch


def build_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1],
                       layer_type="bottleneck")
    cfg.num_labels = 10
    return ResNetForImageClassification(cfg)


def resnet_batch(batch_size: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch_size, 3, 64, 64, generator=g),
            "labels": torch.randint(0, 10, (batch_size,), generator=g)}


def build_conv1d() -> nn.Module:
    torch.manual_seed(0)
    return Conv1dNet()


def conv1d_batch(batch_size: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return {"input_values": torch.randn(batch_size, 32, 256, generator=g),
            "labels": torch.randint(0, 10, (batch_size,), generator=g)}


CASES = {
    "resnet": Case("resnet", "transformers ResNetForImageClassification (bottleneck, widths 64-512, 1 block per stage), "
                   "8 x 3 x 64 x 64", r"resnet\.encoder\.stages\.\d+\.layers\.\d+\.layer\.[012]\.convolution",
                   build_resnet, resnet_batch),
    "conv1d": Case("conv1d", "a plain 1-D CNN (4 residual blocks, width 128: Conv1d k=5 and k=1), 8 x 32 x 256",
                   r"blocks\.\d+\.(mix|proj)", build_conv1d, conv1d_batch),
}


def perturbed(make: Maker) -> Maker:
    """``make``, then every layer's ``B`` set to seeded ``N(0, B_STD²)`` values: an update that is not zero."""
    def run(base: nn.Module) -> nn.Module:
        model = make(base)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, layer in sorted(rankwise.adapter_layers(model).items()):
                b = layer.get_parameter("lora_b")
                b.copy_(torch.randn(b.shape, generator=g) * B_STD)
        return model

    return run


def peft_of(make: Maker) -> Maker:
    """The PEFT model holding exactly what ``make`` attaches: rankwise's export, loaded by PEFT (trainable)."""
    def run(base: nn.Module) -> nn.Module:
        import peft

        with tempfile.TemporaryDirectory() as tmp:
            rankwise.export_peft(make(copy.deepcopy(base)), tmp, overwrite=True)
            return peft.PeftModel.from_pretrained(base, tmp, is_trainable=True)

    return run


def variants(case: Case, r: int, batch_size: int) -> dict[str, Maker]:
    """label -> function turning a fresh base model into the model to train."""
    def calib() -> list[Batch]:
        return [case.batch(batch_size, 100 + i) for i in range(4)]

    lora = perturbed(adapter_maker("lora", case.targets, r=r, alpha=2 * r))  # type: ignore[arg-type]
    dora = perturbed(adapter_maker("dora", case.targets, r=r, alpha=2 * r))  # type: ignore[arg-type]
    return {"peft-lora": peft_of(lora), "lora": lora, "peft-dora": peft_of(dora), "dora": dora,
            "edora": adapter_maker("edora", case.targets, r=r, alpha=2 * r),  # type: ignore[arg-type]
            "gora": adapter_maker("gora", case.targets, calib, r_ref=r, alpha=2 * r, n_steps=4),  # type: ignore[arg-type]
            "full": lambda base: base}


def make_trainable(make: Maker, base: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make(copy.deepcopy(base))
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


@torch.no_grad()
def logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch).logits


def pair_check(models: dict[str, tuple], base: nn.Module, batch: Batch) -> dict[str, dict[str, float]]:
    """For each rankwise / PEFT pair: max abs difference of their logits on ``batch`` (training mode), and how far
    the rankwise logits are from the base model's (the size of what is compared)."""
    ref = logits(copy.deepcopy(base).train(), batch)
    out = {}
    for mine, theirs in PAIRS.items():
        a, b = logits(models[mine][0], batch), logits(models[theirs][0], batch)
        out[f"{mine} vs {theirs}"] = {"max_abs_diff": float((a - b).abs().max()),
                                      "max_abs_vs_base": float((a - ref).abs().max())}
    bad = {pair: v["max_abs_diff"] for pair, v in out.items() if not v["max_abs_diff"] <= PAIR_TOLERANCE}
    if bad:
        raise SystemExit(f"these pairs compute different logits (max abs difference), not timed: {bad}")
    return out


def time_case(case: Case, r: int, batch_size: int, rounds: int, warmup: int) -> tuple[dict, dict]:
    base = case.build()
    models = {label: make_trainable(make, base) for label, make in variants(case, r, batch_size).items()}
    batch = case.batch(batch_size, 0)
    pairs = pair_check(models, base, batch)
    print(json.dumps({case.name: pairs}), flush=True)
    return summarise(step_times(models, batch, rounds, warmup), models, "peft-lora"), pairs


def memory_child(case: Case, label: str, r: int, batch_size: int, steps: int) -> None:
    base = case.build()
    model, opt = make_trainable(variants(case, r, batch_size)[label], base)
    del base
    print(json.dumps(training_peak(model, opt, case.batch(batch_size, 0), steps)))


def memory(case: str, label: str, r: int, batch_size: int, steps: int) -> dict[str, float]:
    """Peak RSS of ``steps`` training steps of one variant, measured in a child process."""
    cmd = [sys.executable, __file__, "--memory-child", f"{case}:{label}", "--r", str(r), "--batch-size",
           str(batch_size), "--rounds", str(steps)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


LABELS = {"peft-lora": "PEFT LoRA", "lora": "rankwise LoRA", "peft-dora": "PEFT DoRA", "dora": "rankwise DoRA",
          "edora": "rankwise EDoRA (no PEFT counterpart)", "gora": "rankwise GoRA (no PEFT counterpart)",
          "full": "full fine-tuning (context)"}


NOTE = ("Read the ratios, not the milliseconds: the variants' steps are interleaved in one process, so load on the "
        "machine hits them alike. Peak RSS includes what each subprocess imported and built (a PEFT variant's subprocess imports "
        "peft and builds the rankwise model it loads from), so compare the growth column; GoRA's calibration steps run "
        "before the peak mark is reset, and its growth reads low.")


TIMING_HEAD = ("| variant | trainable | median step (ms) | IQR (ms) | ratio to PEFT LoRA | peak RSS (MB) "
               "| RSS growth in training (MB) |")
PAIRS_HEAD = ("Pairs (logits on the timed batch, training mode, the same factors through rankwise's export; "
              "step ratio: the two medians above):")

PAIRS_COLUMNS = "| pair | max abs difference | max abs change from the base model | step ratio rankwise / PEFT |"


def report(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    measured = (f"Measured {meta['date']} on {meta['machine']}; load average before the run {meta['load_before']}, "
                f"after {meta['load_after']}; wall time {meta['wall_s']:.0f} s. Rank {meta['rank']} "
                f"(alpha {2 * meta['rank']}), median of {meta['rounds']} interleaved steps ({meta['warmup']} warm-up "
                f"rounds dropped); RSS over {meta['memory_steps']} steps, one subprocess per variant.")
    lines = [f"Command: `{meta['command']}`", "", measured, "", NOTE, ""]
    for res in results:
        lines += [f"**{res['model']}**: {res['describe']}; targets `{res['targets']}` ({res['n_targets']} layers)", "",
                  TIMING_HEAD, "|---|---:|---:|---:|---:|---:|---:|"]
        for label, v in res["variants"].items():
            lines.append(f"| {LABELS[label]} | {v['trainable']:,} | {1000 * v['median_s']:.1f} | {1000 * v['iqr_s']:.1f} | "
                         f"{v['ratio_to_peft_lora']:.3f} | {v['peak_rss_mb']:.0f} | {v['train_growth_mb']:.0f} |")
        lines += ["", PAIRS_HEAD, "", PAIRS_COLUMNS, "|---|---:|---:|---:|"]
        lines += [f"| {pair} | {v['max_abs_diff']:.2e} | {v['max_abs_vs_base']:.2e} | {v['step_ratio']:.3f} |"
                  for pair, v in res["pairs"].items()]
        lines.append("")
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_all(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    t0, load_before = time.perf_counter(), load_average()
    results = []
    for name in args.models.split(","):
        case = CASES[name]
        timing, pairs = time_case(case, args.r, args.batch_size, args.rounds, args.warmup)
        for mine, theirs in PAIRS.items():
            pairs[f"{mine} vs {theirs}"]["step_ratio"] = timing[mine]["median_s"] / timing[theirs]["median_s"]
        for label in timing:
            timing[label].update(memory(name, label, args.r, args.batch_size, args.memory_steps))
        n_targets = len(rankwise.adapter_layers(variants(case, args.r, args.batch_size)["lora"](case.build())))
        results.append({"model": name, "describe": case.describe, "targets": case.targets, "n_targets": n_targets,
                        "batch_size": args.batch_size, "variants": timing, "pairs": pairs})
        print(json.dumps(results[-1], indent=1), flush=True)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"peft {_peft_version()}, {torch.get_num_threads()} thread(s)",
            "command": " ".join(["python bench/conv_speed.py", *sys.argv[1:]]), "rank": args.r, "rounds": args.rounds,
            "warmup": args.warmup, "memory_steps": args.memory_steps, "load_before": load_before,
            "load_after": load_average(), "wall_s": time.perf_counter() - t0}
    return meta, results


PROFILED_OPS = ("aten::copy_", "aten::clone", "aten::new_empty_strided", "aten::zero_", "aten::fill_", "aten::mm")
GRAPH_NODES = ("CopySlices", "AsStridedBackward0", "CloneBackward0", "PermuteBackward0", "MmBackward0",
               "ConvolutionBackward0")
MIN_ELEMENTS = 10_000


def op_counts(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> dict[str, tuple[int, float]]:
    """op -> (calls, million elements of the first input) in one profiled training step (after one unprofiled)."""
    from torch.profiler import ProfilerActivity, profile

    train_step(model, opt, batch)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_step(model, opt, batch)
    counts = {op: (0, 0.0) for op in PROFILED_OPS}
    for event in prof.events():
        shapes = event.input_shapes
        n = math.prod(shapes[0]) if event.name in counts and shapes and shapes[0] else 0
        if n >= MIN_ELEMENTS:
            calls, elements = counts[event.name]
            counts[event.name] = (calls + 1, elements + n / 1e6)
    return counts


def graph_counts(model: nn.Module, batch: Batch) -> Counter[str]:
    """The autograd graph of the loss, its nodes counted by kind."""
    seen: set[Any] = set()
    todo = [model(**batch).loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [nxt for nxt, _ in node.next_functions]
    return Counter(type(node).__name__ for node in seen)


def profile_report(models: str, r: int, batch_size: int) -> str:
    lines = [f"Command: `{' '.join(['python bench/conv_speed.py', *sys.argv[1:]])}`", "",
             (f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, torch {torch.__version__}, peft "
             f"{_peft_version()}, rank {r}, batch {batch_size}. One training step per variant: calls / million "
             f"elements of the first input (inputs of {MIN_ELEMENTS:,} elements or more), then the loss's autograd "
             "nodes by kind."), ""]
    for name in models.split(","):
        case = CASES[name]
        base, batch, makers = case.build(), case.batch(batch_size, 0), variants(case, r, batch_size)
        lines += [f"**{name}**: {case.describe}", "", "| variant | " + " | ".join(o[6:] for o in PROFILED_OPS) + " | "
                  + " | ".join(GRAPH_NODES) + " |", "|---|" + "---:|" * (len(PROFILED_OPS) + len(GRAPH_NODES))]
        for label in ("peft-lora", "lora", "peft-dora", "dora", "edora"):
            model, opt = make_trainable(makers[label], base)
            ops, nodes = op_counts(model, opt, batch), graph_counts(model, batch)
            lines.append(f"| {LABELS[label]} | " + " | ".join(f"{c} / {m:.2f}" for c, m in ops.values()) + " | "
                         + " | ".join(str(nodes[n]) for n in GRAPH_NODES) + " |")
        lines.append("")
    return "\n".join(lines)


def _peft_version() -> str:
    import peft

    return str(peft.__version__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="resnet,conv1d")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--memory-steps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    ap.add_argument("--profile", action="store_true", help="count what one step copies (conv-speed-profile.md)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if args.memory_child:
        case, label = args.memory_child.split(":")
        memory_child(CASES[case], label, args.r, args.batch_size, args.rounds)
        return
    if args.profile:
        text = profile_report(args.models, args.r, args.batch_size)
        Path(args.out, "conv-speed-profile.md").write_text(text)
        print(text)
        return
    if args.quick:
        args.rounds, args.warmup, args.memory_steps = 3, 1, 2
    meta, results = run_all(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "conv-speed-quick" if args.quick else "conv-speed"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = report(meta, results)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
