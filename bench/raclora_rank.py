"""RAC-LoRA where rank binds (issue 27): does a chain of rank-1 links fit the training rows below what one rank-1
adapter can, and how far toward full fine-tuning? The protocol and its acceptance and verdict rules are in
docs/protocols/raclora-rank.md, committed before the first run.

Setting: the packaged MiniLM, SST-2, 2,000 training rows drawn at random (stratified, data seed 0), a 10 %
stratified held-out split, the linear head on mean pooling (a small head, so the adapter's rank limits the
fit), adapters on query and value, batch 16, a constant lr, ``--steps`` optimizer steps for every arm
(default 2,000: 100 links of 20 steps), evaluation at every epoch's end.

Arms: LoRA r 1 (the rank-r adapter whose plateau the chain must pass), r 4 and r 16; full fine-tuning (the
target); RAC-LoRA r 1 with frozen A and with frozen B (links of ``--link-steps``, Adam's state kept, as the
authors' code); COLA r 1 (both factors trained, merged every link); Asymmetric LoRA r 1 (one link, frozen A).
Every arm's lr is picked from its grid (seed 0) by the **lowest last-epoch training loss** (the claim is about
optimisation; dev never chooses), then 3 seeds run at the pick. The report plots training loss against steps
(the claim's own measure) with the held-out and dev metric beside it.

    python bench/raclora_rank.py --dry-run        # what would run
    python bench/raclora_rank.py                  # the runs, resumable, recorded in the ledger
    python bench/raclora_rank.py --report-only    # docs/bench/raclora-rank.md and .png from the ledger
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from regime import (ROOT, Arm, check_settings, grid_table, header, interval_cell, last_epoch_loss, run_all,  # noqa: E402
                    seed_metrics, still_at_edge, table, unread_entries, welch_interval)

ADAPTER_LRS = [3e-4, 1e-3, 3e-3]


def arms(link_steps: int) -> list[Arm]:
    """The arms (see the module docstring); every lr picked on training loss."""
    def rank(r: int) -> list[str]:
        return ["--r", str(r), "--alpha", str(2 * r)]

    link = ["--set", f"link_steps={link_steps}", "--set", "keep_optimizer_state=true"]
    out = [Arm(f"lora-r{r}", "lora", rank(r), ADAPTER_LRS, pick_on="train-loss") for r in (1, 4, 16)]
    out += [Arm("full", "full", [], [1e-5, 3e-5, 1e-4], pick_on="train-loss")]
    out += [Arm(f"raclora-frozen{f}-r1", "raclora", rank(1) + link + ["--set", f"frozen={f}"], ADAPTER_LRS,
                pick_on="train-loss") for f in ("A", "B")]
    out += [Arm("cola-r1", "raclora", rank(1) + link + ["--set", "train_both=true"], ADAPTER_LRS, pick_on="train-loss"),
            Arm("asymmetric-r1", "raclora", rank(1) + ["--set", "chain=false"], ADAPTER_LRS, pick_on="train-loss")]
    return out


SEEDS = 3  # seeds 0-2 at each arm's pick: fewer make the acceptance and the verdicts provisional
CHAIN_ARMS = ("raclora-frozenA-r1", "raclora-frozenB-r1", "cola-r1", "asymmetric-r1")


def final_losses(ms: list[dict]) -> list[float]:
    """Each run's mean training loss over its last epoch (:func:`regime.last_epoch_loss`)."""
    return [last_epoch_loss(m) for m in ms]


def acceptance(r1: list[dict], full: list[dict]) -> tuple[bool, str]:
    """Does rank 1 bind: LoRA r 1's mean last-epoch training loss >= 2x full fine-tuning's and >= 0.05 above it?"""
    a, b = statistics.mean(final_losses(r1)), statistics.mean(final_losses(full))
    binds = a >= 2 * b and a - b >= 0.05
    note = " (provisional: fewer than 3 seeds)" if min(len(r1), len(full)) < SEEDS else ""
    return binds, (f"Acceptance{note}: LoRA r 1's last-epoch training loss {a:.3f} vs full fine-tuning's {b:.3f}: rank 1 "
                   + ("binds (≥ 2× and ≥ 0.05 above): the setting is accepted." if binds else
                      "does not bind by the pre-registered margin: this setting cannot decide the claim."))


EDGE = " (its lr is still at its grid's edge after the protocol's 3 extensions: the pick stands, lrs beyond it untried)"


