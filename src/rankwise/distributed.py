"""``torch.distributed`` for the methods: the process group if any, its device, and a value shared from rank 0.

One home for what GoRA (gradient all-reduce, early-stop flag, shared A seed), the harness's head warm-up
(gradient all-reduce), RAC-LoRA (shared sketch seed, link ends on FSDP2's sharded parameters) and ``attach`` (an
unseeded adapter made rank 0's) need; every function is a no-op without an initialised process group or a
sharded tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .layer import AdapterLayer


def process_group() -> Any:
    """``torch.distributed`` when a process group is initialised, else ``None``."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def comm_device(dist: Any) -> torch.device:
    """Where collectives' tensors live: the current CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over every rank of the process group (a collective: every rank must call it, with a
    tensor of the same shape); ``t`` itself without a process group."""
    dist = process_group()
    if dist is None:
        return t
    buf = t.to(comm_device(dist))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return (buf / dist.get_world_size()).to(t.device)


def true_on_every_rank(flags: torch.Tensor) -> torch.Tensor:
    """A boolean tensor's elementwise AND across the ranks (a collective: every rank must call it, with a tensor of
    the same shape); ``flags`` itself without a process group."""
    dist = process_group()
    if dist is None:
        return flags
    buf = flags.to(device=comm_device(dist), dtype=torch.int32)
    dist.all_reduce(buf, op=dist.ReduceOp.MIN)
    return buf.to(device=flags.device, dtype=torch.bool)


def sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP manages ``model`` (``fully_shard``, or ``FullyShardedDataParallel`` around it): then each rank
    holds its own part of a parameter (FSDP2's ``DTensor`` shard, FSDP1's flat-shard view outside
    ``summon_full_params``), and a check of the parameters must combine the ranks' answers. Both mark the modules
    they manage (``_is_fsdp_managed_module``); an FSDP1 view is otherwise a plain tensor."""
    return any(getattr(m, "_is_fsdp_managed_module", False) for m in model.modules())


def uses_flat_params(model: torch.nn.Module) -> bool:
    """Whether ``model`` is under ``FullyShardedDataParallel(use_orig_params=False)`` (FSDP1 marks the modules)."""
    return any(getattr(m, "_fsdp_use_orig_params", True) is False for m in model.modules())


def check_original_params(model: torch.nn.Module) -> None:
    """Refuse a model under ``FullyShardedDataParallel(use_orig_params=False)``: its modules' tensors are views
    into a flat parameter whose storage is freed outside the forward pass (reading one crashed the process:
    SIGSEGV, measured with torch 2.13), not the adapter's parameters."""
    if uses_flat_params(model):
        raise ValueError(_FLAT_REFUSAL)


_FLAT_REFUSAL = ("the model is wrapped in FullyShardedDataParallel(use_orig_params=False): its adapter tensors are views "
                 "into a flat parameter, freed outside the forward pass. Wrap with use_orig_params=True, or shard with "
                 "FSDP2 (fully_shard)")


def _storage_holds(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage holds all of it: not a view into a freed (resized to 0) flat parameter."""
    return t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel()) * t.element_size()


def check_whole(model: torch.nn.Module, weights: Iterable[torch.Tensor], what: str, *, dtensors_ok: bool = False,
                summoned_ok: bool = False) -> None:
    """Refuse to ``what`` (save, export, merge) a model whose adapted layers' tensors are not whole on this rank, by
    their base ``weights``: FSDP1's ``use_orig_params=False`` (:func:`check_original_params`; with ``summoned_ok``
    not inside ``summon_full_params``, where its views are whole: their storage, the gathered flat parameter, is
    allocated on every rank), FSDP1's flat-shard views outside ``summon_full_params`` (1-D: an empty one on a rank
    holding none of it; writing them produced a file of shards, silently), FSDP2's ``DTensor`` shards (unless
    ``dtensors_ok``: their arithmetic is the whole tensor's). A ``ValueError`` naming the fix; nothing read or
    written."""
    weights = list(weights)
    if uses_flat_params(model) and not (summoned_ok and all(_storage_holds(w) for w in weights)):
        raise ValueError(_FLAT_REFUSAL + (f" (or {what} inside `with FullyShardedDataParallel.summon_full_params(model):`"
                                          ", entered on every rank)" if summoned_ok else ""))
    if sharded(model) and any(w.dim() < 2 for w in weights):
        raise ValueError(_fsdp1_refusal(what, "each adapter tensor"))
    if not dtensors_ok and any(local(w) is not w for w in weights):
        raise ValueError(_fsdp2_refusal(what, "each adapter tensor"))


def check_layers_whole(model: torch.nn.Module, layers: Mapping[str, AdapterLayer], what: str, zero3_fix: str, *,
                       dtensors_ok: bool = False, summoned_ok: bool = False) -> None:
    """The check before reading or writing adapted ``layers``' tensors (``{name: layer}``): :func:`check_whole` on
    their base weights (FSDP) and :func:`check_not_zero3_partitioned` on all their parameters (DeepSpeed ZeRO-3)."""
    check_whole(model, (layer.weight for layer in layers.values()), what, dtensors_ok=dtensors_ok,
                summoned_ok=summoned_ok)
    check_not_zero3_partitioned(named_parameters_of(layers), what, zero3_fix)


def zero3_partitioned(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DeepSpeed ZeRO-3 parameter partitioned across ranks right now (DeepSpeed marks its
    parameters with ``ds_id``; outside a gather a partitioned one holds an empty placeholder, its whole shape in
    ``ds_shape``). A parameter ZeRO-3 keeps whole (below ``stage3_param_persistence_threshold``) or one inside
    ``deepspeed.zero.GatheredParameters`` is whole."""
    shape = getattr(t, "ds_shape", None)
    return getattr(t, "ds_id", None) is not None and shape is not None and t.numel() != torch.Size(shape).numel()


