"""RAC-LoRA's claim in its own regime (issue 16, part 2): a chain of rank-r links reaches what one rank-r
adapter cannot. MRPC on the packaged MiniLM, rank 2, 10 links of one epoch each.

Arms: RAC-LoRA with frozen B and frozen A, each with Adam's state kept across link ends (the authors'
code) and reset (rankwise's default); LoRA r 2 and r 20 for the same epochs; COLA (both factors trained,
merged every epoch) and Asymmetric LoRA (one link, frozen A) at r 2; full fine-tuning as the reference;
the head alone as the control (how much the head earns without any adapter).
Every arm's lr is picked on held-out training rows (``--val-split``, seed 0), then every seed runs at it;
the report plots the held-out metric against epoch for all arms (see ``bench/regime.py``).

    python bench/raclora_chain.py --dry-run          # print the grid's commands, run nothing
    python bench/raclora_chain.py                    # the runs (long on 2 CPU cores), resumable
    python bench/raclora_chain.py --report-only      # tables + curves from finished runs

Results and the command that made them: docs/evidence/raclora.md §3f (docs/bench/raclora-chain.md, .png).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from regime import DATA, GLUE, ROOT, Arm, curves, grid_table, head_only, header, run_all, run_dir, table  # noqa: E402

ADAPTER_LRS = [3e-4, 1e-3, 3e-3]


def link_steps(task: str, val_split: float, batch_size: int, max_train: int | None) -> int:
    """Optimizer steps in one epoch of the training rows left after the held-out split (one link)."""
    from rankwise_harness.data import get_task, load_task_data

    n = len(load_task_data(get_task(task), str(DATA / "glue" / GLUE[task][0])).train)
    n = min(n, max_train) if max_train else n
    return max(1, (n - int(round(val_split * n))) // batch_size)


def update_norm(folder: Path) -> float:
    """Mean over adapted layers of ||ΔW||_F, the whole update a run's saved adapter adds to W: the live link
    ``scale · B A`` plus a chain's merged links (``chain_b`` carries its scale)."""
    import json

    import torch
    from safetensors.torch import load_file

    layers = json.loads((folder / "adapter" / "adapter_config.json").read_text())["layers"]
    t = {k: v.float() for k, v in load_file(str(folder / "adapter" / "adapter.safetensors")).items()}
    norms = []
    for name, info in layers.items():
        pre = next(k for k in t if k.endswith(f"{name}.lora_a"))[: -len("lora_a")]
        delta = info["scale"] * t[pre + "lora_b"] @ t[pre + "lora_a"]
        if pre + "chain_b" in t:
            delta = delta + t[pre + "chain_b"] @ t[pre + "chain_a"]
        norms.append(float(torch.linalg.matrix_norm(delta)))
    return sum(norms) / len(norms)


def arms(r: int, wide: int, steps: int) -> list[Arm]:
    rank = ["--r", str(r), "--alpha", str(2 * r)]
    link = ["--set", f"link_steps={steps}"]
    out = [Arm(f"raclora-{f}-{mode}", "raclora", rank + link + ["--set", f"frozen={f}", "--set",
                                                                  f"keep_optimizer_state={str(mode == 'keep').lower()}"],
               ADAPTER_LRS)
           for f in ("B", "A") for mode in ("keep", "reset")]
    out += [Arm(f"lora-r{r}", "lora", rank, ADAPTER_LRS),
            Arm(f"lora-r{wide}", "lora", ["--r", str(wide), "--alpha", str(2 * wide)], ADAPTER_LRS),
            Arm(f"cola-r{r}", "raclora", rank + link + ["--set", "train_both=true"], ADAPTER_LRS),
            Arm(f"asymmetric-r{r}", "raclora", rank + ["--set", "chain=false"], ADAPTER_LRS),
            Arm("full", "full", [], [2e-5, 5e-5]),
            head_only(rank)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--r", type=int, default=2)
    ap.add_argument("--wide-r", type=int, default=20, help="LoRA's rank for the 'one wide adapter' arm")
    ap.add_argument("--links", type=int, default=10, help="epochs = links (one link per epoch)")
    ap.add_argument("--head", default="roberta")
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--val-split", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-train", type=int)
    ap.add_argument("--arms", default=None, help="comma-separated labels (default: all)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "raclora-chain"))
    ap.add_argument("--name", default="raclora-chain")
    ap.add_argument("--update-norms", type=float, metavar="LR",
                    help="print each adapter arm's mean ||ΔW||_F (seed 0 at this grid lr) and exit")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    runs, seeds = Path(args.runs), [int(s) for s in args.seeds.split(",")]
    steps = link_steps(args.task, args.val_split, args.batch_size, args.max_train)
    chosen = [a for a in arms(args.r, args.wide_r, steps) if args.arms is None or a.label in args.arms.split(",")]
    common = ["--head", args.head, "--pooling", args.pooling, "--head-lr", f"{args.head_lr:g}",
              "--val-split", str(args.val_split), "--eval-each-epoch", "--epochs", str(args.links),
              "--batch-size", str(args.batch_size), "--save-every", "200", "--targets", "query,value",
              *(["--max-train", str(args.max_train)] if args.max_train else [])]
    if args.update_norms is not None:
        for arm in chosen:
            folder = run_dir(runs, args.task, arm, args.update_norms, 0)
            if arm.method != "full" and (folder / "adapter" / "adapter.safetensors").is_file():
                print(f"{arm.label}: mean ||dW||_F {update_norm(folder):.2f}")
        return
    picked = run_all(runs, args.task, chosen, seeds, common, args.dry_run, args.report_only)
    if args.dry_run:
        return
    out = ROOT / "docs" / "bench"
    lines = [header("python " + " ".join(shlex.quote(a) for a in sys.argv)),
             f"One link = one epoch = {steps} optimizer steps.", ""]
    lines += table(runs, args.task, chosen, picked, seeds) + [""] + grid_table(runs, args.task, chosen)
    curves(runs, args.task, chosen, picked, seeds, out / f"{args.name}.png")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
