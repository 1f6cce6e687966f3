"""Worker for tests/test_review10_distributed.py: ``finetune`` itself on 2 gloo processes (torchrun), several runs in
one launch (a launch costs more than the runs).

Not a test module (no ``test_`` prefix). Every rank writes ``rank<r>.json`` under ``--root``: per scenario what
``finetune`` returned or the error it raised. The scenarios:

* ``whole`` — the run of :func:`run_config` uninterrupted;
* ``cut`` — the same run stopped by Ctrl-C during step 3, then ``--resume``d (all on 2 processes);
* ``left`` — the same run stopped during step 3 and left there (the test resumes it with 1 process);
* ``nan-loss`` / ``nan-grad`` — rank 1 alone makes a NaN loss / a NaN gradient under a finite loss at step 2;
* ``disk-full`` — rank 0's disk is full while it writes the checkpoint of step 4 (the one of step 2 written);
* ``disk-full-end`` — rank 0's disk is full while it writes the finished run's ``metrics.json``;
* ``ctrl-c-ckpt`` — rank 1 alone is interrupted (Ctrl-C) while it writes the checkpoint of step 4 (not in the default
  list: tests/test_review13_distributed.py launches it alone);
* ``keep-best`` — a ``--keep-best`` run whose held-out metric is scripted by step (:data:`KEEP_BEST_VAL`), rank 1
  slowed down just before the finish decides what to keep (not in the default list: tests/test_review18_keep_best.py
  launches it alone).
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_teardown import join, leave
from rankwise import adapter_file
from rankwise_harness import checkpoint
from rankwise_harness.config import RunConfig
from rankwise_harness.tasktypes import TaskType
from rankwise_harness.train import RunInterrupted, finetune

QUIET: dict[str, Any] = dict(show_progress=False, log=lambda _m: None)
CUT_AT = 3  # Ctrl-C during this step (the checkpoint of step 2 is kept)
NAN_AT = 2  # rank 1's non-finite step
FULL_AT = 4  # rank 0's disk is full while it writes this step's checkpoint
LOSS = TaskType.loss  # the task types' own loss, before a scenario patches it
WRITE = adapter_file.atomic_write_bytes  # the same for the file writer
WRITE_STATE = checkpoint.write_state  # and for the checkpoint's state writer


def run_config(model: str, data: str, output: Path, batch_size: int, method: str = "gora") -> RunConfig:
    """The run compared: 31 training rows sampled (7 held out by --val-split, 24 left: 3 global batches of 8 an
    epoch, cut by --grad-accum 2 into a full and a short window), 13 dev rows (odd: not a multiple of 2
    processes), an evaluation after every step, early stopping, a checkpoint every 2 steps; GoRA's head warm-up
    and calibration."""
    extra: dict[str, Any] = {}
    if method == "gora":  # the head warmed up first, then GoRA's calibration through it
        extra = {"overrides": {"n_steps": "2", "r_min": "2", "r_max": "8"}, "head_warmup_steps": 2, "head_lr": 5e-2}
    return RunConfig(task="sst2", method=method, data=data, model=model, output=str(output), r=4, alpha=8, lr=2e-2,
                     batch_size=batch_size, grad_accum=2, epochs=3, max_length=32, max_train=31, max_eval=13,
                     val_split=0.23, eval_every=1, patience=3, save_every=2, warmup_ratio=0.0, precision="no", **extra)


def _interrupt_at(step: int):
    def hook(done: int, _loss: float) -> None:
        if done == step - 1:
            raise KeyboardInterrupt
    return hook


def _nan_on_rank1(kind: str) -> None:
    """From step ``NAN_AT`` on, rank 1's training loss is NaN (``nan-loss``), or finite with a NaN gradient for
    every trainable tensor (``nan-grad``: ``where`` on a false mask passes 0 x inf back)."""
    calls = {"n": 0}

    def loss(self: TaskType, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        value = LOSS(self, model, batch)
        calls["n"] += 1
        if dist.get_rank() != 1 or calls["n"] <= 2 * (NAN_AT - 1):  # 2 micro-batches a step
            return value
        if kind == "nan-loss":
            return value * float("nan")
        params = [p for p in model.parameters() if p.requires_grad]
        off = sum(torch.where(torch.zeros_like(p, dtype=torch.bool), p * float("inf"), torch.zeros_like(p)).sum()
                  for p in params)
        return value + off

    TaskType.loss = loss  # type: ignore[method-assign]


def _disk_full_on_rank0(where: str) -> None:
    """Rank 0's writes to a path containing ``where`` fail as a full disk does (``OSError`` ENOSPC)."""
    import errno

    def full(path: Path, data: bytes) -> None:
        if dist.get_rank() == 0 and where in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        WRITE(path, data)

    adapter_file.atomic_write_bytes = full  # type: ignore[assignment]


