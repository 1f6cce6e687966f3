"""The thin contract every adapter layer follows.

An :class:`AdapterLayer` replaces a ``nn.Linear`` (or transformers' GPT-2 ``Conv1D``, an ``nn.Embedding``, an
``nn.Conv1d/2d/3d``, or a bitsandbytes 4-bit / 8-bit layer) in place. It *keeps the base layer's names*: the frozen base tensors stay reachable
as ``layer.weight`` and ``layer.bias`` (the very same ``Parameter`` objects), so the model's ``state_dict``
keys for the base weights do not change. What differs between kinds of base module (the weight's layout,
dequantisation, the base forward, whether a merge can be written) is its :attr:`kind`, a
:class:`rankwise.base_layers.BaseKind` chosen by :func:`rankwise.base_layers.base_kind`; the layer reads
``W0`` only as ``out x in`` through it. A method adds its own tensors next to them and implements

* :meth:`adapter_forward` — the plain forward pass while unmerged;
* :meth:`merged_weight` — the ``out x in`` weight the layer is equivalent to (fp32);
* optionally :meth:`fused_inputs` — its factors for the one-node training step (:mod:`rankwise.fused`), which
  :meth:`own_forward`, the one place the path is chosen, then uses whenever it applies.

Merging is explicit and idempotent, guarded by ``self.merged``: :meth:`merge` writes
``merged_weight()`` into ``weight`` once (rounding once into the base dtype) and keeps the original
bits, which :meth:`unmerge` restores exactly. ``train()``/``eval()`` never merge.

Several adapters on one module (``attach(..., name=...)``): the layer in the model's slot is the
*host*; other adapters' layers for the same module are its ``peers`` (built over the same base module,
so they share ``weight``/``bias``). The host applies the *active* layers one after the other, in the
order :func:`rankwise.set_active` got them, as HF PEFT applies its active adapters (``h_0 = x W0ᵀ + b``)::

    h_i = h_{i−1} + (f_i(x) − x W0ᵀ − b)                    an additive layer (LoRA's form)
    h_i = h_{i−1} + (μ_i − 1) ⊙ (h_{i−1} − b) + μ_i ⊙ s_i·x ΔW_iᵀ     a DoRA-family layer, μ_i = m_i / ‖W0 + ΔW_i‖_row

(``f_i``: layer i's own forward; the DoRA step is ``f_i(x) + μ_i ⊙ (h_{i−1} − x W0ᵀ − b)``, computed as PEFT does
from ``h_{i−1}`` alone, its ``base_result = result``: one base matmul per module however many layers are active;
a DoRA layer's magnitude rescales the updates of the layers before it. In a training forward with dropout PEFT's
DoRA takes its base path from the dropped-out input instead, ``(μ_i − 1) ⊙ x_d W0ᵀ``, and so does this one: it adds
its own update). A merge writes the same
composition of weights, ``W_i = W_{i−1} + ΔW_i`` or ``W_i = μ_i ⊙ (W_{i−1} + ΔW_i^lora)`` (PEFT's merge). So
additive layers commute, and a DoRA layer's place matters. With one active layer the host runs that layer's
own forward and merge, unchanged. :meth:`disable` switches the whole stack off: the base module's own
forward, bit for bit (a merged host puts the kept original bits in for the while, see there).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar, cast

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .base_layers import BaseKind, base_kind
from .config import AdapterConfig
from .fused import FusedInputs, fused_blocker, fusion_on, low_rank_linear
from .slots import state_dict_hooks

LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def outside_inference_mode() -> Iterator[None]:
    """A block outside ``torch.inference_mode``, with gradients off as that mode had them; a plain block outside it.
    For the calls that build and keep tensors on a model (``attach``, ``load``, ``import_peft``): inside inference
    mode torch makes *inference tensors*, which autograd cannot save for backward and which refuse in-place updates
    outside the mode, so factors built there could not train afterwards, nor an optimizer step update them (review
    round 47). A context manager, not a decorator: it adds no frame between the caller and the warnings these calls
    aim at the caller's line (``stacklevel``)."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def kept_tensor(t: Tensor) -> Tensor:
    """``t``, or where it is an inference tensor (made inside ``torch.inference_mode``) a normal copy of it: for a
    tensor a layer keeps past the call that made it (a merge's kept original bits, which a later ``disabled()`` block
    updates in place; a tied layer's own merged weight, which a full fine-tune after ``detach(merge=True)`` trains;
    RAC-LoRA's chain record grown at a link end or by ``compress_chain``), all outside inference mode (review rounds
    47, 49)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merged weights and DoRA-family norms are computed in: fp64 for fp64, else fp32 (fp16/bf16 upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
MERGED_TRAINING = (
    "rankwise: a training forward (train mode, gradients on) through merged adapter layers: a merged adapter "
    "does not train (its tensors get no gradient) while fully-trained modules still would. Call "
    "rankwise.unmerge(model) before training; for inference use model.eval() or torch.no_grad()"
)


@torch.compiler.disable(reason=MERGED_TRAINING)
def _warn_merged_training(layer: AdapterLayer) -> None:
    """Say once per merge that ``layer``'s training forward is merged (``MERGED_TRAINING``). Kept out of
    ``torch.compile``'s graph with the warning as the reason: dynamo cannot trace ``warnings.warn``, so a compile
    breaks the graph here and warns eagerly, and ``fullgraph=True`` fails with these words and their remedy
    instead of naming only ``_warnings.warn``."""
    layer._warned_merged = True
    warnings.warn(MERGED_TRAINING, stacklevel=5)  # the caller of the model's forward, as before this helper


RECOMPUTED_AFTER_PER_EXAMPLE = (
    "rankwise.per_example: the forward of {where} is being recomputed inside a backward (gradient checkpointing) after "
    "the `with rankwise.per_example(model, names):` block that ran it ended; recomputed now it would run the active "
    "adapters for every row, and the gradients would silently not be each row's. Call loss.backward() inside the block"
)


@torch.compiler.disable(reason=RECOMPUTED_AFTER_PER_EXAMPLE)
def _leave_per_example(layer: AdapterLayer, where: str) -> None:
    """The first unrouted forward of ``layer`` (named ``where``) since a ``rankwise.per_example`` block routed it:
    refused inside a backward (:func:`_refuse_in_a_backward`: a checkpointed forward recomputed after the block, which
    torch's reentrant checkpoint would give other gradients without a word, its non-reentrant one a shape mismatch),
    else the mark is cleared. A backward after the block with no recomputation is right as it is (the graph holds the
    routed forward)."""
    _refuse_in_a_backward(RECOMPUTED_AFTER_PER_EXAMPLE, where)
    layer._routed_mark = None


RECOMPUTED_INSIDE_PER_EXAMPLE = (
    "rankwise.per_example: the forward of {where} is being recomputed inside a backward (gradient checkpointing) "
    "inside a `with rankwise.per_example(model, names):` block, but the forward that ran it was not this block's (it "
    "ran before the block, with the active adapters for every row); recomputed now it would run each example's "
    "adapters, and the gradients would silently not be the forward's. Call loss.backward() outside the block, or run "
    "the forward inside it"
)


RECOMPUTED_AT_ANOTHER_STRENGTH = (
    "rankwise.scaled: the forward of adapter layer {where!r} is being recomputed inside a backward (gradient "
    "checkpointing) at another strength than it ran at: the forward ran inside a `with rankwise.scaled(model, "
    "factor):` block that has ended since, or outside the block now open; recomputed now its update would have "
    "another strength than in the forward, and the gradients would silently not be the forward's. Call loss.backward() where the forward "
    "ran: inside the same block, or outside any"
)


RECOMPUTED_ACROSS_DISABLED = (
    "rankwise.disabled: the forward of adapter layer {where} is being recomputed inside a backward (gradient "
    "checkpointing) with the adapters {now}, but its forward ran with them {then}: the forward ran inside a `with "
    "rankwise.disabled(model):` block that has ended since, or outside the block now open; recomputed now it would "
    "compute another function, and the gradients would silently not be the forward's (torch's reentrant checkpoint "
    "leaves the adapters' gradients None). Call loss.backward() where the forward ran: inside the same block, or "
    "outside any. A forward that needs no gradient (a reference model's) can run under torch.no_grad() anywhere"
)


# torch's reentrant checkpoint runs the forward it will recompute under no_grad, inside this function's frame
_REENTRANT_CHECKPOINT = torch.utils.checkpoint.CheckpointFunction.forward.__code__
# the class of the context (graph node) torch gives an autograd.Function's forward: `<Function's name>Backward`
_CHECKPOINT_CONTEXT = torch.utils.checkpoint.CheckpointFunction._backward_cls.__name__  # "CheckpointFunctionBackward"


def _records_a_graph() -> bool:
    """Whether the forward running now is one a backward may use, or recompute: grad mode on, or inside a reentrant
    checkpoint (which runs it under no_grad and recomputes it in the backward). Run only where a forward's state
    differs from its layer's mark: the first forward after a ``disabled()`` / ``scaled()`` block began or ended, and
    ``no_grad`` forwards inside such a block (a reference model's, an evaluation).

    Under ``no_grad`` it walks up the stack for a checkpoint's forward (:func:`_is_checkpoint_forward`; 2–7 µs a call
    at a stack 20–120 frames deep, measured on a 2-core CPU), but only where forward-mode AD is off: torch runs every
    ``autograd.Function``'s ``forward``, the reentrant checkpoint's included, with it off, and a plain
    ``torch.no_grad()`` leaves it on, so a ``no_grad`` forward with it on is in no checkpoint's forward and needs no
    walk (review round 60)."""
    if torch.is_grad_enabled():
        return True
    if torch._C._is_fwd_grad_enabled():  # on: not inside any autograd.Function's forward (off: inference_mode too)
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if _is_checkpoint_forward(frame):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _is_checkpoint_forward(frame: FrameType) -> bool:
    """Whether ``frame`` runs the ``forward`` of a reentrant checkpoint that its backward will recompute: torch's
    ``CheckpointFunction``, or another ``autograd.Function`` of that name (DeepSpeed's and Megatron's activation
    checkpointing have the same shape: the forward under ``no_grad``, recomputed in the backward; review round 62),
    known by its context's class, which torch names after the Function. Other frames' locals are never read (a
    module's ``forward`` takes ``self``). A checkpoint called where it records nothing (under ``no_grad`` or
    ``inference_mode``, or with no input that requires grad: a model in training mode run for a reference or an
    evaluation) is never recomputed (:func:`_is_recorded`; review round 63)."""
    code = frame.f_code
    if code is not _REENTRANT_CHECKPOINT and not (
            code.co_name == "forward" and code.co_argcount > 0 and code.co_varnames[0] == "ctx"):
        return False
    ctx = frame.f_locals.get("ctx")
    if code is not _REENTRANT_CHECKPOINT and type(ctx).__name__ != _CHECKPOINT_CONTEXT:
        return False
    return _is_recorded(ctx)


def _is_recorded(ctx: object) -> bool:
    """Whether the ``autograd.Function`` call whose context (graph node) is ``ctx`` is in a graph, so its backward
    may run: torch gives the node its edges to the inputs before it calls ``forward``, and none where the call
    records nothing (grad mode off, or no input requiring grad). A context without edges to read (not torch's
    node) counts as recorded, as before."""
    edges = getattr(ctx, "next_functions", None)
    if edges is None:
        return True
    return any(node is not None for node, _ in edges)


def _refuse_in_a_backward(message: str, where: str) -> None:
    """A ``RuntimeError`` with ``message`` (naming layer ``where``) where this forward runs inside a backward, i.e. is
    a gradient checkpoint's recomputation: the one test behind both of ``per_example``'s checkpoint guards (a forward
    routed by a block recomputed after it, :data:`RECOMPUTED_AFTER_PER_EXAMPLE`; a forward from outside a block
    recomputed inside it, :data:`RECOMPUTED_INSIDE_PER_EXAMPLE`)."""
    if torch._C._current_graph_task_id() != -1:  # -1: no backward is running on this thread
        raise RuntimeError(message.format(where=where))


# the layers a live rankwise.disabled() block switched off (AdapterLayer.disable / enable): a layer disabled but not
# here is a copy (copy.deepcopy, torch.save / torch.load) of one taken inside a block, which no block will enable
_IN_A_BLOCK: weakref.WeakSet[AdapterLayer] = weakref.WeakSet()
COPIED_INSIDE_DISABLED = (
    "cannot {what}: this model was copied (copy.deepcopy, or torch.save and torch.load) inside `with "
    "rankwise.disabled(model):`, so it computes the base model and no block will end for it. Enable its adapters "
    "with rankwise.set_active(model, list(rankwise.active_adapters(model)))"
)
# the hosts a live rankwise.per_example() block splits the batch for (AdapterLayer.per_example): a table, not an
# attribute of the layer, so a copy taken inside a block (copy.deepcopy, torch.save / torch.load) computes as outside it
_PER_EXAMPLE: weakref.WeakKeyDictionary[AdapterLayer, tuple[Examples, str]] = weakref.WeakKeyDictionary()
COPIED_INSIDE_SCALED = (
    "cannot {what}: this model was copied (copy.deepcopy, or torch.save and torch.load) inside `with "
    "rankwise.scaled(model, factor):`, so its adapters keep the rescaled strength and no block will end for it; a save, "
    "export or merge of it would write that strength as the adapter's. Copy the model outside the block; for an "
    "adapter at another strength, rankwise.combine(model, {{name: factor}}, new_name) builds one"
)
# the layers a live rankwise.scaled() block (or several, nested) rescaled: how many blocks hold each (a copy of a layer
# taken inside one is not held: it keeps the rescaled values as its own, and its writes are refused, COPIED_INSIDE_SCALED)
_SCALED: weakref.WeakKeyDictionary[AdapterLayer, int] = weakref.WeakKeyDictionary()
UNMERGED_KEY = "unmerged_weight"  # a merged layer's original weight, in its state_dict (see _save_to_state_dict)
DEFAULT_ADAPTER = "default"  # the name of an adapter attached without one (HF PEFT's default too)


@dataclass
class PeftFactors:
    """A layer expressed in HF PEFT's LoRA form: ``W' = W0 + scale·B A`` (or DoRA's with ``magnitude``)."""

    lora_a: Tensor  # r x in
    lora_b: Tensor  # out x r
    scale: float
    magnitude: Tensor | None = None  # out, for DoRA-family layers


Group = tuple[tuple[str, ...], Tensor | slice]  # a set of adapters (names in order, () for none) and its rows


@dataclass
class Examples:
    """What a ``rankwise.per_example`` block tells each adapter layer: example ``i`` runs the adapters
    ``names[i]`` (in that order; ``()``: none, the base module), and covers ``repeats`` consecutive rows when the
    batch was expanded in place (``generate``'s ``repeat_interleave`` for beams). :meth:`split` answers per batch
    size and device, computed once a block."""

    names: tuple[tuple[str, ...], ...]
    repeats: int = 1
    _splits: dict[tuple[int, str], tuple[list[Group], Tensor | None]] = field(default_factory=dict)

    def per_row(self, rows: int, where: str) -> tuple[tuple[str, ...], ...]:
        """Each row's adapters for a batch of ``rows`` (the examples, or each repeated ``repeats`` times); a
        ``ValueError`` naming ``where`` (a layer) for any other size: never a guessed split."""
        if rows == len(self.names):
            return self.names
        if rows == len(self.names) * self.repeats:
            return tuple(key for key in self.names for _ in range(self.repeats))
        sizes = f"{len(self.names)}" + (f" or {len(self.names) * self.repeats} (repeats={self.repeats})"
                                        if self.repeats > 1 else "")
        raise ValueError(
            f"rankwise.per_example: {where} got an input whose first dimension is {rows}, but the block has "
            f"{len(self.names)} examples, so it expects {sizes} rows. Here the first dimension is not the batch (an "
            "expert layer of a mixture-of-experts model that flattens tokens, a sequence-first layout, an unbatched "
            "input), or the batch is not the one the names were given for (generate with num_beams or "
            "num_return_sequences: pass repeats=max(num_beams, num_return_sequences)); per-example adapters cannot "
            "split it")

    def adapters(self) -> tuple[str, ...]:
        """The adapters some example names, each once, in first-seen order: what a training step in the block trained
        (:func:`rankwise.state.trained_adapters`)."""
        return tuple(dict.fromkeys(name for names in self.names for name in names))

    def split(self, rows: int, device: torch.device, where: str) -> tuple[list[Group], Tensor | None]:
        """``(groups, inverse)`` for a batch of ``rows`` on ``device``: the rows of each distinct set of adapters (in
        first-seen order) and the permutation that puts ``cat(group outputs)`` back in batch order
        (``cat(...)[inverse]`` has row ``i`` at place ``i``). Where every group is one run of rows (a batch sorted by
        adapter) its rows are a ``slice`` (a view, no copy) and ``inverse`` is ``None`` (``cat`` is in batch order).
        Normal tensors, not inference tensors: a block entered or first run inside ``torch.inference_mode`` still
        serves a forward with gradients after it."""
        if torch.compiler.is_compiling():  # made in the graph at each call, in that call's mode: never cached
            return _new_split(self.per_row(rows, where), device)
        key = (rows, str(device))
        if key not in self._splits:
            self._splits[key] = _new_split(self.per_row(rows, where), device)
        return self._splits[key]

    @staticmethod
    def gather(outs: list[Tensor], inverse: Tensor | None, where: str) -> Tensor:
        """The groups' outputs (:meth:`split`'s order) as one batch in batch order: ``cat(outs)[inverse]``, or
        ``cat(outs)`` where the groups are runs. A ``TypeError`` naming ``where`` when they differ in dtype, which
        ``cat`` would promote silently (no row would then be what it is alone)."""
        if len({out.dtype for out in outs}) > 1:
            raise TypeError(f"rankwise.per_example: {where}'s groups of examples return different dtypes "
                            f"{sorted(str(out.dtype) for out in outs)}; give the model one dtype (model.to(dtype))")
        return torch.cat(outs) if inverse is None else torch.cat(outs)[inverse]


def _new_split(per_row: tuple[tuple[str, ...], ...], device: torch.device) -> tuple[list[Group], Tensor | None]:
    """:meth:`Examples.split` for rows with adapters ``per_row``, on ``device``. Traced by ``torch.compile`` (its
    graph then makes the indices at each call, in that call's mode, and nothing is cached: ``fullgraph=True`` works),
    which cannot trace ``torch.is_inference_mode_enabled``: eager runs make them outside inference mode, to cache."""
    rows_of: dict[tuple[str, ...], list[int]] = {}
    for i, names in enumerate(per_row):
        rows_of.setdefault(names, []).append(i)
    if all(idx[-1] - idx[0] == len(idx) - 1 for idx in rows_of.values()):  # runs, in batch order
        return [(names, slice(idx[0], idx[-1] + 1)) for names, idx in rows_of.items()], None
    with contextlib.nullcontext() if torch.compiler.is_compiling() else outside_inference_mode():
        groups: list[Group] = [(names, torch.tensor(idx, dtype=torch.long, device=device))
                               for names, idx in rows_of.items()]
        inverse = torch.argsort(torch.cat([cast(Tensor, idx) for _, idx in groups]))
    return groups, inverse


def layer_generator(seed: int | None, index: int) -> torch.Generator | None:
    """A CPU generator for layer ``index`` of a seeded config (``None``: use torch's global RNG).

    Random draws happen on the CPU and are then moved, so a seed gives the same adapter on every
    device and on every rank of a distributed job.
    """
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + index)


class AdapterLayer(nn.Module):
    """Base class: owns the base layer's ``weight``/``bias``, the rank and the scale; merges and unmerges.

    Subclasses set ``trainable`` (names of their trainable tensors: a class default a layer may narrow
    in its constructor when its config decides, as RAC-LoRA's does) and ``lr_multiplied`` (the tensors
    LoRA+ gives the larger learning rate), and implement :meth:`adapter_forward` and
    :meth:`merged_weight`.

    **Constructor contract.** A method's layer is built as ``Layer(base, config, rank, *, index, init)``:
    ``base`` the module it replaces (any kind :mod:`rankwise.base_layers` handles), ``config`` the method's
    config, ``rank`` this layer's rank (a method such as GoRA gives each layer its own), ``index`` the layer's
    position among the targets (seeds its random init through :func:`layer_generator`), and ``init=False`` for an
    *uninitialised* layer of the right shapes, which ``load``/``import_peft`` then fill from a file.
    :func:`rankwise.registry.simple_build` (and so every method's ``rebuild``) relies on exactly this
    signature; a layer whose init needs more (data, the whole model) does that work in its method's
    ``build`` instead.
    """

    trainable: tuple[str, ...] = ()
    lr_multiplied: ClassVar[tuple[str, ...]] = ()
    token_rows: ClassVar[bool] = False  # rows trained densely (rankwise.tokens.TokenRows), not a method's low-rank layer
    follows_layer: ClassVar[bool] = False  # a head computing with a tied embedding's layer (rankwise.ties.TiedHead)
    # set while a rankwise.per_example() block routes this layer (its split: per_example): a plain attribute the
    # forward reads first, so torch.compile guards on it and retraces on entering and leaving a block
    _routed: bool = False
    # the route (the block's examples, the layer's name) of the block whose forward last routed this layer, until the
    # layer's next unrouted forward (_leave_per_example); else None
    _routed_mark: tuple[Examples, str] | None = None
    # the live rankwise.scaled() blocks holding this layer, outermost first (hold_scaled); and the blocks its last
    # forward ran in (a checkpoint's recomputation at another strength is refused)
    _scaled_blocks: tuple[object, ...] = ()
    # the layer's path in its model, as the last disabled() or scaled() block that held it named it (for its errors)
    _where: str = ""
    # (disabled, the scaled() blocks) as this layer's last forward that recorded a graph ran: a gradient checkpoint's
    # recomputation must find them unchanged (_check_recomputation)
    _forward_mark: tuple[bool, tuple[object, ...]] = (False, ())
    weight: Tensor  # the base's own tensors, shared (nn.Module's __getattr__ would type them Tensor | Module)
    bias: Tensor | None

    def __init__(self, base: nn.Module, config: AdapterConfig, rank: int) -> None:
        super().__init__()
        weight: Tensor = base.weight  # type: ignore[assignment]  # nn.Module attribute: a Tensor here
        # what the base module is (rankwise.base_layers): how W0 is read, run and merged; raises for what cannot be adapted
        self.kind: BaseKind = base_kind(base)
        in_features, out_features = self.kind.features()
        if rank > min(in_features, out_features):
            raise ValueError(
                f"rank {rank} is larger than this layer's dimensions (out={out_features}, in={in_features}); "
                f"use r <= {min(in_features, out_features)}"
            )
        self.in_features: int = int(in_features)
        self.out_features: int = int(out_features)
        self.rank: int = int(rank)
        self.scale: float = config.scale(rank)
        # the base tensors, shared (not copied) and frozen
        self.weight = weight
        self.register_parameter("bias", getattr(base, "bias", None))  # an nn.Embedding has none
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # on the input of the low-rank path; never on an embedding's ids (HF PEFT's embedding layer applies none)
        takes_dropout = config.dropout > 0 and not self.kind.index_input
        self.dropout: nn.Module = nn.Dropout(config.dropout) if takes_dropout else nn.Identity()
        # adapters are created in fp32 over a bf16/fp16 base (the usual mixed-precision setup) and over a
        # quantised base (whose weight dtype is its storage format); afterwards they run in whatever dtype
        # their tensors have (see adapter_dtype)
        self._init_dtype: torch.dtype = torch.float32 if self.quantized or weight.dtype in LOW_PRECISION else weight.dtype
        self.merged: bool = False
        # the base weight is shared with another module (e.g. lm_head tied to the input embedding): merging
        # then gives this layer its own weight instead of writing into the shared one (set at install)
        self.tied: bool = False
        self._warned_merged: bool = False  # a training forward while merged has been named (MERGED_TRAINING)
        self._original_weight: Tensor | None = None
        self.adapter_name: str = DEFAULT_ADAPTER  # which named adapter this layer belongs to
        self.active: bool = True  # whether this layer's update is computed (rankwise.set_active)
        self.order: int = 0  # its place among the active layers of its module (rankwise.set_active's order)
        self.is_peer: bool = False  # a peer lives in its host's ``peers``, not in the model's slot
        self.disabled: bool = False  # inside rankwise.disabled(): the base module's own forward (hosts only)
        # why the model is half enabled (a rankwise.disabled() exit failed): the forward refuses until set_active
        self.half_enabled: str | None = None
        self._merged_aside: Tensor | None = None  # a disabled merged host's merged bits, put back by enable()
        self._merge_pending: bool = False  # a load_state_dict of a merged layer merges after its peers loaded
        self.register_load_state_dict_post_hook(_merge_after_load)
        # what the layer held when it was put on the model (mark_own): anything else a user registered on it since
        self.own_buffers: frozenset[str] = frozenset()
        self.own_parameters: frozenset[str] | None = None  # None: not on a model yet (nothing is a user's)
        self.own_state_dict_hooks: frozenset[int] = frozenset()

    # ------------------------------------------------------------------ helpers
    @property
    def per_example(self) -> tuple[Examples, str] | None:
        """Inside a ``rankwise.per_example`` block (hosts only): each example's adapters, and this layer's name for
        errors; ``None`` outside one (and on a copy of a layer taken inside one)."""
        return _PER_EXAMPLE.get(self)

    @per_example.setter
    def per_example(self, value: tuple[Examples, str] | None) -> None:
        if value is None:
            _PER_EXAMPLE.pop(self, None)
        else:
            _PER_EXAMPLE[self] = value
        self._routed = value is not None

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the adapter computes in: its own tensors' (read at each use, not cached).

        fp32 over a bf16/fp16 base at attach; after ``model.to(torch.bfloat16)`` (or ``.double()``)
        the adapter tensors were converted with the base, and the forward pass follows them.
        """
        if not self.trainable:
            return self._init_dtype
        return getattr(self, self.trainable[0]).dtype

    @property
    def quantized(self) -> str | None:
        """``"4bit"`` / ``"8bit"`` over a bitsandbytes base (:mod:`rankwise.quant`), ``None`` over a float one."""
        return self.kind.quantized

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base stores its weight ``in x out`` (GPT-2 ``Conv1D``; PEFT's ``fan_in_fan_out``)."""
        return self.kind.fan_in_fan_out

    def __getattr__(self, name: str) -> Any:
        """A setting of the base module (a plain, public value in its ``__dict__``: a convolution's ``stride``,
        ``padding``, ``kernel_size``, an embedding's ``padding_idx``, ...) when the layer has no attribute of that name.

        Models read such settings from the module in their slot: Whisper's encoder computes its expected input length
        from ``self.conv1.stride[0] * self.conv2.stride[0]``, which raised ``AttributeError`` with the convolutions
        adapted. Only the base's plain values are read: its tensors are this layer's ``weight`` / ``bias``, and its
        submodules, hooks and private attributes stay its own."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            kind = self.__dict__.get("kind")
            settings = {} if kind is None or name.startswith("_") else vars(kind.module)
            if name not in settings or isinstance(settings[name], (Tensor, nn.Module)):
                raise
            return settings[name]

    def base_layer(self) -> nn.Module:
        """The base module this layer adapts (not a submodule: its tensors are this layer's ``weight``/``bias``)."""
        return self.kind.module

    def base_weight(self) -> Tensor:
        """The frozen base weight as ``out x in`` (a view; transposed for ``Conv1D``; for a quantised
        base a new fp32 tensor, dequantised on each call)."""
        return self.kind.dense(self.weight)

    def unmerged_base_weight(self) -> Tensor:
        """``W0`` in ``out x in`` even while merged (the kept original bits; dequantised for a quantised base)."""
        w = self._original_weight if self.merged else self.weight
        assert w is not None
        return self.kind.dense(w)

    def base_forward(self, x: Tensor) -> Tensor:
        """``x W0ᵀ + b``; a quantised base runs its own (bitsandbytes) forward."""
        return self.kind.forward(x, self.weight, self.bias, self.training)

    def base_forward_no_bias(self, x: Tensor) -> Tensor:
        """``x W0ᵀ`` (a quantised base: its own forward, less the bias, as HF PEFT's QDoRA computes it)."""
        return self.kind.forward_no_bias(x, self.weight, self.bias, self.training)

    def probe_forward(self, x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(x W0ᵀ, rows W0ᵀ)`` from one base call: ``rows`` (``k x in``) ride along as extra inputs, so over a
        base that dequantises inside its forward (:meth:`rankwise.base_layers.BaseKind.cheap_probe`) one
        dequantisation serves both. Returns ``(..., out)`` and ``k x out``."""
        flat = x.reshape(-1, x.shape[-1])  # tokens x in
        both = self.base_forward_no_bias(torch.cat([flat, rows.to(flat.dtype)]))  # (tokens + k) x out
        return both[: flat.shape[0]].reshape(*x.shape[:-1], both.shape[-1]), both[flat.shape[0]:]

    def new_tensor(self, *shape: int, zeros: bool = True) -> Tensor:
        """An adapter tensor on the base weight's device, in the adapter dtype."""
        make = torch.zeros if zeros else torch.empty
        return make(*shape, dtype=self._init_dtype, device=self.weight.device)

    # ------------------------------------------------------------------ the contract
    def adapter_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The method's plain (reference) forward while unmerged: any mode, dropout, base kind."""
        raise NotImplementedError

    def fused_inputs(self) -> FusedInputs:  # pragma: no cover - optional
        """The factors of the one-node training step (:class:`rankwise.fused.LowRankLinear`), for a method
        whose unmerged forward is ``x W0ᵀ + b + (x Aᵀ) Bᵀ`` or DoRA's ``b + μ ⊙ (x W0ᵀ + (x Aᵀ) Bᵀ)`` without
        dropout. A method that does not override it always runs :meth:`adapter_forward`."""
        raise NotImplementedError

    @classmethod
    def has_fused_form(cls) -> bool:
        """Whether this method supplies :meth:`fused_inputs` (the fused tests list every registered method that does)."""
        return cls.fused_inputs is not AdapterLayer.fused_inputs

    def fused_path(self) -> str:
        """Which path a training forward (autograd on, no autocast) takes now: ``"fused"`` or
        ``"reference: <why>"`` (:func:`rankwise.fused.fused_blocker`); shown in the repr and the attach report."""
        why = fused_blocker(self)
        return "fused" if why is None else f"reference: {why}"

    def own_forward(self, x: Tensor) -> Tensor:
        """This layer's unmerged forward: the fused node when it applies, else :meth:`adapter_forward`.

        The one place the fused path is chosen: static conditions (:func:`rankwise.fused.fused_blocker`),
        run-time ones (:func:`rankwise.fused.fusion_on`), then some input of the node must need a gradient.
        """
        if fusion_on(self, x):
            inputs = self.fused_inputs()
            if inputs.need_grad(x):
                return low_rank_linear(x, self.base_weight(), self.bias, inputs.a, inputs.b, inputs.mu)  # (..., out)
        return self.adapter_forward(x)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Deprecated (a method's plain forward is now :meth:`adapter_forward`): runs :meth:`adapter_forward`."""
        warnings.warn("AdapterLayer.reference_forward is deprecated: call adapter_forward (the plain forward)",
                      DeprecationWarning, stacklevel=2)
        return self.adapter_forward(x)

    def fused_forward(self, x: Tensor) -> Tensor:
        """Deprecated (the path is chosen in :meth:`own_forward`): the fused node on :meth:`fused_inputs`, unconditionally."""
        warnings.warn("AdapterLayer.fused_forward is deprecated: call the layer (own_forward chooses the path)",
                      DeprecationWarning, stacklevel=2)
        inputs = self.fused_inputs()
        return low_rank_linear(x, self.base_weight(), self.bias, inputs.a, inputs.b, inputs.mu)

    @property
    def merge_dtype(self) -> torch.dtype:
        """What merged weights are computed in: fp64 when the base weight or the adapter is fp64 (an fp64 model
        merges without rounding ``W0`` to fp32), else fp32."""
        return torch.float64 if torch.float64 in (self.weight.dtype, self.adapter_dtype) else torch.float32

    def wide(self, t: Tensor) -> Tensor:
        """``t`` in :attr:`merge_dtype` (a merged-weight term)."""
        return t.to(self.merge_dtype)

    def merged_weight(self) -> Tensor:  # pragma: no cover - abstract
        """The equivalent dense weight, ``out x in``, in :attr:`merge_dtype` (computed from the unmerged ``W0``)."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """``merged_weight() - W0`` in :attr:`merge_dtype`, ``out x in``."""
        return self.merged_weight() - self.wide(self.unmerged_base_weight())

    def peft_factors(self) -> PeftFactors:
        """This layer as PEFT LoRA/DoRA factors (for :func:`rankwise.export_peft`)."""
        raise NotImplementedError(f"{type(self).__name__} has no PEFT LoRA form")

    def delta_forward(self, x: Tensor) -> Tensor:
        """This layer's update to the output, ``f(x) − (x W0ᵀ + b)`` (what it adds beside other adapters)."""
        return self.own_forward(x) - self.base_forward(x)

    def plain_forward(self, x: Tensor) -> Tensor:
        """The base module exactly as before ``attach``: its own forward (a quantised base: bitsandbytes')."""
        return self.kind.plain_forward(x, self.training)

    def forward(self, x: Tensor) -> Tensor:
        """The module's output: its own forward when disabled or with no active adapter, else the merged weight's or
        the active layers' result, computed as ``(..., out)`` and put in the module's layout once, here
        (:meth:`rankwise.base_layers.BaseKind.to_output`: a convolution's channels back to dimension 1). Refused while
        the model is half enabled (:meth:`refuse_if_half_enabled`): its outputs would be neither the adapted model's
        nor the base's."""
        if self.half_enabled is not None:
            self.refuse_if_half_enabled("run the forward")
        if "parametrizations" in self._modules:  # registered after attach (a parametrized module is refused there)
            self.check_base_stored()
            self.check_fixed_stored()
        if not torch.compiler.is_compiling():  # (a compiled forward is not recomputed by a checkpoint here)
            state = (self.disabled, self._scaled_blocks)
            if state != self._forward_mark:  # the first forward since a disabled() or scaled() block began or ended
                self._check_recomputation(state)
        if self.disabled:
            return self.plain_forward(x)
        route = self.per_example if self._routed else None  # a copy taken inside a block: flag set, no route
        if route is not None:
            mark = self._routed_mark
            if mark is None or mark[0] is not route[0]:  # this layer's first forward in this block
                if not torch.compiler.is_compiling():  # (a compiled forward is not recomputed by a checkpoint here)
                    _refuse_in_a_backward(RECOMPUTED_INSIDE_PER_EXAMPLE, route[1])
                self._routed_mark = route
            return self.per_example_forward(x, *route)
        if self._routed_mark is not None:
            _leave_per_example(self, self._routed_mark[1])
        chosen = self.computing()
        if not chosen and not self.merged:
            return self.plain_forward(x)
        return self.kind.to_output(self._adapted_forward(x, chosen))

    def _check_recomputation(self, mark: tuple[bool, tuple[object, ...]]) -> None:
        """A forward whose ``mark`` (disabled or not, the live ``rankwise.scaled`` blocks) differs from the last
        graph-recording forward's: inside a backward it is a gradient checkpoint's recomputation of that forward under
        other adapters, refused (:data:`RECOMPUTED_ACROSS_DISABLED`, :data:`RECOMPUTED_AT_ANOTHER_STRENGTH`: torch's
        reentrant checkpoint would give other gradients without a word, its non-reentrant one a shape mismatch);
        otherwise, if it records a graph (:func:`_records_a_graph`), it becomes the mark. A forward under
        ``torch.no_grad()`` outside a checkpoint (a reference model's inside ``disabled()``, an evaluation) is never
        recomputed, so it changes nothing."""
        if torch._C._current_graph_task_id() != -1:  # -1: no backward is running on this thread
            then, now = self._forward_mark[0], mark[0]
            if then != now:
                state = {True: "disabled", False: "on"}
                where = repr(self._where) if self._where else f"{type(self).__name__} (adapter {self.adapter_name!r})"
                raise RuntimeError(RECOMPUTED_ACROSS_DISABLED.format(where=where, now=state[now], then=state[then]))
            raise RuntimeError(RECOMPUTED_AT_ANOTHER_STRENGTH.format(where=self._where))
        if _records_a_graph():
            self._forward_mark = mark

    def _adapted_forward(self, x: Tensor, chosen: list["AdapterLayer"]) -> Tensor:
        """``(..., out)``: the merged weight's base forward, the one active layer's own forward, or the active
        layers' composition (:meth:`stacked_forward`)."""
        if self.merged:
            if not self._warned_merged and self.training and torch.is_grad_enabled() and self.requires_grad():
                _warn_merged_training(self)
            return self.base_forward(x)
        if len(chosen) == 1:  # one active adapter here: its own forward, exactly as if it were alone
            return chosen[0].own_forward(x)
        out = self.base_forward(x)  # the same result whichever layer hosts: delete() keeps the others' bits
        for layer in chosen:
            out = layer.stacked_forward(x, out)
        return out

    def per_example_forward(self, x: Tensor, examples: Examples, where: str) -> Tensor:
        """Inside ``rankwise.per_example``: row ``i`` of the output is this module's output for row ``i`` alone with
        the example's adapters active (:meth:`forward_as`). Each distinct set of adapters runs once, on its rows
        (indexed along dimension 0), and the outputs go back in batch order with one gather; one set: the
        whole batch, unsplit; runs of rows (a batch sorted by adapter): views and no gather. ``where``: this layer's
        name, for the error on a first dimension that is not the batch."""
        groups, inverse = examples.split(int(x.shape[0]), x.device, where)
        if len(groups) == 1:
            return self.forward_as(x, groups[0][0])
        outs = [self.forward_as(x[rows], names) for names, rows in groups]  # a view or a copy (index_select: slower)
        return Examples.gather(outs, inverse, where)

    def forward_as(self, x: Tensor, names: tuple[str, ...]) -> Tensor:
        """The module's output with adapters ``names`` active in that order (``()``: none), as after
        ``set_active(model, list(names))`` (or inside ``disabled()`` for none): the base module's own forward where
        none of them adapts this module, the one layer's own forward, or their composition."""
        chosen = [layer for name in names for layer in self.stack() if layer.adapter_name == name]
        if not chosen:
            return self.plain_forward(x)
        if self.merged:  # refused at the block's entry and merge inside it; kept for a state_dict load's merge
            raise RuntimeError("rankwise.per_example runs unmerged adapters and this layer is merged: leave the block "
                               "and call rankwise.unmerge(model) first")
        return self.kind.to_output(self._adapted_forward(x, chosen))

    def row_scale(self) -> Tensor | None:
        """``μ`` (``out``), how this layer rescales the output of the active layers before it on its module
        (see the module docstring); ``None`` for an additive update. DoRA-family layers: ``m / ‖W0 + ΔW‖_row``,
        and they supply :meth:`lora_out`."""
        return None

    def lora_out(self, x: Tensor) -> Tensor:  # pragma: no cover - supplied by the methods that use it
        """``s · x ΔWᵀ`` (``(..., out)``, the adapter dtype) for an input already dropped out: the low-rank update
        alone, which a DoRA-family layer's :meth:`row_scale` multiplies (:meth:`stacked_forward`)."""
        raise NotImplementedError(f"{type(self).__name__} has no low-rank update of its own")

    def stacked_forward(self, x: Tensor, before: Tensor) -> Tensor:
        """This layer's output after the active layers before it, which computed ``before`` (``(..., out)``):
        ``before + f(x) − base(x)``, or with a row scale ``μ`` HF PEFT's DoRA step (``base_result = result``)::

            before + (μ − 1) ⊙ (before − b) + μ ⊙ s·x ΔWᵀ   (= f(x) + μ ⊙ (before − x W0ᵀ − b), from before alone)

        so a DoRA-family layer runs no base matmul of its own; in a training forward with dropout PEFT's DoRA takes its
        base path from the dropped-out input instead, ``before + (μ − 1) ⊙ x_d W0ᵀ + μ ⊙ s·x_d ΔWᵀ`` (one matmul)."""
        mu = self.row_scale()
        if mu is None:
            return (before + self.delta_forward(x)).to(before.dtype)  # summed in the wider dtype, rounded once
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)
            base = self.base_forward_no_bias(x)  # (..., out): x_d W0ᵀ
        else:
            base = before if self.bias is None else before - self.bias  # (..., out): the layers before, less b
        dora = (mu - 1) * base.to(mu.dtype) + mu * self.lora_out(x)  # (..., out), adapter dtype
        return (before + dora).to(before.dtype)

    def stacked_weight(self, before: Tensor) -> Tensor:
        """The merged weight after the active layers before it, which hold ``before`` (``out x in``, a wide dtype):
        ``before + ΔW``, or with a row scale ``μ`` ``merged_weight() + μ ⊙ (before − W0)`` (:meth:`stacked_forward`'s
        weight: PEFT's merge of several DoRA adapters)."""
        mu = self.row_scale()
        if mu is None:
            return before + self.delta_weight().to(before.dtype)
        w0 = self.unmerged_base_weight().to(before.dtype)  # out x in
        return self.merged_weight().to(before.dtype) + mu.to(before.dtype).unsqueeze(1) * (before - w0)

    # ------------------------------------------------------------------ several adapters on one module
    def stack(self) -> list["AdapterLayer"]:
        """This host and its peers (every adapter's layer on this module), host first."""
        peers = self._modules.get("peers")
        if not isinstance(peers, nn.ModuleDict):
            return [self]
        return [self, *(cast(AdapterLayer, layer) for layer in peers.values())]

    def remove_peer(self, name: str) -> "AdapterLayer":
        """Take adapter ``name``'s layer out of this host's peers and return it; the last one out takes the
        (then empty) ``peers`` container with it, so the host's modules are again those of a layer that never had
        a peer (a failed attach beside an adapter, or ``rankwise.delete``, leaves no trace; review round 58)."""
        peers = self._modules["peers"]
        assert isinstance(peers, nn.ModuleDict)
        layer = cast(AdapterLayer, peers[name])
        del peers[name]
        if not len(peers):
            delattr(self, "peers")
        return layer

    def computing(self) -> list["AdapterLayer"]:
        """The layers of :meth:`stack` the forward pass applies (the active ones), in their :attr:`order`. A host
        without peers (one adapter on this module, the usual case) is its own stack: no sort (review round 60)."""
        if "peers" not in self._modules:
            return [self] if self.active else []
        return sorted((layer for layer in self.stack() if layer.active), key=lambda layer: layer.order)

    def add_peer(self, layer: "AdapterLayer") -> None:
        """Put another adapter's layer for this module beside this one (built over the same base module).

        The peer keeps ``weight``/``bias`` as plain attributes (the host's tensors): the ``state_dict``
        lists them once, under the host's names."""
        if "peers" not in self._modules:
            self.peers = nn.ModuleDict()
        layer.is_peer = True
        layer.train(self.training)
        self.peers[layer.adapter_name] = layer
        self.share_base()

    def make_host(self) -> None:
        """Undo :meth:`add_peer`'s changes to this layer (it takes a slot in the model)."""
        for name in ("weight", "bias"):
            self.register_parameter(name, self.__dict__.pop(name))
        self.is_peer = False

    def share_base(self) -> None:
        """Point the base module and every peer at this host's ``weight``/``bias``, the one copy of ``W0`` (after
        ``load_state_dict(assign=True)`` put new tensors in: ``disabled``, a module with no active layer and the
        peers must read those). A peer holds them as plain attributes, not parameters: the ``state_dict`` lists
        them once, under the host's names."""
        base = cast(Any, self.kind.module)
        base.weight = self.weight
        if hasattr(base, "bias"):  # an nn.Embedding has no bias: none is added to it
            base.bias = self.bias
        for peer in self.stack()[1:]:
            for name in ("weight", "bias"):
                peer._parameters.pop(name, None)
                peer.__dict__[name] = getattr(self, name)

    def combined_weight(self) -> Tensor:
        """What a merge writes (``out x in``, fp32 or fp64): the active layers' weights composed in their order
        (:meth:`stacked_weight`; ``W0 + Σ ΔW_i`` for additive ones); one active layer: its ``merged_weight``."""
        chosen = self.computing()
        if len(chosen) == 1:
            return chosen[0].merged_weight()
        wide = torch.float64 if any(layer.merge_dtype == torch.float64 for layer in chosen) else torch.float32
        w = self.unmerged_base_weight().to(wide)  # out x in
        for layer in chosen:
            w = layer.stacked_weight(w)
        return w

    def _set_merged(self, merged: bool, original: Tensor | None) -> None:
        """Record the merge state on every layer of the stack (peers read ``W0`` through it). The kept bits are a plain
        attribute, never a registered parameter (a tied layer keeps the shared ``Parameter`` itself), so the
        ``state_dict`` carries them once, as ``unmerged_weight``."""
        for layer in self.stack():
            layer.merged = merged
            layer.__dict__["_original_weight"] = original

    def check_base_stored(self, name: str = "") -> None:
        """``TypeError`` when a torch parametrization was registered on this layer's ``weight`` / ``bias`` (the base
        module's tensors, shared) after attach (``name``: the layer's, for the message). The adapter reads ``W0`` as a
        stored tensor: the unmerged forward would compute with the parametrized value, ``disabled()`` and the module
        put back at detach with the stored one, and a merge would write into a value recomputed on the next read
        (lost). Refused (at the forward, merge, detach and delete, before anything changes) rather than half honoured,
        as attach refuses a parametrized target (:func:`rankwise.base_layers.check_stored_weight`)."""
        plists = self._modules.get("parametrizations")
        held = plists.items() if isinstance(plists, nn.ModuleDict) else ()
        found = {t: [type(p).__name__ for p in cast(nn.ModuleList, plist)] for t, plist in held if t in ("weight", "bias")}
        if found:
            where = f"adapter layer {name!r}" if name else f"this {type(self).__name__}"
            raise TypeError(
                f"{where} has torch parametrizations {found} on the base module's tensors, registered after attach: "
                "the adapter reads W0 as a stored tensor, so its forward, merge, disabled() and detach would not agree "
                "on W0. Take them off first, keeping the stored W0 "
                f"(torch.nn.utils.parametrize.remove_parametrizations(layer, {next(iter(found))!r}, "
                "leave_parametrized=False)), and register them on the module after rankwise.detach")

    def check_fixed_stored(self, name: str = "") -> None:
        """``TypeError`` when a torch parametrization was registered after attach on an adapter tensor this layer does
        not train (not in ``trainable``: RAC-LoRA's sketch and chain record, EDoRA's frozen SVD factors and norm terms;
        ``name``: the layer's, for the message). A method may keep terms computed once from such a tensor (EDoRA's
        norm from ``A``) or rewrite it in place (RAC-LoRA's sketch at a link end), which a computed value would
        silently escape. A trained factor's parametrization is honoured (:meth:`leaves`)."""
        fixed = [t for t in self.parametrized_factors() if t not in self.trainable]
        if fixed:
            where = f"adapter layer {name!r}" if name else f"this {type(self).__name__}"
            raise TypeError(
                f"{where} has torch parametrizations on {fixed}, tensors it holds fixed (not trained), registered after "
                "attach: the method keeps terms computed from them or rewrites them in place, so its forward would not "
                "agree with the parametrized value. Take them off, keeping the value "
                f"(torch.nn.utils.parametrize.remove_parametrizations(layer, {fixed[0]!r}, leave_parametrized=True))")

    def leaves(self, name: str) -> dict[str, Tensor]:
        """The stored tensors behind adapter tensor ``name``, by name: the tensor itself, or for one a user put a torch
        parametrization on after attach the tensors it is computed from (``parametrizations.<name>.original``, under
        ``name``; ``original0``, ... as ``<name>.original0``, ... where a ``right_inverse`` splits it). What an
        optimizer trains and a gradient check reads: the computed value is not a leaf (its ``.grad`` stays ``None``)."""
        plists = self._modules.get("parametrizations")
        if not isinstance(plists, nn.ModuleDict) or name not in plists:
            return {name: getattr(self, name)}
        plist = plists[name]
        held = {**plist._parameters, **plist._buffers}
        return {name if k == "original" else f"{name}.{k}": t for k, t in held.items() if t is not None}

    def mark_own(self) -> None:
        """Record the buffers and state-dict hooks this layer has now, as it goes on the model (``attach``, ``load``):
        what :meth:`user_buffers` and :meth:`user_state_dict_hooks` leave out."""
        self.own_buffers = frozenset(self._buffers)
        self.own_parameters = frozenset(self._parameters)
        self.own_state_dict_hooks = frozenset(k for hooks in state_dict_hooks(self).values() for k in hooks)

    def user_buffers(self) -> list[str]:
        """The buffers registered on this layer after :meth:`mark_own` (a user's, while attached)."""
        return [n for n, b in self._buffers.items() if n not in self.own_buffers and b is not None]

    def user_parameters(self) -> list[str]:
        """The parameters registered on this layer after :meth:`mark_own` (a user's, while attached; none before it)."""
        if self.own_parameters is None:
            return []
        return [n for n, p in self._parameters.items() if n not in self.own_parameters and p is not None]

    def user_tensors(self) -> list[str]:
        """The parameters and persistent buffers registered on this layer after :meth:`mark_own` (a user's, while
        attached; none before it): in ``model.state_dict()``, never in the adapter's file (:meth:`adapter_state`)."""
        if self.own_parameters is None:
            return []
        return self.user_parameters() + [n for n in self.user_buffers() if n not in self._non_persistent_buffers_set]

    def parametrized_factors(self) -> list[str]:
        """The adapter's own tensors a user put a ``torch.nn.utils.parametrize`` parametrization on (its base
        ``weight`` / ``bias``: :meth:`check_base_stored`): the forward and merge use the value it computes."""
        plists = self._modules.get("parametrizations")
        return [t for t in (plists.keys() if isinstance(plists, nn.ModuleDict) else ()) if t not in ("weight", "bias")]

    def user_state_dict_hooks(self) -> list[str]:
        """The kinds (their tables' names) of the state-dict hooks registered on this layer after :meth:`mark_own`."""
        return list(state_dict_hooks(self, besides=self.own_state_dict_hooks))

    def refuse_while_disabled(self, what: str, *, scaled_ok: bool = False) -> None:
        """Raise ``RuntimeError`` if this layer is inside ``rankwise.disabled`` (``what``: the refused call), or still
        disabled after that block's exit failed (:meth:`refuse_if_half_enabled` says how to finish it); or inside
        ``rankwise.per_example`` (:meth:`refuse_in_per_example`) or ``rankwise.scaled`` (:meth:`refuse_in_scaled`)."""
        self.refuse_in_per_example(what)
        if not scaled_ok:  # a call that only reads the rescaled layers (a per_example block) is fine inside one
            self.refuse_in_scaled(what)
        if self.disabled:
            self.refuse_if_half_enabled(what)
            if self.copied_inside_disabled():
                raise RuntimeError(COPIED_INSIDE_DISABLED.format(what=what))
            raise RuntimeError(f"cannot {what} inside `with rankwise.disabled(model):`; do it after the block")

    def refuse_in_scaled(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` inside a ``rankwise.scaled`` block: the layer's strength is rescaled
        there (:meth:`rescaled`), so a merge, save, export, link end or change of the adapters would write or keep the
        rescaled update, which the block's exit then takes back from the layer but not from what was made. Also
        refused on a copy of the layer taken inside a block (:data:`COPIED_INSIDE_SCALED`), which keeps that update."""
        if _SCALED.get(self, 0):
            raise RuntimeError(f"cannot {what} inside `with rankwise.scaled(model, factor):`; do it after the block")
        if self._scaled_blocks:  # held by blocks, but by none live: a copy taken inside one
            raise RuntimeError(COPIED_INSIDE_SCALED.format(what=what))

    def hold_scaled(self, held: bool, block: object, where: str) -> None:
        """Count ``rankwise.scaled`` block ``block`` in (``True``) or out (``False``, the innermost) of this layer, named
        ``where``: the calls it refuses (:meth:`refuse_in_scaled`), and the strength its forward runs at, which a
        gradient checkpoint's recomputation must find unchanged (:data:`RECOMPUTED_AT_ANOTHER_STRENGTH`)."""
        depth = _SCALED.get(self, 0) + (1 if held else -1)
        if depth > 0:
            _SCALED[self] = depth
        else:
            _SCALED.pop(self, None)
        self._scaled_blocks = (*self._scaled_blocks, block) if held else self._scaled_blocks[:-1]
        self._where = where

    def rescaled(self, factor: float) -> dict[str, Any]:
        """Multiply this layer's update by ``factor`` (:func:`rankwise.scaled`) and return the attributes changed,
        with their values before (setting them back restores the layer bit for bit).

        Here the scale ``s``: a LoRA-form update ``s·B A`` is then exactly ``factor`` times itself; a DoRA-family layer
        gets ``s`` multiplied inside its direction, ``m · (W0 + factor·s·B A) / ‖W0 + factor·s·B A‖_row``, as HF PEFT's
        ``rescale_adapter_scale`` does (its magnitude stays). A method whose update holds more than ``s`` scales
        (RAC-LoRA's chain record) extends this on its layer class."""
        old: dict[str, Any] = {"scale": self.scale}
        self.scale = self.scale * factor
        return old

    def refuse_in_per_example(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` inside a ``rankwise.per_example`` block: the block split the batch by
        the adapters as they were on entry, so a change of them (merge, attach, delete, set_active, load) or another
        block would leave some rows computing what their names do not say."""
        if self.per_example is not None:
            raise RuntimeError(f"cannot {what} inside `with rankwise.per_example(model, names):`; "
                               "do it after the block")

    def copied_inside_disabled(self) -> bool:
        """Whether this layer is disabled with no live ``rankwise.disabled()`` block holding it: a copy of a layer
        taken inside one (``copy.deepcopy``, ``torch.save`` / ``torch.load`` copy the ``disabled`` flag, not the
        block); :func:`rankwise.set_active` enables it."""
        return self.disabled and self not in _IN_A_BLOCK

    def refuse_if_half_enabled(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` while the model is half enabled: a ``rankwise.disabled()`` exit failed
        part way (:attr:`half_enabled` says how), so some layers or fully-trained modules may still be the base's."""
        if self.half_enabled is not None:
            raise RuntimeError(f"cannot {what}: {self.half_enabled}")

    @torch.no_grad()
    def merge(self) -> None:
        """Write the adapted weight into ``weight`` (once; idempotent). The original bits are kept."""
        self.refuse_while_disabled("merge")
        if self.merged:
            return
        self.kind.check_merge()
        new = self.combined_weight()  # out x in, merge_dtype
        cast = self.kind.stored(new).to(self.weight.dtype)  # what would be written
        if not torch.isfinite(cast).all():  # checked after the cast: W0 + ΔW may overflow fp16 although finite in fp32
            peak = float(new.abs().max()) if torch.isfinite(new).all() else float("nan")
            raise FloatingPointError(
                f"merging would write non-finite values into this {tuple(new.shape)} {self.weight.dtype} weight: "
                f"max |W0 + ΔW| = {peak:.6g}, beyond {self.weight.dtype}'s range (±{torch.finfo(self.weight.dtype).max:.6g}) "
                "or not finite. Keep the adapter unmerged, or merge into a wider dtype (model.float() first)"
            )
        if self.tied:  # never write into a shared tensor: keep it (it is the original) and own the merged one
            original = self.weight
            self.weight = nn.Parameter(kept_tensor(cast), requires_grad=False)
        else:
            original = kept_tensor(self.weight.detach().clone())  # merged inside inference mode: still normal bits
            self.weight.copy_(cast)
        self._set_merged(True, original)
        self._warned_merged = False

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weight (idempotent)."""
        self.refuse_while_disabled("unmerge")
        if not self.merged:
            return
        assert self._original_weight is not None
        if self.tied:  # the shared tensor itself, never written: tied again
            self.weight = self._original_weight  # type: ignore[assignment]
        else:
            self.weight.copy_(self._original_weight)
        self._set_merged(False, None)

    @torch.no_grad()
    def disable(self, where: str = "") -> None:
        """Compute the base module alone (idempotent). A merged host swaps the kept original bits into
        ``weight`` and the merged bits into the kept copy (exact both ways; one layer's copy at a time); a
        merged tied layer needs nothing: its base module still holds the shared, never-written original.
        ``where``: the layer's path in its model (``rankwise.disabled`` gives it), named by its errors."""
        if self.disabled:
            return
        self._where = where or self._where
        if self.merged and not self.tied:
            kept = self._original_weight
            assert kept is not None
            merged_bits = self.weight.detach().clone()
            self.weight.copy_(kept)
            kept.copy_(merged_bits)
            self._merged_aside = kept
            self._set_merged(False, None)
        self.disabled = True
        _IN_A_BLOCK.add(self)

    @torch.no_grad()
    def enable(self) -> None:
        """Undo :meth:`disable` exactly (idempotent): a merged host gets its merged bits back. The one step that can
        fail (the copy's memory) comes before anything changes, so a layer is enabled or left as it was."""
        if not self.disabled:
            return
        aside = self._merged_aside
        if aside is not None:
            original = self.weight.detach().clone()
            self.weight.copy_(aside)
            aside.copy_(original)
            self._merged_aside = None
            self._set_merged(True, aside)
        self.disabled = False
        _IN_A_BLOCK.discard(self)

    def check_mergeable(self) -> None:
        """Raise (changing nothing) when this layer cannot merge: a quantised base, inside ``disabled`` or half enabled."""
        self.refuse_if_half_enabled("merge")
        self.kind.check_merge()
        self.refuse_while_disabled("merge")
        self.check_base_stored()

    @torch.no_grad()
    def merge_for_good(self, default_dtype: torch.dtype = torch.float32) -> nn.Module:
        """``detach(merge=True)``'s module for the model's slot, holding ``W0`` + the update(s): the base module merged
        in place, or over a base that cannot merge in place (quantised) a new float module
        (:meth:`rankwise.base_layers.BaseKind.merged_module`; ``default_dtype``, the model's float dtype, where the
        base records none). The kept original bits stay (``unmerge`` still undoes it) until :meth:`forget_original`."""
        if not self.kind.merges_in_place:
            return self.to_merged_float(default_dtype)
        self.merge()
        return self.to_base()

    def forget_original(self) -> None:
        """Drop the kept original bits once a merged detach is done (nothing unmerges this layer any more)."""
        self._original_weight = None

    def to_merged_float(self, default_dtype: torch.dtype = torch.float32) -> nn.Module:
        """A quantised base's replacement for a merged detach: a float ``nn.Linear`` holding the
        dequantised ``W0`` + the update(s), in the float dtype the base takes and returns (``default_dtype``
        where the base records none: an int8 layer without a bias)."""
        return self.kind.merged_module(self.combined_weight().detach(), default_dtype)

    def to_base(self) -> nn.Module:
        """The original base module (holding the same, possibly merged, weight)."""
        self.share_base()
        return self.kind.module

    def adapter_state(self) -> dict[str, Tensor]:
        """Every tensor that defines the adapter (not the base weight/bias), by local name: what ``rankwise.save`` writes
        and ``load`` fills. A factor a user parametrized (:meth:`parametrized_factors`) under its own name, holding the
        value the forward uses (not ``parametrizations.<name>.original``, which ``load`` could not place); a tensor a
        user registered on the layer while attached (:meth:`user_tensors`) left out: it is not the adapter's."""
        left_out = {"weight", "bias", UNMERGED_KEY, *self._base_extras(), *self.user_tensors()}
        state = {k: v for k, v in self.state_dict(keep_vars=False).items()
                 if k not in left_out and not k.startswith(("peers.", "parametrizations."))}
        return state | {t: getattr(self, t).detach() for t in self.parametrized_factors()}

    def _base_extras(self, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
        """What the base module's own ``state_dict`` holds beside ``weight``/``bias``: bitsandbytes' quantisation
        state (4-bit ``weight.absmax`` / ``weight.quant_map`` / ``weight.quant_state.*``, int8 ``SCB`` /
        ``weight_format``), without which ``from_pretrained`` of a saved model cannot run the packed weight.
        Empty for a float base and for a peer (its host writes the base's tensors)."""
        if not self.quantized or self.is_peer:
            return {}
        own: dict[str, Any] = {}
        self.kind.module._save_to_state_dict(own, prefix, keep_vars)
        return {k: v for k, v in own.items() if k not in (prefix + "weight", prefix + "bias")}

    def _apply(self, fn: Any, recurse: bool = True) -> "AdapterLayer":
        """``model.to(...)`` / ``.half()`` / ``.cuda()``: also the kept original bits of a merged layer (and a disabled
        merged host's merged bits), which are plain attributes, converted in place (``.data``, as torch converts a
        parameter) so every layer of the stack still shares the one tensor. A merged *tied* layer's kept bits are the
        shared ``Parameter`` itself; when every module holding it is an adapter layer (a tied ``embed_tokens`` and
        ``lm_head`` both adapted), nothing else converts it, and ``unmerge`` put the old dtype / device back into the model."""
        super()._apply(fn, recurse)
        for name in ("_original_weight", "_merged_aside"):
            kept = self.__dict__.get(name)
            if isinstance(kept, Tensor):
                with torch.no_grad():
                    new = fn(kept)
                if new is not kept:
                    kept.data = new  # in place: the peers, the base module (tied: the other holders) keep the object
        if not self.is_peer:  # torch converted the peers (submodules) before this host's W0: they see it only now
            for peer in self.stack()[1:]:
                peer.base_converted()
        return self

    def base_converted(self) -> None:
        """Called on each peer by its host's ``_apply`` once the host's ``W0`` (and kept bits) are converted: a peer
        keeping terms computed from ``W0`` (EDoRA's norm) recomputes them here. Nothing by default."""

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """A merged layer's ``state_dict`` carries its merged state: ``weight`` is the merged weight (what a
        plain model reading it computes) and ``unmerged_weight`` the kept original bits, so it loads into a
        fresh adapted model merged and exactly unmergeable, never with the update applied twice (a host only:
        its peers hold no base tensors of their own)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self._base_extras(prefix, keep_vars))  # a quantised base's own state, as it saves it
        if self.merged and not self.is_peer:
            assert self._original_weight is not None
            destination[prefix + UNMERGED_KEY] = self._original_weight if keep_vars else self._original_weight.detach()

    def resize_for_load(self, shapes: dict[str, torch.Size]) -> None:
        """Called by :func:`rankwise.load` with the saved adapter tensors' shapes, before they are filled in.

        A no-op for fixed-shape adapters; methods whose tensors grow in training (RAC-LoRA's chain
        record) re-allocate them here to the saved shapes. Shapes are still checked afterwards.
        """

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """``load_state_dict`` (HF Trainer's resume, the FSDP2 save recipe) resizes grown tensors first, as
        :func:`rankwise.load` does; shapes are then checked by PyTorch as usual. A merged state_dict (one with
        ``unmerged_weight``) loads its original ``W0`` and merges (recomputing the same merged bits); loading
        into a merged layer unmerges, loads and re-merges."""
        shapes = {k[len(prefix):]: v.shape for k, v in state_dict.items()
                  if k.startswith(prefix) and "." not in k[len(prefix):] and hasattr(v, "shape")}
        self.resize_for_load(shapes)
        if self.is_peer:  # its host unmerged the stack before and merges it again after (_merge_after_load)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
            return
        was_merged = self.merged
        self.unmerge()  # the incoming tensors are loaded into the unmerged layer
        for key in self._base_extras(prefix):  # the base keeps its own quantisation state (its packed weight is frozen)
            state_dict.pop(key, None)
        unmerged = state_dict.pop(prefix + UNMERGED_KEY, None)  # a merged layer's state_dict
        if unmerged is not None:  # load its original W0; the merged weight is recomputed from it (the same bits)
            state_dict[prefix + "weight"] = unmerged
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self.share_base()  # assign=True put new tensors in: the base module and the peers (loaded next) read them
        # merged again once the peers (submodules, loaded after this) have their tensors: _merge_after_load
        self._merge_pending = (unmerged is not None or was_merged) and len(error_msgs) == n_errors

    def requires_grad(self) -> bool:
        """Whether any of this layer's trainable tensors is set to train (``False`` after ``load(..., trainable=False)``)."""
        return any(p.requires_grad for p in self.trainable_tensors().values())

    def trainable_tensors(self) -> dict[str, Tensor]:
        """``{name: tensor}`` for the names in ``trainable`` (this layer's trained tensors): the stored ones, a
        parametrized factor's ``original`` under the factor's name (:meth:`leaves`)."""
        return {k: t for name in self.trainable for k, t in self.leaves(name).items()}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"scale={self.scale:.4g}, merged={self.merged}, base={self.kind.describe()}, path={self.fused_path()}"
        )


def _merge_after_load(layer: AdapterLayer, _keys: Any) -> None:
    """After ``load_state_dict`` reached a layer and its peers: merge it if it came (or was) merged."""
    if layer._merge_pending:
        layer._merge_pending = False
        layer.merge()
