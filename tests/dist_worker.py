"""Worker for tests/test_distributed.py, launched by ``python -m torch.distributed.run --nproc_per_node 2``.

For every method in the matrix it trains a few steps data-parallel (each rank gets its half of the
same global batch), then rank 0 trains a single-process copy with gradient accumulation over the
two halves and compares the adapters. Modes: ``ddp`` (DistributedDataParallel), ``accelerate``
(``Accelerator.prepare_model``, which wraps in DDP), ``fsdp2`` (``fully_shard`` per adapted layer,
then the root), ``fsdp1`` (``FullyShardedDataParallel`` with ``use_orig_params=True``). Writes
``{method: {...}}`` JSON to ``--out`` from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rankwise  # noqa: E402
from conftest import MODEL_CASES  # noqa: E402
from dist_teardown import join, leave  # noqa: E402
from method_matrix import METHOD_CASES  # noqa: E402

STEPS = 3


def _half(batch: dict[str, torch.Tensor], part: int) -> dict[str, torch.Tensor]:
    n = next(iter(batch.values())).shape[0] // 2
    return {k: v[part * n:(part + 1) * n] for k, v in batch.items()}


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (adapters and the fully-trained head), full (unsharded), by name."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.replace("module.", "").replace("_fsdp_wrapped_module.", "")] = t.detach().clone()
    return out


def _attach(case, method_name: str) -> nn.Module:
    model = case.make()
    config, calibration = METHOD_CASES[method_name].make(case, True)
    rankwise.attach(model, config, calibration=calibration)
    return model


def _wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if mode == "accelerate":
        from accelerate import Accelerator

        wrapped = Accelerator(cpu=True).prepare_model(model)
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel), type(wrapped)
        return wrapped
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in rankwise.adapter_layers(model).values():
            fully_shard(layer)  # each adapter is sharded together with its own base layer
        return fully_shard(model)
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    raise ValueError(mode)


def run_method(case_name: str, method_name: str, mode: str) -> dict[str, object]:
    rank = dist.get_rank()
    case = MODEL_CASES[case_name]()
    model = _attach(case, method_name)
    inner = model
    wrapped = _wrap(model, mode)
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for i in range(STEPS):
        wrapped(**_half(case.batch(100 + i), rank)).loss.backward()
        opt.step()
        opt.zero_grad()
        if mode == "fsdp1":  # link ends need whole parameters: FSDP1 has them only inside summon_full_params
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(wrapped, writeback=True):
                rankwise.step(inner, opt)
        else:
            rankwise.step(inner, opt)
    if mode == "fsdp1":  # outside forward, FSDP1's use_orig_params views are this rank's shard only
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped):
            trained = _adapter_state(wrapped)
    else:
        trained = _adapter_state(wrapped)
    # identical on every rank
    flat = torch.cat([t.reshape(-1) for _, t in sorted(trained.items())])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    ranks_identical = all(torch.equal(g, gathered[0]) for g in gathered)
    saved_ok = _save_and_reload(case, method_name, wrapped, inner, mode, trained, rank)
    # one process, gradient accumulation over the same two halves. Every rank computes it (identically),
    # so attaches that use collectives (GoRA's gradient all-reduce, seed broadcasts) stay in lockstep.
    ref = _attach(case, method_name)
    ref_opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    for i in range(STEPS):
        for part in (0, 1):
            (ref(**_half(case.batch(100 + i), part)).loss / 2).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        rankwise.step(ref, ref_opt)
    expected = _adapter_state(ref)
    assert set(expected) == set(trained), (sorted(expected), sorted(trained))
    start = _adapter_state(_attach(case, method_name))
    dist.barrier()
    if rank != 0:
        return {}
    return {
        "ranks_identical": ranks_identical,
        "max_abs_diff": max(float((trained[k] - expected[k]).abs().max()) for k in expected),
        "max_abs_moved": max(float((expected[k] - start[k]).abs().max()) for k in expected),
        "tensors": len(expected),
        "save_reload_exact": saved_ok,
    }


def _save_and_reload(case, method_name: str, wrapped: nn.Module, inner: nn.Module, mode: str, trained: dict[str, torch.Tensor], rank: int) -> bool:
    """Save from rank 0 the way docs/distributed.md says, reload into a plain model, compare."""
    import tempfile

    path = Path(tempfile.gettempdir()) / f"rankwise-dist-{os.getppid()}-{mode}"
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            if rank == 0:
                rankwise.save(inner, path)
    elif mode == "fsdp2":  # parameters are DTensors: gather a full state dict, put it in a plain copy
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        plain = _attach(case, method_name)  # on every rank: attaches may use collectives
        if rank == 0:
            plain.load_state_dict(full)
            rankwise.save(plain, path)
    elif rank == 0:
        rankwise.save(inner, path)
    dist.barrier()
    if rank != 0:
        return True
    fresh = rankwise.load(case.make(), path)
    reloaded = _adapter_state(fresh)
    return set(reloaded) == set(trained) and all(torch.equal(reloaded[k], trained[k]) for k in trained)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "accelerate", "fsdp2", "fsdp1"], default="ddp")
    parser.add_argument("--case", default="mlp", choices=list(MODEL_CASES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    join()
    results: dict[str, object] = {}
    for method_name in METHOD_CASES:
        try:
            results[method_name] = run_method(args.case, method_name, args.mode)
        except Exception as exc:  # report, don't hang the other rank's test
            results[method_name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    leave()


if __name__ == "__main__":
    main()