def _ctrl_c_on_rank1(where: str) -> None:
    """Review round 13: rank 1 alone is interrupted (``KeyboardInterrupt``) as it writes its random state into a
    path containing ``where``, while rank 0 writes the rest of that checkpoint."""
    def interrupted(folder: Path, name: str, value: Any) -> None:
        if dist.get_rank() == 1 and where in str(folder):
            raise KeyboardInterrupt
        WRITE_STATE(folder, name, value)

    checkpoint.write_state = interrupted  # type: ignore[assignment]


KEEP_BEST_VAL = {4: 0.5, 8: 0.6, 12: 0.75, 16: 0.6, 20: 0.75}  # the held-out accuracy by step: best 12 (20 ties it)
KEEP_BEST_LAG_S = 3.0  # rank 1's delay before the finish's choice of model


def keep_best_config(model: str, data: str, output: Path) -> RunConfig:
    """Review round 18: a ``--keep-best`` run on 2 processes (36 training rows, 2 x 4 a global batch: 4 steps an
    epoch, 5 epochs, an evaluation at each epoch's end), the tiny GPT-2's label words (its predictions carry their
    probabilities)."""
    return RunConfig(task="sst2", method="lora", data=data, model=model, output=str(output), r=4, alpha=8, lr=2e-2,
                     batch_size=4, max_length=32, max_train=48, val_split=0.25, epochs=5, eval_each_epoch=True,
                     warmup_ratio=0.0, precision="no", keep_best=True)


def _keep_best(model: str, data: str, output: Path) -> dict[str, Any]:
    """``keep-best``: the held-out metric of each evaluation is :data:`KEEP_BEST_VAL`'s (dev's is the model's own),
    and rank 1 reaches the finish's choice of model :data:`KEEP_BEST_LAG_S` late (a descheduled process), after
    rank 0 could have written the outputs and removed the snapshot."""
    import time

    from rankwise_harness import train as train_mod

    entry, kept = train_mod._eval_entry, train_mod._kept

    def scripted(step: int, epoch: float, dev: dict[str, float], run: Any) -> dict[str, Any]:
        return {**entry(step, epoch, dev, run), "val": {"accuracy": KEEP_BEST_VAL[step]}}

    def late(run: Any, loop: Any, best: Any) -> Any:
        if dist.get_rank() == 1:
            time.sleep(KEEP_BEST_LAG_S)
        return kept(run, loop, best)

    train_mod._eval_entry, train_mod._kept = scripted, late  # type: ignore[assignment]
    try:
        return finetune(keep_best_config(model, data, output), **QUIET)
    finally:
        train_mod._eval_entry, train_mod._kept = entry, kept  # type: ignore[assignment]