def arm_line(label: str, r1: list[dict], full: list[dict], ms: list[dict], accepted: bool, at_edge: bool = False) -> str:
    """One chain arm against LoRA r 1: the 90 % Welch interval of (LoRA r 1 − arm) on the last-epoch training loss,
    the verdict (none where the setting was not accepted), and below the plateau how far toward full fine-tuning;
    ``at_edge``: the arm's pick is still at its grid's edge after the extensions (:func:`regime.still_at_edge`)."""
    if len(ms) < 2 or len(r1) < 2:
        return f"- {label}: not decided yet (needs ≥ 2 seeds beside LoRA r 1's)"
    _, low, high = welch_interval(final_losses(r1), final_losses(ms), 0.90)
    mine, a = statistics.mean(final_losses(ms)), statistics.mean(final_losses(r1))
    head = (f"- {label}{EDGE if at_edge else ''}: final training loss {mine:.3f} (90 % interval of LoRA r 1 − arm "
            f"{interval_cell(low, high, (0.0,), 3)}); ")
    if not accepted:
        return head + "no verdict: the setting was not accepted (rank 1 does not bind)"
    note = " (provisional: fewer than 3 seeds)" if min(len(ms), len(r1), len(full)) < SEEDS else ""
    if high < 0:
        return head + f"fits worse than one rank-1 adapter{note}"
    if low <= 0:
        return head + f"not separable from LoRA r 1's plateau at this budget{note}"
    way = (a - mine) / (a - statistics.mean(final_losses(full)))
    return head + f"below LoRA r 1's plateau{note}, {100 * way:.0f} % of the way from LoRA r 1 to full fine-tuning"


def verdict(runs: Path, task: str, chosen: list[Arm], picked: dict, seeds: list[int]) -> list[str]:
    """The acceptance check (does rank 1 bind?) and, per chain arm, where its final training loss lies between
    LoRA r 1's plateau and full fine-tuning's (docs/protocols/raclora-rank.md)."""
    by = {a.label: seed_metrics(runs, task, a, picked.get(a.label), seeds) for a in chosen}
    if not (by.get("lora-r1") and by.get("full")):
        return ["Verdict: not yet (LoRA r 1 and full fine-tuning must both have finished)."]
    accepted, line = acceptance(by["lora-r1"], by["full"])
    edge = {a.label: still_at_edge(runs, task, a, picked.get(a.label)) for a in chosen}
    return [line, "", *(arm_line(label, by["lora-r1"], by["full"], by.get(label) or [], accepted, edge.get(label, False))
                        for label in CHAIN_ARMS)]


def loss_curves(runs: Path, task: str, chosen: list[Arm], picked: dict, seeds: list[int], path: Path) -> None:
    """Training loss against optimizer steps (the ledger's bin means, seed mean) for every arm, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for arm in chosen:
        ms = seed_metrics(runs, task, arm, picked.get(arm.label), seeds)
        if not ms:
            continue
        n = min(len(m["loss_bins"]) for m in ms)
        xs = [ms[0]["loss_bins"][i][0] for i in range(n)]
        ys = [statistics.mean(m["loss_bins"][i][1] for m in ms) for i in range(n)]
        ax.plot(xs, ys, label=f"{arm.label} (lr {picked[arm.label]:g}, n={len(ms)})", lw=1.2)
    ax.set(xlabel="optimizer step", ylabel="training loss (bin mean, seed mean)", yscale="log",
           title=f"{task}: fit to the training rows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--max-train", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--link-steps", type=int, default=20)
    ap.add_argument("--arms", default=None, help="comma-separated labels (default: all)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "raclora-rank"))
    ap.add_argument("--name", default="raclora-rank")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    runs, seeds = Path(args.runs), [int(s) for s in args.seeds.split(",")]
    chosen = [a for a in arms(args.link_steps) if args.arms is None or a.label in args.arms.split(",")]
    common = ["--head", "linear", "--pooling", "mean", "--targets", "query,value", "--max-train", str(args.max_train),
              "--val-split", "0.1", "--eval-each-epoch", "--max-steps", str(args.steps), "--batch-size", "16",
              "--save-every", "500"]
    picked = run_all(runs, args.task, chosen, seeds, common, args.dry_run, args.report_only)
    if args.dry_run:
        return
    out = ROOT / "docs" / "bench"
    lines = [header("python " + " ".join(shlex.quote(a) for a in sys.argv), runs.name),
             f"{args.steps} optimizer steps per run; a chain link is {args.link_steps} steps. Protocol: "
             "docs/protocols/raclora-rank.md.", ""]
    check_settings(runs, args.task, chosen, picked, seeds, common)
    lines += table(runs, args.task, chosen, picked, seeds) + [""] + grid_table(runs, args.task, chosen) + [""]
    lines += [line, ""] if (line := unread_entries(runs, args.task, chosen, picked, seeds)) else []
    lines += verdict(runs, args.task, chosen, picked, seeds)
    loss_curves(runs, args.task, chosen, picked, seeds, out / f"{args.name}.png")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
