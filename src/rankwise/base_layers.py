"""Base-layer kinds: how an adapter layer reads, runs and merges the module it adapts.

An :class:`~rankwise.layer.AdapterLayer` works on ``W0`` as ``out x in`` and on the base forward
``x W0ᵀ + b``, whatever the module stores. One small :class:`BaseKind` per kind of base module answers
those questions for it:

=================  =====================================  ==================================
kind               stored weight                          base forward
=================  =====================================  ==================================
``linear``         ``nn.Linear``: ``out x in``            ``F.linear(x, W0, b)``
``conv1d``         GPT-2 ``Conv1D``: ``in x out``         ``F.linear(x, Wᵀ, b)``
``4bit``           bitsandbytes ``Linear4bit`` (packed)   bitsandbytes' own matmul
``8bit``           bitsandbytes ``Linear8bitLt`` (int8)   bitsandbytes' own matmul
``embedding``      ``nn.Embedding``: ``in x out``          ``F.embedding(ids, W)`` (its own settings)
                   (``num_embeddings x embedding_dim``)
=================  =====================================  ==================================

An embedding is the linear map of a one-hot input: ``in = num_embeddings``, ``out = embedding_dim``, and its
input is integer ids, so ``x W0ᵀ`` is a row lookup ``W[ids]``. Every product of the input with an ``r x in``
factor goes through :meth:`BaseKind.down` (``x Aᵀ``, for ids the lookup ``Aᵀ[ids]``), the one operation a method
needs from the kind beyond the base forward. ``nn.Conv2d`` has no kind yet (not supported).

:func:`base_kind` is the dispatcher: it asks the registered kinds in order (the most specific first:
bitsandbytes' layers are ``nn.Linear`` subclasses) and the first whose :meth:`BaseKind.matches`
accepts the module handles it, as HF PEFT's ``dispatch_*`` functions each claim a module or pass.
A new kind (``nn.Conv2d``) is one subclass plus :func:`register_kind`; targeting
(:func:`rankwise.targeting.is_supported`), the layer, merging and the fused path then follow it.

A kind holds no tensor of its own: the layer passes its current ``weight`` (a merged tied layer owns a
new one), so a kind never goes stale.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quant


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``, whose weight is stored ``in x out`` (PEFT's ``fan_in_fan_out``)."""
    return type(module).__name__ == "Conv1D"


def forward_bypassed(module: nn.Module) -> bool:
    """torch's ``nn.MultiheadAttention.out_proj`` (a ``NonDynamicallyQuantizableLinear``): the attention applies its
    weight inside ``F.multi_head_attention_forward`` and never calls its forward, so an adapter there would get no
    gradient and change no output (yet a merge would write into the weight)."""
    return isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


