"""Trainable adapter parameters per method, rank and target set, counted on real models.

Attaches each method to the packaged MiniLM (and, with ``--smollm2``, SmolLM2-135M) and counts the
parameters that require grad, classifier excluded: the numbers behind the "EDoRA trains N× fewer"
claims in docs/evidence/. Cheap (no training); writes ``docs/bench/params.md``.

    python bench/params.py
"""

from __future__ import annotations

import argparse
import copy
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import rankwise

ROOT = Path(__file__).resolve().parents[1]
# the quality benchmark's targets, and EDoRA's paper set (query, value, attention output, FFN output);
# in BERT "output.dense" selects both attention.output.dense and output.dense
TARGET_SETS = {"query,value": ("query", "value"), "query,value,output.dense": ("query", "value", "output.dense")}
CONFIGS = [
    ("LoRA r=8", lambda t: rankwise.LoraConfig(r=8, alpha=16, target_modules=t)),
    ("LoRA r=16", lambda t: rankwise.LoraConfig(r=16, alpha=16, target_modules=t)),
    ("DoRA r=8", lambda t: rankwise.DoraConfig(r=8, alpha=16, target_modules=t)),
    ("DoRA r=16", lambda t: rankwise.DoraConfig(r=16, alpha=16, target_modules=t)),
    ("EDoRA r=16", lambda t: rankwise.EdoraConfig(r=16, alpha=16, target_modules=t)),
]


def adapter_params(base: torch.nn.Module, cfg: rankwise.AdapterConfig) -> int:
    model = copy.deepcopy(base)
    rankwise.attach(model, cfg)
    return rankwise.count_parameters(model)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    from transformers import AutoModel

    from rankwise_harness.models import minilm_path

    base = AutoModel.from_pretrained(minilm_path())  # no classifier head: adapter parameters only
    counts = {(name, ts): adapter_params(base, make(targets)) for ts, targets in TARGET_SETS.items() for name, make in CONFIGS}
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [f"Counted {date} with `python bench/params.py`: trainable parameters of each adapter on the packaged "
             "MiniLM (6 layers, hidden 384, FFN 1536), classifier excluded; the ratio column is DoRA at the same "
             "r (16) over the row.", "",
             "| adapter | " + " | ".join(f"targets `{ts}`" for ts in TARGET_SETS) + " | "
             + " | ".join(f"DoRA-16 / this (`{ts}`)" for ts in TARGET_SETS) + " |",
             "|---|" + "---:|" * (2 * len(TARGET_SETS))]
    for name, _ in CONFIGS:
        cells = [f"{counts[(name, ts)]:,}" for ts in TARGET_SETS]
        ratios = [f"{counts[('DoRA r=16', ts)] / counts[(name, ts)]:.1f}×" for ts in TARGET_SETS]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    out = ROOT / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