def check_countable(params: Iterable[torch.Tensor]) -> None:
    """Refuse to count ``params`` (a model's) when FSDP1 holds them as this rank's flat shards: outside
    ``summon_full_params`` (``use_orig_params=True``) every parameter is a 1-D view of this rank's share, so a count
    is that share (measured: 6 of 88 trainable values on rank 0 of 2, 82 on rank 1); with ``use_orig_params=False``
    the parameters are the flat ones themselves, padded. Inside ``summon_full_params`` the views have their shapes
    again, and the count is the whole model's. FSDP2's ``DTensor`` counts its whole shape; a ZeRO-3 placeholder
    is counted by its ``ds_shape`` (:func:`rankwise.quant.parameter_count`)."""
    params = list(params)
    flat = any(type(p).__name__ == "FlatParameter" for p in params)
    views = [p for p in params if getattr(p, "_fsdp_flattened", False)]
    if flat or (views and all(p.dim() < 2 for p in views)):
        raise ValueError(
            "cannot count parameters: FullyShardedDataParallel (FSDP1) holds this rank's flat shard of them, so a count "
            "would be this rank's share only. Count before wrapping (attach's report has .trainable and .total), or "
            "inside `with FullyShardedDataParallel.summon_full_params(model):`, entered on every rank "
            "(use_orig_params=True)")