def scenario(name: str, model: str, data: str, root: Path) -> dict[str, Any]:
    TaskType.loss = LOSS  # type: ignore[method-assign]  # as a scenario before this one may have patched them
    adapter_file.atomic_write_bytes = WRITE
    checkpoint.write_state = WRITE_STATE
    if name == "keep-best":
        return _keep_best(model, data, root / name)
    method = "lora" if name.startswith(("nan", "disk", "ctrl-c")) else "gora"
    cfg = run_config(model, data, root / name, 4, method)
    if name == "whole":
        return finetune(cfg, **QUIET)
    if name.startswith("nan"):
        _nan_on_rank1(name)
        finetune(cfg, **QUIET)
        return {}
    if name == "locked":  # the test holds this folder's lock: rank 0 cannot take it
        finetune(cfg, **QUIET)
        return {}
    if name == "ctrl-c-ckpt":
        _ctrl_c_on_rank1(f".step-{FULL_AT:07d}.tmp")
        finetune(cfg, **QUIET)
        return {}
    if name.startswith("disk-full"):
        _disk_full_on_rank0(f".step-{FULL_AT:07d}.tmp" if name == "disk-full" else "metrics.json")
        finetune(cfg, **QUIET)
        return {}
    try:
        finetune(cfg, hook=_interrupt_at(CUT_AT), **QUIET)
    except RunInterrupted:
        pass
    dist.barrier()
    return finetune(cfg, resume=True, **QUIET) if name == "cut" else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--scenarios", default="whole,cut,left,nan-loss,nan-grad,disk-full,disk-full-end,locked")
    parser.add_argument("--timeout-s", type=float, default=None, help="one collective's wait (dist_teardown.join)")
    args = parser.parse_args()
    join(timeout_s=args.timeout_s)
    root = Path(args.root)
    out: dict[str, Any] = {}
    for name in args.scenarios.split(","):
        try:
            out[name] = scenario(name, args.model, args.data, root)
        except Exception as exc:  # noqa: BLE001 (recorded for the test to show)
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "alone": getattr(exc, "alone", None)}
        dist.barrier()
    (root / f"rank{dist.get_rank()}.json").write_text(json.dumps(out, default=str))
    leave()




def library_checks(rank: int, world: int, init_file: str, out_file: str, names: list[str] | None = None,
                   timeout_s: float | None = None) -> None:
    """``torch.multiprocessing.spawn`` target (2 gloo processes) for the library's own collectives: writes what each
    check of :data:`LIBRARY_CHECKS` (or those ``names``, of it, :data:`ROUND13_CHECKS` or :data:`ROUND16_CHECKS`)
    returned, ``{name: ...}``, as JSON to ``out_file.<rank>``. ``timeout_s``: one collective's wait, in place of :data:`dist_teardown.TIMEOUT`."""
    join(rank, world, init_file, timeout_s)
    out: dict[str, Any] = {}
    for name, check in (LIBRARY_CHECKS | ROUND13_CHECKS | ROUND16_CHECKS).items():
        if (names is None and name in LIBRARY_CHECKS) or (names is not None and name in names):
            out[name] = check(rank)
            # Each check's FSDP / DDP model (reference cycles; its hooks and reducer hold the process group) is
            # freed now, on both ranks, not by a garbage collection at some later point of one rank.
            gc.collect()
            dist.barrier()
    Path(f"{out_file}.{rank}").write_text(json.dumps(out))
    leave()


def spawn_library_checks(root: Path, names: list[str] | None = None, timeout_s: float | None = None
                         ) -> list[dict[str, Any]]:
    """Run :func:`library_checks` (``names`` of them, or :data:`LIBRARY_CHECKS`) on 2 spawned gloo processes, their
    files under ``root``; what each rank wrote, by rank. With ``timeout_s`` a collective waits that long at most: a
    rank left waiting for a peer ends the spawn with an error, never hangs it."""
    import torch.multiprocessing as mp

    mp.spawn(library_checks, args=(2, str(root / "init"), str(root / "out"), names, timeout_s), nprocs=2, join=True)
    return [json.loads((root / f"out.{r}").read_text()) for r in (0, 1)]


def _lora_mlp() -> torch.nn.Module:
    """The tiny MLP with LoRA (r 4, seeded) on fc1 and fc2, unwrapped: every spawn check's model."""
    import rankwise
    from conftest import TinyMLP

    torch.manual_seed(0)
    model = TinyMLP()
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], seed=0))
    return model


