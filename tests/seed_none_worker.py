"""Worker for tests/test_review10_leftovers.py (``seed=None`` under torch.distributed), launched by
``python -m torch.distributed.run --nproc_per_node 2``.

Each rank seeds torch's global RNG differently (as ``accelerate.utils.set_seed(seed, device_specific=True)``
does), attaches every matrix method with ``seed=None`` to the tiny MLP, then shards it with FSDP2
(``fully_shard`` per adapter layer, then the root). Rank 0 writes, per method, every adapter tensor as each
rank held it before sharding and as the sharded model holds it (gathered), to ``--out`` (``torch.save``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rankwise  # noqa: E402
from conftest import MODEL_CASES  # noqa: E402
from dist_teardown import join, leave  # noqa: E402
from method_matrix import METHOD_CASES  # noqa: E402

RANK_SEED = 100  # rank k seeds its global RNG with RANK_SEED + k


def attach_unseeded(method: str) -> torch.nn.Module:
    """The matrix's config for ``method`` on the MLP with ``seed=None``, attached after ``torch.manual_seed``."""
    case = MODEL_CASES["mlp"]()
    model = case.make()
    config, calibration = METHOD_CASES[method].make(case, False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(RANK_SEED + rank)
    rankwise.attach(model, dataclasses.replace(config, seed=None), calibration=calibration)
    return model


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and buffers of the adapter layers, not the base weight/bias), whole."""
    out = {}
    for name, layer in rankwise.adapter_layers(model).items():
        for key, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if key not in ("weight", "bias"):
                out[f"{name}.{key}"] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    join()
    from torch.distributed.fsdp import fully_shard

    results = {}
    for method in METHOD_CASES:
        model = attach_unseeded(method)
        own = adapter_tensors(model)
        gathered: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, own)
        for layer in rankwise.adapter_layers(model).values():
            fully_shard(layer)
        fully_shard(model)
        results[method] = {"ranks": gathered, "sharded": adapter_tensors(model)}
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    del results, model  # the FSDP2 models hold the group: freed before it is destroyed
    leave()


if __name__ == "__main__":
    main()