def named_parameters_of(modules: Mapping[str, torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """``("<module>.<parameter>", parameter)`` for every parameter of every module in ``{name: module}``."""
    for name, module in modules.items():
        for tensor_name, t in module.named_parameters():
            yield f"{name}.{tensor_name}", t


def check_not_zero3_partitioned(named: Iterable[tuple[str, torch.Tensor]], what: str, fix: str) -> None:
    """Refuse to ``what`` when one of the ``(name, tensor)`` pairs is a partitioned ZeRO-3 parameter: this rank holds
    an empty placeholder, not the tensor (measured with DeepSpeed 0.19.8 on two processes: ``export_peft`` wrote
    0-element tensors with no error, ``save`` raised an ``IndexError``, ``attach`` a bare unpacking error).
    A ``ValueError`` naming the tensor and ``fix``; nothing read or written."""
    for name, t in named:
        if zero3_partitioned(t):
            raise ValueError(f"cannot {what}: DeepSpeed ZeRO-3 has partitioned {name} (this rank holds {tuple(t.shape)} "
                             f"of {tuple(getattr(t, 'ds_shape', ()))}), so its value is not here. {fix}")


ZERO3_GATHER = ("Do it inside `with deepspeed.zero.GatheredParameters(list(model.parameters())):`, entered on every rank "
                "(docs/distributed.md)")
ZERO3_GATHER_WRITE = ("Do it inside `with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):`, "
                      "entered on every rank, so rank 0's change reaches every partition (docs/distributed.md)")
ZERO3_ATTACH = ("Attach to the model before DeepSpeed partitions it: build or load it outside `deepspeed.zero.Init`, then "
                "hand it to `deepspeed.initialize`; rankwise cannot build adapters on ZeRO-3's placeholders. (transformers' "
                "`from_pretrained` partitions at load once a ZeRO-3 config is active, e.g. TrainingArguments(deepspeed=...) "
                "made before the model; docs/distributed.md)")


def check_whole_modules(modules: dict[str, list[tuple[torch.Tensor, torch.Size]]], what: str) -> None:
    """Refuse to ``what`` (save, export) fully-trained modules (``modules_to_save``, written whole) whose parameters
    are not whole on this rank: ``{module name: [(parameter, its whole shape)]}`` (the shapes from the module before
    attach). FSDP2's ``DTensor`` shards, FSDP1's flat-shard views outside ``summon_full_params`` (flattened, with
    another shape than the whole one: 1-D, empty on a rank holding none of it; writing them produced a file of
    shards, silently, even where every adapted layer was whole). A ``ValueError`` naming the module and the fix."""
    for name, params in modules.items():
        whose = f"module {name!r} (modules_to_save: trained fully, saved whole)"
        if any(local(p) is not p for p, _ in params):
            raise ValueError(_fsdp2_refusal(what, whose))
        if any(getattr(p, "_fsdp_flattened", False) and p.shape != shape for p, shape in params):
            raise ValueError(_fsdp1_refusal(what, whose))
        check_not_zero3_partitioned(((f"a parameter of {whose}", p) for p, _ in params), what, ZERO3_GATHER)


def _fsdp1_refusal(what: str, whose: str) -> str:
    return (f"cannot {what}: outside summon_full_params, FullyShardedDataParallel (FSDP1) holds this rank's flat shard "
            f"of {whose}, not the tensor. Do it inside `with FullyShardedDataParallel.summon_full_params(model):` "
            "(entered on every rank; writeback=True, the default, keeps a merge)")


def _fsdp2_refusal(what: str, whose: str) -> str:
    return (f"cannot {what}: fully_shard (FSDP2) holds this rank's shard of {whose}. Gather the whole model first, on "
            "every rank: state = torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
            "StateDictOptions(full_state_dict=True, cpu_offload=True)); then, on rank 0, load state into an unsharded "
            f"copy of the model with the same adapter attached and {what} that copy (docs/distributed.md)")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: an FSDP2 parameter's (a sharded ``DTensor``) local shard, no communication;
    anything else as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def broadcast_from_rank0(value: int) -> int:
    """``value`` as rank 0 has it (unchanged without a process group): a seed drawn on every rank, made one."""
    dist = process_group()
    if dist is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device(dist))
    dist.broadcast(t, src=0)
    return int(t.item())


@torch.no_grad()
def share_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor, in place, with rank 0's (nothing without a process group): an unseeded init's
    draws made one on every rank, as DDP's broadcast at wrap makes them, which FSDP does not do (it keeps each
    rank's own shard of each rank's own tensor). A collective: every rank passes the same tensors in the same order."""
    dist = process_group()
    if dist is None:
        return
    device = comm_device(dist)
    for t in tensors:
        buf = t.detach().to(device)
        dist.broadcast(buf, src=0)
        if buf is not t:
            t.copy_(buf)


SEED_DRAW_BOUND = 2**31 - 1  # a drawn seed is in [0, this): layer_generator's ``seed · 1_000_003 + i`` stays in int64


def shared_seed(seed: int | None) -> int:
    """The seed a method's random init draws from: ``seed``, or for ``None`` one drawn from torch's global RNG
    and made rank 0's on every ``torch.distributed`` rank (:func:`broadcast_from_rank0`).

    Either way an ``int``, and the same one whether or not a process group runs: one process, or a group of
    any size whose rank 0 has the same global RNG state, builds the same adapter.
    """
    if seed is not None:
        return int(seed)
    return broadcast_from_rank0(int(torch.randint(0, SEED_DRAW_BOUND, (), dtype=torch.int64)))


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor's whole value: an FSDP2 parameter (a sharded ``DTensor``) gathered from every rank (a
    collective: every rank must call it), anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` (the whole tensor, identical on every rank) into ``param`` in place; an FSDP2
    parameter keeps only its own shard of it (cut locally, no communication)."""
    if hasattr(param, "device_mesh") and hasattr(param, "placements"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def check_unflattened(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Refuse a parameter FSDP1 has flattened to this rank's shard (outside its forward), with the fix."""
    if tuple(t.shape) != shape:
        raise RuntimeError(f"{name} has shape {tuple(t.shape)}, not {shape}: under FSDP1 a parameter outside the "
                           "forward pass is this rank's flat shard. End RAC-LoRA links inside "
                           "FullyShardedDataParallel.summon_full_params(model, writeback=True) (call rankwise.step "
                           "there at link ends), or shard with FSDP2 (fully_shard), which works as it is")