class BaseKind:
    """One kind of base module: a float ``nn.Linear`` here; subclasses override what differs.

    Attributes:
        name: the kind's label in reprs and reports.
        type_name: the module type named in "rankwise adapts ..." messages.
        quantized: ``"4bit"`` / ``"8bit"`` for a bitsandbytes base, else ``None``.
        fan_in_fan_out: the stored weight is ``in x out`` (GPT-2 ``Conv1D``).
        fusable: the fused node (:class:`rankwise.fused.LowRankLinear`, a dense ``x W0ᵀ + b``) can stand in
            for this kind's base forward.
        all_linear: ``target_modules="all-linear"`` selects modules of this kind.
        merges_in_place: ``merge`` writes ``W0 + ΔW`` into the stored weight (and ``unmerge`` restores it);
            otherwise merging is refused and ``detach(merge=True)`` swaps in :meth:`merged_module`.
        index_input: the input is integer ids (``nn.Embedding``): :meth:`down` is a lookup, no input dropout
            applies (HF PEFT's embedding layer applies none), and LoRA starts from ``A = 0``, ``B ~ N(0, 1)`` (PEFT's
            and the LoRA paper's code's embedding init) instead of a random ``A`` and ``B = 0``.
    """

    name: ClassVar[str] = "linear"
    type_name: ClassVar[str] = "Linear"
    quantized: ClassVar[str | None] = None
    fan_in_fan_out: ClassVar[bool] = False
    fusable: ClassVar[bool] = True
    all_linear: ClassVar[bool] = True
    merges_in_place: ClassVar[bool] = True
    index_input: ClassVar[bool] = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether this kind handles ``module`` (asked in :func:`base_kind`'s order): a Linear whose forward runs."""
        return isinstance(module, nn.Linear) and not forward_bypassed(module)

    def features(self) -> tuple[int, int]:
        """``(in_features, out_features)``."""
        out_f, in_f = cast(Tensor, self.module.weight).shape
        return int(in_f), int(out_f)

    @classmethod
    def out_in(cls, t: Tensor) -> Tensor:
        """A tensor laid out like the stored weight (the weight itself, its gradient), as ``out x in`` (a view)."""
        return t

    def dense(self, weight: Tensor) -> Tensor:
        """The layer's ``weight`` (stored layout) as ``out x in``: a view for a float kind."""
        return self.out_in(weight)

    def stored(self, w: Tensor) -> Tensor:
        """An ``out x in`` matrix in the stored layout (what a merge writes)."""
        return w

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        """``x W0ᵀ + b`` with the layer's current ``weight`` and ``bias``."""
        return F.linear(x, self.dense(weight), bias)

    def forward_no_bias(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        """``x W0ᵀ``."""
        return F.linear(x, self.dense(weight))

    def plain_forward(self, x: Tensor, training: bool) -> Tensor:
        """The module's own forward, as before ``attach``."""
        return self.module(x)

    def down(self, x: Tensor, a: Tensor, dtype: torch.dtype) -> Tensor:
        """``x Aᵀ`` (``(..., r)``) for a factor ``A`` (``r x in``), the input cast to ``dtype`` (the adapter's): the
        input's product with a low-rank factor, the one place a method reads the input (besides the base forward)."""
        return x.to(dtype) @ a.t()

    def weight_grad(self, x: Tensor, d: Tensor) -> Tensor:
        """``∂L/∂W0`` (``out x in``, ``d``'s dtype) through this module's call on input ``x`` with output gradient
        ``d`` (``(..., out)``): ``Σ_tokens dᵀ x``."""
        flat_d = d.reshape(-1, d.shape[-1])  # tokens x out
        return flat_d.t() @ x.reshape(-1, x.shape[-1]).to(d.dtype)  # out x in

    def clear_padding(self, a: Tensor) -> None:
        """Zero, in place, the column of an ``r x in`` factor that the module keeps fixed (an embedding's
        ``padding_idx``); nothing for other kinds."""

    def cheap_probe(self) -> bool:
        """Whether extra input rows ride along a base forward at no extra read of ``W0`` (a 4-bit base computing
        in fp32 dequantises inside each call; see :meth:`rankwise.layer.AdapterLayer.probe_forward`)."""
        return False

    def check_merge(self) -> None:
        """Raise when ``W0 + ΔW`` cannot be written into this kind's weight (and restored)."""

    def merged_module(self, weight: Tensor, default_dtype: torch.dtype = torch.float32) -> nn.Module:
        """For a kind that cannot merge in place (``merges_in_place`` false): a float module holding ``weight``
        (``out x in``), ``detach(merge=True)``'s replacement for the base module; ``default_dtype`` (the model's
        float dtype) where the base records no float dtype of its own."""
        raise TypeError(f"a {self.name} base merges in place (AdapterLayer.merge)")

    def describe(self) -> str:
        """A short label: the kind's name (a quantised kind's format, e.g. ``"nf4 (double quant)"``)."""
        return self.name


class InOutKind(BaseKind):
    """A kind whose weight is stored ``in x out``, the transpose of the layer's ``out x in`` (GPT-2's ``Conv1D``, an
    embedding table)."""

    def features(self) -> tuple[int, int]:
        in_f, out_f = cast(Tensor, self.module.weight).shape
        return int(in_f), int(out_f)

    @classmethod
    def out_in(cls, t: Tensor) -> Tensor:
        return t.t()

    def stored(self, w: Tensor) -> Tensor:
        return w.t()


class Conv1DKind(InOutKind):
    """transformers' GPT-2 ``Conv1D``: ``y = x W + b`` with ``W`` stored ``in x out``."""

    name: ClassVar[str] = "conv1d"
    type_name: ClassVar[str] = "Conv1D"
    fan_in_fan_out: ClassVar[bool] = True

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return is_conv1d(module) and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class Bnb4bitKind(BaseKind):
    """bitsandbytes ``Linear4bit`` (nf4 / fp4, optionally double-quantised): frozen, never merged (:mod:`rankwise.quant`)."""

    name: ClassVar[str] = "4bit"
    quantized: ClassVar[str | None] = "4bit"
    fusable: ClassVar[bool] = False
    merges_in_place: ClassVar[bool] = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        quant.keep_layout(module)  # bitsandbytes must not repack this weight for CPU inference (rankwise.quant)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return quant.quant_kind(module) == cls.quantized

    def features(self) -> tuple[int, int]:
        layer: Any = self.module  # the stored weight is packed: the layer knows its shape
        return int(layer.in_features), int(layer.out_features)

    def dense(self, weight: Tensor) -> Tensor:
        """A new fp32 ``out x in`` tensor, dequantised on each call."""
        return quant.dequantize(self.module)

    def stored(self, w: Tensor) -> Tensor:
        raise quant.merge_refusal(self.module)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        return quant.base_forward(self.module, x, training)

    def forward_no_bias(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        """Its own forward less the bias (as HF PEFT's QDoRA computes it)."""
        out = self.forward(x, weight, bias, training)
        return out if bias is None else out - bias.to(out.dtype)

    def plain_forward(self, x: Tensor, training: bool) -> Tensor:
        return quant.base_forward(self.module, x, training)

    def cheap_probe(self) -> bool:
        return quant.compute_dtype(self.module) == torch.float32

    def check_merge(self) -> None:
        raise quant.merge_refusal(self.module)

    def merged_module(self, weight: Tensor, default_dtype: torch.dtype = torch.float32) -> nn.Module:
        """A float ``nn.Linear``: the dequantised ``W0`` + the update(s), in the float dtype the base takes and
        returns (:func:`rankwise.quant.float_dtype`; ``default_dtype`` for an int8 base without a bias)."""
        return quant.float_linear(self.module, weight, quant.float_dtype(self.module, default_dtype))

    def describe(self) -> str:
        return quant.describe_quant(self.module)


class Bnb8bitKind(Bnb4bitKind):
    """bitsandbytes ``Linear8bitLt`` (int8 weights, ``has_fp16_weights=False``): as the 4-bit kind, no ride-along."""

    name: ClassVar[str] = "8bit"
    quantized: ClassVar[str | None] = "8bit"

    def cheap_probe(self) -> bool:
        return False


class EmbeddingKind(InOutKind):
    """``nn.Embedding``: ``y = W[ids]`` with ``W`` stored ``num_embeddings x embedding_dim``, i.e. ``in x out`` (the
    linear map of a one-hot input, ``in = num_embeddings``). The base forward is ``F.embedding`` with the module's
    own ``padding_idx``, ``norm_type`` and ``scale_grad_by_freq``; :meth:`down` looks up ``Aᵀ`` with the same
    ``padding_idx`` and ``scale_grad_by_freq`` (as HF PEFT's ``Embedding._embed``), so ``A``'s padding column gets
    no gradient and, starting at zero (:meth:`clear_padding`), the padding row's update stays zero.

    A *scaled* embedding (transformers' ``Gemma3TextScaledWordEmbedding``, ``BartScaledWordEmbedding``, ...: a subclass
    whose forward is ``W[ids] · c`` with a scalar ``embed_scale`` attribute ``c``) is the linear map of ``c`` times the
    one-hot input, so the base forward, :meth:`down` and :meth:`weight_grad` each carry the factor ``c`` and every
    method follows: LoRA's ``c · s · Aᵀ[ids] Bᵀ`` and DoRA's ``μ ⊙ c · (W0[ids] + s · Aᵀ[ids] Bᵀ)`` with ``μ`` from
    the unscaled ``W0 + s·B A`` are HF PEFT's (``_get_embed_scale``); a merge writes ``W0 + ΔW``, which the module
    scales itself. Attach checks on a few rows that the subclass's forward is that product (:meth:`check_scaled`).

    Refused (:meth:`check_module`): ``max_norm`` (``F.embedding`` renormalises the looked-up rows of the weight in
    place on every call: ``W0`` would drift, and merge / unmerge could not be exact), ``sparse=True`` (sparse
    gradients; the frozen base needs none) and a subclass with any other forward of its own.
    """

    name: ClassVar[str] = "embedding"
    type_name: ClassVar[str] = "Embedding"
    fusable: ClassVar[bool] = False  # the fused node is a dense x W0ᵀ + b, not a lookup
    all_linear: ClassVar[bool] = False  # as HF PEFT's "all-linear": only named embeddings are adapted
    index_input: ClassVar[bool] = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.check_module(module)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @staticmethod
    def check_module(module: nn.Module) -> None:
        """Raise ``TypeError`` / ``ValueError`` for an embedding whose forward rankwise cannot reproduce exactly."""
        emb = cast(nn.Embedding, module)
        if emb.max_norm is not None:
            raise ValueError(
                f"cannot adapt an nn.Embedding with max_norm={emb.max_norm}: its forward renormalises the looked-up rows "
                "of the weight in place, so the frozen W0 would change and merge/unmerge could not be exact"
            )
        if emb.sparse:
            raise ValueError("cannot adapt an nn.Embedding with sparse=True (sparse gradients): its weight is frozen "
                             "under an adapter, so build it with sparse=False")
        if type(emb).forward is not nn.Embedding.forward:  # after the refusals above: this runs its forward on a few rows
            EmbeddingKind.check_scaled(emb)

    @staticmethod
    def check_scaled(emb: nn.Embedding) -> None:
        """For a subclass with a forward of its own: ``TypeError`` unless it has a scalar ``embed_scale`` and its forward
        gives exactly ``W[ids] · embed_scale`` (:func:`scaled`) on a few rows (checked unless the weight is on
        ``meta``, i.e. not loaded yet)."""
        name = type(emb).__name__
        scale = getattr(emb, "embed_scale", None)
        scalar = isinstance(scale, (int, float)) or (isinstance(scale, Tensor) and scale.numel() == 1)
        if not scalar or isinstance(scale, bool):
            raise TypeError(
                f"cannot adapt a {name}: it is an nn.Embedding with a forward of its own and no scalar embed_scale, "
                "which rankwise does not reproduce; it adapts nn.Embedding's lookup, and a scaled embedding's "
                "(W[ids] * embed_scale, as transformers' Gemma3TextScaledWordEmbedding)"
            )
        weight = cast(Tensor, emb.weight)
        if weight.is_meta:
            return
        ids = torch.arange(min(4, emb.num_embeddings), device=weight.device)
        with torch.no_grad():
            own = type(emb).forward(emb, ids)  # the subclass's forward itself (no hooks)
            expected = scaled(F.embedding(ids, weight, emb.padding_idx, None, emb.norm_type), scale)
        if not (isinstance(own, Tensor) and own.shape == expected.shape and torch.equal(own, expected)):
            raise TypeError(
                f"cannot adapt a {name}: it has a scalar embed_scale, but its forward does not compute "
                "W[ids] * embed_scale on the first rows, so rankwise could not reproduce it"
            )

    def _lookup(self, ids: Tensor, table: Tensor) -> Tensor:
        """``table[ids]`` (``(..., cols)``) with the module's settings (``max_norm`` is refused at attach)."""
        emb = cast(nn.Embedding, self.module)
        return F.embedding(ids, table, emb.padding_idx, None, emb.norm_type, emb.scale_grad_by_freq, False)

    def embed_scale(self) -> Tensor | float | None:
        """A scaled embedding's ``c`` (its ``embed_scale``, read at each call: a buffer moves with the module), else
        ``None``."""
        if type(self.module).forward is nn.Embedding.forward:
            return None
        return cast("Tensor | float", getattr(self.module, "embed_scale"))

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        """``W[ids]`` (``(..., out)``; ``c · W[ids]`` scaled): ``x W0ᵀ`` for a one-hot ``x``; an embedding has no bias."""
        return scaled(self._lookup(x, weight), self.embed_scale())

    def forward_no_bias(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        return self.forward(x, weight, bias, training)

    def down(self, x: Tensor, a: Tensor, dtype: torch.dtype) -> Tensor:
        """``Aᵀ[ids]`` (``(..., r)``, ``A``'s dtype; ``c · Aᵀ[ids]`` scaled): ``x Aᵀ`` for a one-hot ``x``; ids are
        not cast."""
        return scaled(self._lookup(x, a.t()), self.embed_scale())  # (..., r)

    def weight_grad(self, x: Tensor, d: Tensor) -> Tensor:
        """``∂L/∂W0`` (``out x in``): the output gradients summed into the columns of their ids (``dᵀ`` times the
        one-hot input), as ``F.embedding``'s backward: the padding column zero, and each column divided by its
        id's count in the batch under ``scale_grad_by_freq``."""
        emb = cast(nn.Embedding, self.module)
        ids = x.reshape(-1)  # tokens
        flat_d = d.reshape(-1, d.shape[-1])  # tokens x out
        g = flat_d.new_zeros(flat_d.shape[1], emb.num_embeddings).index_add_(1, ids, flat_d.t())  # out x in
        if emb.scale_grad_by_freq:
            g = g / torch.bincount(ids, minlength=emb.num_embeddings).clamp_min(1).to(g.dtype)
        if emb.padding_idx is not None:
            g[:, emb.padding_idx] = 0
        return scaled(g, self.embed_scale())  # a scaled embedding's input is c times the one-hot one

    def clear_padding(self, a: Tensor) -> None:
        padding_idx = cast(nn.Embedding, self.module).padding_idx
        if padding_idx is not None:
            a[:, padding_idx] = 0


def scaled(out: Tensor, c: Tensor | float | None) -> Tensor:
    """A scaled embedding's output ``W[ids] · c`` as transformers' modules compute it: a tensor ``c`` cast to the
    output's dtype first (``Gemma3TextScaledWordEmbedding``), a Python number as it is (``BartScaledWordEmbedding``)."""
    if c is None:
        return out
    return out * (c.to(out.dtype) if isinstance(c, Tensor) else c)


KINDS: list[type[BaseKind]] = [Bnb4bitKind, Bnb8bitKind, EmbeddingKind, Conv1DKind, BaseKind]  # asked in this order


def register_kind(kind: type[BaseKind]) -> type[BaseKind]:
    """Add a base-layer kind, asked before the built-in ones (a subclass of ``nn.Linear`` needs to be)."""
    KINDS.insert(0, kind)
    return kind


def kind_class(module: nn.Module) -> type[BaseKind] | None:
    """The registered kind that handles ``module`` (``None``: rankwise cannot adapt it)."""
    return next((kind for kind in KINDS if kind.matches(module)), None)


def takes_ids(module: nn.Module) -> bool:
    """Whether ``module``'s kind reads integer ids (``nn.Embedding``: :attr:`BaseKind.index_input`)."""
    kind = kind_class(module)
    return kind is not None and kind.index_input


def base_kind(module: nn.Module) -> BaseKind:
    """The dispatcher: the :class:`BaseKind` for ``module``, after the checks that it can be adapted.

    ``TypeError`` for a module no kind handles or with a non-float weight that is no bitsandbytes layer;
    ``ImportError``/``ValueError`` for a bitsandbytes layer rankwise cannot use (:func:`rankwise.quant.check_adaptable`).
    """
    quant.check_adaptable(module)
    kind = kind_class(module)
    if kind is None:
        raise TypeError(f"cannot adapt a {type(module).__name__}: rankwise adapts {', '.join(supported_types())} layers")
    return kind(module)


def supported_types() -> tuple[str, ...]:
    """The module types the registered kinds adapt, for messages (``("Linear", "Conv1D", "Embedding")`` built in)."""
    return tuple(dict.fromkeys(kind.type_name for kind in reversed(KINDS)))


__all__ = [
    "KINDS",
    "BaseKind",
    "Bnb4bitKind",
    "Bnb8bitKind",
    "Conv1DKind",
    "EmbeddingKind",
    "InOutKind",
    "base_kind",
    "forward_bypassed",
    "is_conv1d",
    "kind_class",
    "register_kind",
    "supported_types",
    "takes_ids",
]
