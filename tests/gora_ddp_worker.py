"""Worker for the GoRA distributed test: one gloo process per rank, each on its half of every batch.

Not a test module (no ``test_`` prefix); ``tests/test_gora.py`` spawns it with torch.multiprocessing.
"""

from __future__ import annotations

import torch

import rankwise
from conftest import TinyMLP
from dist_teardown import join, leave


def global_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """The global batches (8 rows each) the single-process reference sees whole."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(500 + i)
        out.append({"x": torch.randn(8, 12, generator=g), "labels": torch.randint(0, 3, (8,), generator=g)})
    return out


def make_config(seed: int | None) -> rankwise.GoraConfig:
    return rankwise.GoraConfig(r_ref=4, r_min=2, r_max=12, alpha=8, n_steps=3, target_modules=["fc1", "fc2", "head"], seed=seed)


def adapters(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor | int]]:
    return {
        n: {"rank": layer.rank, "a": layer.lora_a.detach().clone(), "b": layer.lora_b.detach().clone()}
        for n, layer in rankwise.adapter_layers(model).items()
    }


def run(rank: int, world: int, init_file: str, out_file: str) -> None:
    join(rank, world, init_file)
    per = 8 // world
    mine = [{k: v[rank * per:(rank + 1) * per] for k, v in b.items()} for b in global_batches(3)]
    results = {}
    for seed in (0, None):
        torch.manual_seed(0)
        model = TinyMLP()
        torch.manual_seed(1234 + rank)  # a different global RNG per rank: only the broadcast seed can align A
        report = rankwise.attach(model, make_config(seed), calibration=mine)
        results[str(seed)] = adapters(model)
        results[f"notes{seed}"] = report.notes
    torch.save(results, f"{out_file}.{rank}")
    leave()