def _fsdp2() -> torch.nn.Module:
    """:func:`_lora_mlp` under FSDP2: ``fully_shard`` per adapted layer, then the root."""
    import rankwise
    from torch.distributed.fsdp import fully_shard

    model = _lora_mlp()
    for layer in rankwise.adapter_layers(model).values():
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp2_nan_in_rank0s_shard(rank: int) -> str:
    """FSDP2 (``fully_shard`` per adapted layer, then the root), a NaN put into rank 0's shard of ``fc1.lora_b``
    after one step, then ``rankwise.step``: what it did."""
    import rankwise

    model = _fsdp2()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 12), labels=torch.randint(0, 3, (4,))).loss.backward()
    opt.step()
    if rank == 0:
        with torch.no_grad():
            model.get_submodule("fc1").lora_b.to_local().view(-1)[0] = float("nan")
    try:
        rankwise.step(model, opt)
    except FloatingPointError as exc:
        return f"raised: {exc}"
    return "stepped"


def _two_named_chains() -> torch.nn.Module:
    """RAC-LoRA "default" on fc1 (links of 2 steps, seeded) and COLA "b" on fc2 (links of 1 step, ``seed=None``: drawn
    from the global RNG, which differs per rank here, and made rank 0's), both active and trainable."""
    import rankwise
    from conftest import TinyMLP

    torch.manual_seed(0)
    model = TinyMLP()
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, link_steps=2, target_modules=["fc1"], seed=0))
    torch.manual_seed(77 + dist.get_rank())
    rankwise.attach(model, rankwise.RacLoraConfig.cola(r=2, alpha=4, link_steps=1, target_modules=["fc2"]), name="b")
    rankwise.set_active(model, ["default", "b"])
    return model


def _trained(model: torch.nn.Module) -> torch.Tensor:
    import rankwise

    return torch.cat([t.detach().double().reshape(-1) for n in ("default", "b")
                      for layer in rankwise.adapter_layers(model, n).values()
                      for _, t in sorted(layer.adapter_state().items())])


def _several_adapters_under_ddp(rank: int) -> dict[str, Any]:
    """Two named chains under DDP, 4 Adam steps (links end at steps 1-4 for "b", 2 and 4 for "default"), each rank
    on its half of every batch, ``rankwise.step(model, opt)`` stepping both; against one process accumulating the
    two halves (computed on every rank, its attach's seed broadcast too)."""
    import rankwise

    def batch(i: int, part: slice) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(900 + i)
        whole = {"x": torch.randn(8, 12, generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}
        return {k: v[part] for k, v in whole.items()}

    halves = (slice(0, 4), slice(4, 8))
    model = _two_named_chains()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    ref = _two_named_chains()
    ref_opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    probe = batch(99, slice(0, 8))
    start = ref(**probe).logits.detach()
    for i in range(4):
        ddp(**batch(i, halves[rank])).loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
        for part in halves:
            (ref(**batch(i, part)).loss / 2).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        rankwise.step(ref, ref_opt)
    mine = _trained(model)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    links = {n: int(rankwise.adapter_layers(model, n)[m].links) for n, m in (("default", "fc1"), ("b", "fc2"))}
    return {"ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered), "links": links,
            "max_abs_diff": float((mine - _trained(ref)).abs().max()),
            "moved": float((ref(**probe).logits.detach() - start).abs().max())}  # the function trained, not 0 = 0


def _fsdp1(use_orig_params: bool = True) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """The tiny MLP with LoRA on fc1 and fc2 under ``FullyShardedDataParallel`` (the root only: on 2 ranks rank 0's
    flat shard holds all of fc1, rank 1's none of it), after one forward/backward; ``use_orig_params=False`` needs
    every parameter trainable (FSDP1 refuses a flat parameter of mixed ``requires_grad``). (inner, wrapped, opt)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = _lora_mlp()
    if not use_orig_params:
        model.requires_grad_(True)
    wrapped = FullyShardedDataParallel(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    wrapped(torch.randn(4, 12), labels=torch.randint(0, 3, (4,))).loss.backward()
    return model, wrapped, opt


def _outcome(work: Any) -> str:
    """What ``work()`` did: ``"ok"``, or ``"<ErrorType>: <message>"``."""
    try:
        work()
    except Exception as exc:  # noqa: BLE001 (the test reads it)
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _fsdp1_nan_in_rank0s_shard(rank: int) -> dict[str, str]:
    """FSDP1 (``use_orig_params=True``) outside ``summon_full_params``: a NaN put into rank 0's shard of
    ``fc1.lora_b``'s gradient, then ``check_finite_grads`` (``grads``; rank 1 has no gradient for fc1: its shard is
    empty); the gradient made finite, a step and ``rankwise.step`` (``clean``); a NaN put into rank 0's shard of
    ``fc1.lora_b`` itself, then ``rankwise.step`` (``step``)."""
    import rankwise

    model, _wrapped, opt = _fsdp1()
    lora_b = model.get_submodule("fc1").lora_b
    if rank == 0:
        with torch.no_grad():
            lora_b.grad.view(-1)[0] = float("nan")
    out = {"grads": _outcome(lambda: rankwise.check_finite_grads(model))}
    if lora_b.grad is not None:
        lora_b.grad.nan_to_num_(0.0)
    opt.step()
    out["clean"] = _outcome(lambda: rankwise.step(model, opt))
    if rank == 0:
        with torch.no_grad():
            lora_b.view(-1)[0] = float("nan")
    out["step"] = _outcome(lambda: rankwise.step(model, opt))
    return out


def _fsdp1_flat_parameters(rank: int) -> dict[str, str]:
    """``FullyShardedDataParallel(use_orig_params=False)``: ``rankwise.step`` and ``check_finite_grads``."""
    import rankwise

    model, _wrapped, opt = _fsdp1(use_orig_params=False)
    opt.step()
    return {"step": _outcome(lambda: rankwise.step(model, opt)),
            "grads": _outcome(lambda: rankwise.check_finite_grads(model))}


def _gora_calibration_failing_on_rank1(rank: int) -> dict[str, str]:
    """GoRA's calibration (3 steps) on 2 ranks where rank 1's batches fail and rank 0's do not: its second batch holds a
    NaN (``nan``, also with early stopping: ``nan_early``), its iterator ends after 2 batches (``ran_out``), its list
    holds 2 (``short``); what ``attach`` did on each rank."""
    import rankwise
    from conftest import TinyMLP

    def batches(nan: bool) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(40 + rank)
        out = [{"x": torch.randn(4, 12, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(3)]
        if nan and rank == 1:
            out[1]["x"][0, 0] = float("nan")
        return out

    def attach(calibration: Any, **extra: Any) -> None:
        torch.manual_seed(0)
        cfg = rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=8, n_steps=3, target_modules=["fc1", "fc2"], seed=0,
                                  **extra)
        rankwise.attach(TinyMLP(), cfg, calibration=calibration)

    mine = batches(False)
    return {"nan": _outcome(lambda: attach(batches(True))),
            "nan_early": _outcome(lambda: attach(batches(True), early_stop_threshold=1e-9)),
            "ran_out": _outcome(lambda: attach(iter(mine[: 3 - rank]))),
            "short": _outcome(lambda: attach(mine[: 3 - rank]))}


def _save_under_fsdp(rank: int) -> dict[str, str]:
    """``rankwise.save`` / ``export_peft`` / ``merge`` on models whose adapter tensors are shards here: FSDP1
    (``use_orig_params=True``) outside ``summon_full_params`` (saving over a previous adapter: is it kept?), inside it
    (the file compared with one process's), FSDP2 and the gathering its error names, FSDP1 ``use_orig_params=False``
    (last: before round 12 its export killed the process). What each did, or ``same`` / ``differs`` from the file one
    process saves of the same adapter."""
    import tempfile

    import rankwise
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference = (rankwise.save(_lora_mlp(), root / "one") / "adapter.safetensors").read_bytes()
        rankwise.save(_lora_mlp(), root / "kept")

        def same(folder: Path) -> str:
            file = folder / "adapter.safetensors"
            return "missing" if not file.is_file() else "same" if file.read_bytes() == reference else "differs"

        out: dict[str, str] = {}
        _inner, wrapped, _opt = _fsdp1()
        out["fsdp1_save"] = _outcome(lambda: rankwise.save(wrapped, root / "kept"))
        out["fsdp1_kept"] = same(root / "kept")
        out["fsdp1_export"] = _outcome(lambda: rankwise.export_peft(wrapped, root / "peft1"))
        out["fsdp1_merge"] = _outcome(lambda: rankwise.merge(wrapped))
        with FullyShardedDataParallel.summon_full_params(wrapped):
            out["fsdp1_summoned"] = _outcome(lambda: rankwise.save(wrapped, root / "summoned"))
        out["fsdp1_summoned_file"] = same(root / "summoned")
        model = _fsdp2()
        out["fsdp2_save"] = _outcome(lambda: rankwise.save(model, root / "two"))
        out["fsdp2_export"] = _outcome(lambda: rankwise.export_peft(model, root / "peft2"))
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:  # the error's recipe: the gathered state into an unsharded copy, saved there
            copy = _lora_mlp()
            copy.load_state_dict(state)
            out["fsdp2_gathered_file"] = same(rankwise.save(copy, root / "gathered"))
        _inner, wrapped, _opt = _fsdp1(use_orig_params=False)
        for what, work in (("save", rankwise.save), ("export", rankwise.export_peft)):
            out[f"flat_{what}"] = _outcome(lambda what=what, work=work: work(wrapped, root / f"flat_{what}"))
        out["flat_merge"] = _outcome(lambda: rankwise.merge(wrapped))
    return out


def _lora_head() -> torch.nn.Module:
    """:func:`_lora_mlp` with the head trained fully and saved whole (``modules_to_save=["head"]``)."""
    import rankwise
    from conftest import TinyMLP

    torch.manual_seed(0)
    model = TinyMLP()
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                                               seed=0))
    return model


def _save_with_only_the_head_sharded(rank: int) -> dict[str, str]:
    """Review round 13: ``save`` / ``export_peft`` where the adapted layers are whole on every rank and only the
    ``modules_to_save`` head is sharded: FSDP1 with the adapted layers ignored (the head in the root's flat shard:
    rank 0 holds part of its weight, rank 1 the rest and none of its bias), FSDP1 wrapping the head alone, FSDP2
    ``fully_shard`` on the head alone; each saved over a previous adapter (is it kept?), then inside
    ``summon_full_params`` (FSDP1: the file compared with one process's). What each did, or ``same`` / ``differs``."""
    import tempfile

    import rankwise
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference = (rankwise.save(_lora_head(), root / "one") / "adapter.safetensors").read_bytes()

        def same(folder: Path, as_: bytes = reference) -> str:
            file = folder / "adapter.safetensors"
            return "missing" if not file.is_file() else "same" if file.read_bytes() == as_ else "differs"

        model = _lora_head()
        ignored = FullyShardedDataParallel(model, ignored_modules=[model.fc1, model.fc2], use_orig_params=True,
                                           device_id=torch.device("cpu"))
        wrapped_head = _lora_head()
        wrapped_head.head = FullyShardedDataParallel(wrapped_head.head, use_orig_params=True,
                                                     device_id=torch.device("cpu"))
        two = _lora_head()
        fully_shard(two.head)
        out: dict[str, str] = {}
        for kind, m in (("ignored", ignored), ("wrapped_head", wrapped_head), ("fsdp2_head", two)):
            previous = (rankwise.save(_lora_mlp(), root / kind) / "adapter.safetensors").read_bytes()
            out[f"{kind}_save"] = _outcome(lambda m=m, kind=kind: rankwise.save(m, root / kind))
            out[f"{kind}_kept"] = same(root / kind, previous)
            out[f"{kind}_export"] = _outcome(lambda m=m, kind=kind: rankwise.export_peft(m, root / f"{kind}_peft"))
        for kind, m in (("ignored", ignored), ("wrapped_head", wrapped_head)):
            with FullyShardedDataParallel.summon_full_params(m):
                out[f"{kind}_summoned"] = _outcome(lambda m=m, kind=kind: rankwise.save(m, root / f"{kind}_s"))
            out[f"{kind}_summoned_file"] = same(root / f"{kind}_s")
    return out


LIBRARY_CHECKS = {"fsdp2_nan": _fsdp2_nan_in_rank0s_shard, "several": _several_adapters_under_ddp,
                  "fsdp1_nan": _fsdp1_nan_in_rank0s_shard, "fsdp1_flat": _fsdp1_flat_parameters,
                  "gora_rank1_fails": _gora_calibration_failing_on_rank1,
                  "save_sharded": _save_under_fsdp}
def _ctrl_c_on_rank1_while_checkpointing(rank: int) -> dict[str, str]:
    """Review round 13: rank 1 alone is interrupted (``KeyboardInterrupt``: a Ctrl-C, a SIGINT sent to it) in one
    phase of ``write_checkpoint`` while rank 0 is still writing; each phase's ``undo`` records that it ran. What
    ``on_every_process`` raised on each rank, its seconds, whether ``undo`` ran, and whether the interrupt is marked as
    told to every process (``was_told``: the command line then does not end that process early)."""
    import time

    from rankwise_harness.checkpoint import on_every_process, was_told

    undone: list[bool] = []

    def work() -> None:
        if rank == 1:
            raise KeyboardInterrupt
        time.sleep(0.5)  # rank 0 still writing when rank 1 is interrupted

    start = time.perf_counter()
    said, told = "returned", "no interrupt"
    try:
        on_every_process("writing checkpoint step-0000004", work, lambda: undone.append(True),
                         "the previous checkpoint (step-0000002) is kept")
    except BaseException as exc:  # noqa: BLE001 (the test reads it)
        said = f"{type(exc).__name__}: {exc}"
        told = str(was_told(exc)) if isinstance(exc, KeyboardInterrupt) else told
    return {"said": said, "seconds": f"{time.perf_counter() - start:.1f}", "undone": str(bool(undone)), "told": told}


def _file_contents(folder: Path, file: str) -> tuple[Any, ...] | None:
    """A saved or exported adapter's contents: its ``adapter_config.json``, its safetensors metadata, its tensors by
    name (dtype, shape, values); ``None`` when missing. (safetensors writes the metadata's keys in a per-process
    order, so two processes' exports can differ in bytes and not in content.)"""
    from safetensors import safe_open

    if not (folder / file).is_file():
        return None
    with safe_open(str(folder / file), framework="pt") as f:
        tensors = {k: (str(t.dtype), tuple(t.shape), t.tolist()) for k in f.keys() for t in [f.get_tensor(k)]}
        meta = f.metadata()
    return json.loads((folder / "adapter_config.json").read_text()), meta, tensors


def _flat_parameters_inside_summon_full_params(rank: int) -> dict[str, str]:
    """Review round 13: ``FullyShardedDataParallel(use_orig_params=False)`` (every parameter trainable, after one
    forward/backward), inside ``summon_full_params``: ``save`` and ``export_peft`` of the LoRA MLP and of the one with
    a ``modules_to_save`` head, each compared with what one process writes of the same (untrained) adapter (``save``:
    the bytes; ``export``: the contents); and after leaving it, ``save`` again (the flat storage freed). What each
    did, or ``same`` / ``differs`` / ``missing``."""
    import tempfile

    import rankwise
    from torch.distributed.fsdp import FullyShardedDataParallel

    writers = (("save", rankwise.save, lambda d: (d / "adapter.safetensors").read_bytes()),
               ("export", rankwise.export_peft, lambda d: _file_contents(d, "adapter_model.safetensors")))
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind, make in (("lora", _lora_mlp), ("head", _lora_head)):
            one = {what: read(work(make(), root / f"{kind}_{what}_one")) for what, work, read in writers}
            model = make()
            model.requires_grad_(True)
            wrapped = FullyShardedDataParallel(model, use_orig_params=False, device_id=torch.device("cpu"))
            wrapped(torch.randn(4, 12), labels=torch.randint(0, 3, (4,))).loss.backward()
            with FullyShardedDataParallel.summon_full_params(wrapped):
                for what, work, read in writers:
                    folder = root / f"{kind}_{what}"
                    out[f"{kind}_{what}"] = _outcome(lambda work=work, folder=folder: work(wrapped, folder))
                    got = read(folder) if (folder / "adapter_config.json").is_file() else None
                    out[f"{kind}_{what}_file"] = "missing" if got is None else "same" if got == one[what] else "differs"
            out[f"{kind}_after"] = _outcome(lambda: rankwise.save(wrapped, root / f"{kind}_after"))
    return out


def _counts_under_sharding(rank: int) -> dict[str, Any]:
    """Review round 16: ``count_parameters`` / ``trainable_parameters`` of :func:`_lora_mlp` unwrapped, under FSDP1
    (``use_orig_params=True``) outside and inside ``summon_full_params``, under FSDP1 with flat parameters, and under
    FSDP2 (``fully_shard``): the counts, or what counting raised."""
    import rankwise
    from torch.distributed.fsdp import FullyShardedDataParallel

    plain = _lora_mlp()
    out: dict[str, Any] = {"unwrapped": list(rankwise.count_parameters(plain)),
                           "unwrapped_tensors": len(rankwise.trainable_parameters(plain))}
    _, wrapped, _ = _fsdp1()
    out["fsdp1"] = _outcome(lambda: rankwise.count_parameters(wrapped))
    listed = rankwise.trainable_parameters(wrapped)
    out["fsdp1_listed"] = [len(listed), repr(listed), _outcome(lambda: listed.trainable)]
    with FullyShardedDataParallel.summon_full_params(wrapped):
        out["fsdp1_summoned"] = list(rankwise.count_parameters(wrapped))
    _, flat, _ = _fsdp1(use_orig_params=False)
    out["fsdp1_flat"] = _outcome(lambda: rankwise.count_parameters(flat))
    out["fsdp2"] = list(rankwise.count_parameters(_fsdp2()))
    return out


ROUND16_CHECKS = {"counts": _counts_under_sharding}  # run by tests/test_review16_counts.py alone
ROUND13_CHECKS = {"flat_summoned": _flat_parameters_inside_summon_full_params, "head_sharded": _save_with_only_the_head_sharded, "ctrl_c": _ctrl_c_on_rank1_while_checkpointing}  # run by tests/test_review13_distributed.py alone


def cli_run(root: Path, argv: list[str], timeout_s: float) -> None:
    """Review round 13: the command line itself (``rankwise_harness.cli.main(argv)``) on this process, started by hand
    with torch's environment variables (not torchrun, which stops the other processes itself once one ends), its
    collectives waiting ``timeout_s`` at most. With ``RANKWISE_TEST_SIGINT_AT=N`` in the environment, rank 1 sends
    itself a SIGINT (a Ctrl-C on it alone) in the loss of step N's first micro-batch, while rank 0 goes on into that
    step's collectives, and writes when into ``root/signal.json``. A process whose ``main`` returns writes its exit
    status and when into ``root/rank<r>.json``; rank 1 then lingers ``timeout_s`` (as a notebook or a slow
    interpreter teardown would) before it exits with that status."""
    import os
    import signal
    import sys
    import time

    from rankwise_harness import cli

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a Ctrl-C raises, even where the test runner was started
    join(timeout_s=timeout_s)                                  # as a background job (`cmd &` ignores SIGINT)
    rank, at = dist.get_rank(), int(os.environ.get("RANKWISE_TEST_SIGINT_AT", "0"))
    calls = {"n": 0}

    def loss(self: TaskType, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls["n"] += 1
        if rank == 1 and at and calls["n"] == 2 * (at - 1) + 1:  # 2 micro-batches a step
            (root / "signal.json").write_text(json.dumps({"at": time.time()}))
            os.kill(os.getpid(), signal.SIGINT)
        return LOSS(self, model, batch)

    TaskType.loss = loss  # type: ignore[method-assign]
    code = cli.main(argv)
    (root / f"rank{rank}.json").write_text(json.dumps({"code": code, "at": time.time()}))
    sys.stderr.flush()
    if rank == 1:
        time.sleep(timeout_s)
    sys.exit(code)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["cli"]:  # cli ROOT TIMEOUT_S ARGS...
        cli_run(Path(sys.argv[2]), sys.argv[4:], float(sys.argv[3]))
    else:
        main()
