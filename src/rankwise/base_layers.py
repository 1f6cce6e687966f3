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
``conv``           ``nn.Conv1d/2d/3d``: ``(out, c, *k)``   the module's ``_conv_forward``
                   (``out x in``, ``in = c·∏k``)           (channels moved last)
=================  =====================================  ==================================

An embedding is the linear map of a one-hot input: ``in = num_embeddings``, ``out = embedding_dim``, and its
input is integer ids, so ``x W0ᵀ`` is a row lookup ``W[ids]``. Every product of the input with an ``r x in``
factor goes through :meth:`BaseKind.down` (``x Aᵀ``, for ids the lookup ``Aᵀ[ids]``), the one operation a method
needs from the kind beyond the base forward.

A convolution is the linear map of its input's unfolded patches: ``in = in_channels·∏kernel_size``,
``out = out_channels``, and ``W0.reshape(out, -1)`` is ``out x in`` (:class:`ConvKind`). Its output is channels-first
``(N, out, *spatial)``; the kind shows the methods a channels-last view ``(N, *spatial, out)`` (the base forward and
:meth:`BaseKind.down` move the channels last), so every method's ``(..., out)`` arithmetic, a DoRA row scale and the
bias broadcast on the last dimension unchanged, and :meth:`BaseKind.to_output` moves the layer's result back once,
at :meth:`rankwise.layer.AdapterLayer.forward`'s exit.

:func:`base_kind` is the dispatcher: it asks the registered kinds in order (the most specific first:
bitsandbytes' layers are ``nn.Linear`` subclasses) and the first whose :meth:`BaseKind.matches`
accepts the module handles it, as HF PEFT's ``dispatch_*`` functions each claim a module or pass.
A new kind is one subclass plus :func:`register_kind`; targeting
(:func:`rankwise.targeting.is_supported`), the layer, merging and the fused path then follow it.

A kind holds no tensor of its own: the layer passes its current ``weight`` (a merged tied layer owns a
new one), so a kind never goes stale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight
from torch.nn.utils import parametrize

from . import peft_version, quant


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``, whose weight is stored ``in x out`` (PEFT's ``fan_in_fan_out``)."""
    return type(module).__name__ == "Conv1D"


def forward_bypassed(module: nn.Module) -> bool:
    """torch's ``nn.MultiheadAttention.out_proj`` (a ``NonDynamicallyQuantizableLinear``): the attention applies its
    weight inside ``F.multi_head_attention_forward`` and never calls its forward, so an adapter there would get no
    gradient and change no output (yet a merge would write into the weight)."""
    return isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def check_stored_weight(module: nn.Module) -> None:
    """``TypeError`` when ``module``'s weight (or bias) is computed on each call instead of stored: a torch
    parametrization (``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``, ...), or a forward pre-hook
    that rebuilds ``weight`` from other tensors (the older ``torch.nn.utils.weight_norm`` / ``spectral_norm``,
    ``torch.nn.utils.prune``), which leaves ``weight`` out of the module's parameters.

    An adapter layer reads ``W0`` as a tensor and runs the base without calling the module: it would fix a value the
    module recomputes (spectral_norm's power iteration), write a merge where the module never reads it
    (``detach(merge=True)`` gave back the module computing ``W0`` again), and a trainable recomputed weight cannot be
    frozen (torch's "only change requires_grad flags of leaf variables")."""
    name = type(module).__name__
    if parametrize.is_parametrized(module):
        found = {t: [type(p).__name__ for p in plist] for t, plist in cast(Any, module).parametrizations.items()}
        raise TypeError(
            f"cannot adapt a {name}: its tensors are computed on each call by torch parametrizations {found}, so an "
            "adapter's W0 and merge would not be what the module computes. Make them plain tensors first "
            "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'), and so for each tensor named: it "
            "keeps their current values)"
        )
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        hooks = [type(h).__name__ for h in module._forward_pre_hooks.values()]
        raise TypeError(
            f"cannot adapt a {name}: its weight is not a stored parameter of its own (its parameters: "
            f"{sorted(module._parameters)}; forward pre-hooks: {hooks}): it is rebuilt on each call, as the older "
            "torch.nn.utils.weight_norm / spectral_norm and torch.nn.utils.prune do, so an adapter's W0 and merge "
            "would not be what the module computes. Make it a plain weight first (torch.nn.utils.remove_weight_norm, "
            "remove_spectral_norm, or torch.nn.utils.prune.remove(module, 'weight'))"
        )


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

    def up(self, h: Tensor, b: Tensor) -> Tensor:
        """``h Bᵀ`` (``(..., out)``) for ``h = down(...)`` (``(..., r)``) and a factor ``B`` (``out x r``, ``h``'s dtype):
        the low-rank update's second product, laid out as :meth:`down` lays out ``h`` (a convolution computes it on
        its channels-first memory, :meth:`ConvKind.up`)."""
        return h @ b.t()

    def add_update(self, result: Tensor, update: Tensor) -> Tensor:
        """``result + update`` (``(..., out)``, in ``result``'s dtype) for ``result`` the base forward's own output and
        ``update`` the low-rank path's (the adapter dtype): summed in the wider of the two dtypes and rounded once into
        ``result``'s, as HF PEFT does (rounding a fp32 update to a bf16 / fp16 base's dtype first added a second
        rounding: review round 48). Added into ``result``'s memory, as no backward keeps that tensor (out of place it
        cost ~90 MB more peak memory training MiniLM with dropout, ``bench/speed.py --dropout 0.1``; a convolution's
        result is a view, :meth:`ConvKind.add_update`)."""
        return result.add_(update)  # in place with type promotion: computed in the wider dtype, then written

    def weight_grad(self, x: Tensor, d: Tensor) -> Tensor:
        """``∂L/∂W0`` (``out x in``, ``d``'s dtype) through this module's call on input ``x`` with output gradient
        ``d`` (laid out as the module returns its output: ``(..., out)`` here): ``Σ_tokens dᵀ x``."""
        flat_d = d.reshape(-1, d.shape[-1])  # tokens x out
        return flat_d.t() @ x.reshape(-1, x.shape[-1]).to(d.dtype)  # out x in

    def to_output(self, y: Tensor) -> Tensor:
        """The layer's result ``y`` (``(..., out)``, as the methods compute it) in the layout the module returns
        (:meth:`rankwise.layer.AdapterLayer.forward`'s one exit): ``y`` itself here; a convolution moves its channels
        back to dimension 1 (free when ``y`` is a channels-last view of channels-first memory, as its
        :meth:`forward`, :meth:`down` and :meth:`up` return and elementwise ops on them keep)."""
        return y

    @classmethod
    def read_buffers(cls, module: nn.Module) -> tuple[str, ...]:
        """The names of ``module``'s buffers this kind reads from it on each call (so they keep working while an adapter
        layer stands in its slot, and attach's note of buffers left behind leaves them out): none here."""
        return ()

    @classmethod
    def check_module(cls, module: nn.Module) -> None:
        """Raise ``TypeError`` / ``ValueError`` (saying why) when this kind matches ``module`` but cannot reproduce its
        forward exactly: for every kind, a weight computed on each call (:func:`check_stored_weight`); a kind refusing
        more calls this first. Asked once per module, where modules are chosen (:func:`rankwise.targeting.check_target`:
        attach, load, import_peft), naming the target, before anything changes; building a kind asks nothing."""
        check_stored_weight(module)

    def peft_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The shapes HF PEFT stores a rank-``rank`` layer's ``lora_A`` (``r x in``), ``lora_B`` (``out x r``) and DoRA
        magnitude (``out``) in; a convolution's are PEFT's conv weights (:meth:`ConvKind.peft_shapes`)."""
        in_f, out_f = self.features()
        return (rank, in_f), (out_f, rank), (out_f,)

    def peft_mismatch(self, peft: peft_version.Version | None = None) -> str | None:
        """Why HF PEFT ``peft`` (``(major, minor)``; ``None``, a PEFT that does not say which it is, is read by PEFT
        0.21's rules, :func:`rankwise.peft_version.at_least`) computes something other than ``W0 + ΔW`` for this module,
        so that an adapter here cannot cross to or from that PEFT's format; ``None`` where it computes ``W0 + ΔW``."""
        return None

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

    def layout(self) -> dict[str, list[int]]:
        """What ``rankwise.save`` records of the base beyond ``out x in`` for ``load`` to compare: nothing here; a
        convolution's weight shape (:meth:`ConvKind.layout`)."""
        return {}


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

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @classmethod
    def check_module(cls, module: nn.Module) -> None:
        """Raise ``TypeError`` / ``ValueError`` for an embedding whose forward rankwise cannot reproduce exactly."""
        super().check_module(module)
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

    @classmethod
    def read_buffers(cls, module: nn.Module) -> tuple[str, ...]:
        """A scaled embedding's ``embed_scale`` (read by :meth:`embed_scale` on each call), else none."""
        return () if type(module).forward is nn.Embedding.forward else ("embed_scale",)

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


CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the convolutions ConvKind adapts
_CONV_WEIGHT_GRAD: dict[int, Callable[..., Tensor]] = {1: conv1d_weight, 2: conv2d_weight, 3: conv3d_weight}  # by spatial dims
_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by spatial dims


class ConvKind(BaseKind):
    """``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, weight ``(out, c, *k)``: the linear map of the input's unfolded
    patches, ``in = c·∏k``, ``out = out_channels``, ``W0 = weight.reshape(out, -1)`` (``out x in``, a view). The base
    forward is the module's own ``_conv_forward`` (its stride, padding, dilation and ``padding_mode``), and so is
    :meth:`down`: ``x Aᵀ`` for an ``r x in`` factor is the convolution of ``x`` with ``A`` reshaped to an ``(r, c, *k)``
    kernel (each patch's product with ``A``); :meth:`up`, ``h Bᵀ``, is a 1x1 convolution with ``B`` as an ``(out, r, 1, ...)``
kernel. All three return channels last, ``(N, *spatial, ·)`` (unbatched: ``(*spatial, ·)``), so the methods'
``(..., out)`` arithmetic applies as it is; each is a view (a permute) of a convolution's channels-first output, and
torch's elementwise ops on such views keep that memory, so :meth:`to_output`, which moves the layer's result's
channels back to where the module returns them, finds it contiguous and copies nothing (as HF PEFT's conv layer, no
per-layer copy of the output; methods add their update out of place, as an in-place add into the view would make
autograd copy the whole output in backward).

    HF PEFT's conv layer is the same ``A`` and ``B`` as PEFT's conv weights: ``lora_A`` a convolution ``(r, c, *k)``
    with the base's kernel, stride and padding, ``lora_B`` a 1x1 convolution ``(out, r, 1, ...)``; its DoRA magnitude
    is stored ``(1, out, 1, ...)`` (:meth:`peft_shapes`), its norm the same row norm of ``W0 + s·B A`` (``out x in``).
    PEFT 0.21 (and older) builds ``lora_A`` without the base's dilation and ``padding_mode``, so where those matter its
    forward is not its own merged weight's, and such a layer does not cross to or from that PEFT's format; PEFT 0.22
    builds it with both, and computes ``W0 + ΔW`` there as rankwise does (:meth:`peft_mismatch`).

    Refused (:meth:`check_module`): ``groups > 1``, a transposed convolution, a lazy one not yet run, and a subclass
    with a forward (or ``_conv_forward``) of its own.
    """

    name: ClassVar[str] = "conv"
    type_name: ClassVar[str] = "Conv1d/2d/3d"
    fusable: ClassVar[bool] = False  # the fused node is a dense x W0ᵀ + b over the last dimension, not a convolution
    all_linear: ClassVar[bool] = False  # as HF PEFT's "all-linear": only named convolutions are adapted

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.conv: Any = module  # its _conv_forward and settings (torch's stubs type neither on _ConvNd)
        kernel: tuple[int, ...] = getattr(module, "kernel_size")
        self.spatial: int = len(kernel)  # 1, 2 or 3

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, (*CONV_TYPES, nn.modules.conv._ConvTransposeNd))  # the latter to be refused by name

    @classmethod
    def check_module(cls, module: nn.Module) -> None:
        """``TypeError`` / ``ValueError`` for a convolution whose forward rankwise cannot reproduce as ``W0 + ΔW``."""
        super().check_module(module)
        name = type(module).__name__
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise TypeError(f"cannot adapt a {name}: transposed convolutions are not supported (HF PEFT 0.21 adapts none "
                            "either); rankwise adapts nn.Conv1d, nn.Conv2d and nn.Conv3d")
        conv: Any = module
        if nn.parameter.is_lazy(conv.weight):
            raise ValueError(f"cannot adapt a {name} whose weight is not initialised yet (a lazy module): run one "
                             "forward pass first")
        if conv.groups > 1:
            raise ValueError(
                f"cannot adapt a {name} with groups={conv.groups}: its weight holds each group's channels only, so a "
                "low-rank update over all input channels cannot be merged into it (HF PEFT's layer there is no update "
                "of W0 and PEFT refuses to merge it)"
            )
        plain = next(t for t in CONV_TYPES if isinstance(module, t))
        if type(module).forward is not plain.forward or getattr(type(module), "_conv_forward") is not getattr(plain, "_conv_forward"):
            raise TypeError(f"cannot adapt a {name}: it is an nn.{plain.__name__} with a forward of its own, which "
                            f"rankwise does not reproduce; it adapts nn.{plain.__name__}'s convolution")

    def features(self) -> tuple[int, int]:
        shape = cast(Tensor, self.module.weight).shape  # out, c, *k
        return math.prod(shape[1:]), int(shape[0])

    @classmethod
    def out_in(cls, t: Tensor) -> Tensor:
        """``(out, c, *k)`` as ``out x in`` (a view of a contiguous tensor; an ``out x in`` one is returned as it is)."""
        return t.flatten(1)

    def stored(self, w: Tensor) -> Tensor:
        return w.reshape(cast(Tensor, self.module.weight).shape)  # (out, c, *k)

    def _last(self, y: Tensor) -> Tensor:
        """A convolution's output ``(N, ch, *spatial)`` (unbatched ``(ch, *spatial)``) as ``(N, *spatial, ch)`` (a view)."""
        return y.movedim(y.dim() - 1 - self.spatial, -1)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        """``conv(x, W0) + b`` with the module's settings, channels last (``(N, *spatial, out)``)."""
        return self._last(self.conv._conv_forward(x, weight, bias))

    def forward_no_bias(self, x: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> Tensor:
        return self._last(self.conv._conv_forward(x, weight, None))

    def down(self, x: Tensor, a: Tensor, dtype: torch.dtype) -> Tensor:
        """``x Aᵀ`` for every patch: ``conv(x, A as an (r, c, *k) kernel)`` with the module's stride, padding, dilation
        and ``padding_mode``, channels last (``(N, *spatial, r)``)."""
        kernel = a.reshape(a.shape[0], *cast(Tensor, self.module.weight).shape[1:])  # (r, c, *k)
        return self._last(self.conv._conv_forward(x.to(dtype), kernel, None))  # (N, *spatial, r)

    def up(self, h: Tensor, b: Tensor) -> Tensor:
        """``h Bᵀ`` for every position: ``conv(h, B as an (out, r, 1, ...) kernel)`` on ``h``'s channels-first memory
        (``h`` as :meth:`down` returns it, a view of ``(N, r, *spatial)``), channels last (``(N, *spatial, out)``, a view
        of a channels-first tensor: no copy of ``h``, of the result or of their gradients, as ``h @ Bᵀ`` on the views
        made)."""
        first = h.movedim(-1, h.dim() - 1 - self.spatial)  # (N, r, *spatial)
        return self._last(_CONV[self.spatial](first, b.reshape(*b.shape, *(1,) * self.spatial)))  # (N, *spatial, out)

    def add_update(self, result: Tensor, update: Tensor) -> Tensor:
        """``result + update`` out of place (rounded once into ``result``'s dtype, :meth:`BaseKind.add_update`):
        ``result`` is a channels-last view of the convolution's output, and an in-place add into it would make autograd
        copy the whole output in backward."""
        return (result + update).to(result.dtype)

    def to_output(self, y: Tensor) -> Tensor:
        """``(N, *spatial, out)`` back to the module's ``(N, out, *spatial)``, contiguous as the module returns it (code
        after a convolution may ``.view`` its output): a view, no copy, when ``y``'s memory is channels first (the
        methods' results are, from :meth:`forward`, :meth:`down` and :meth:`up`)."""
        return y.movedim(-1, y.dim() - 1 - self.spatial).contiguous()

    def weight_grad(self, x: Tensor, d: Tensor) -> Tensor:
        """``∂L/∂W0`` (``out x in``) from the input ``x`` and the gradient ``d`` of the module's output (channels first, as
        the module returns it): ``Σ_patches dᵀ · patches(x)``, torch's convolution weight gradient with the module's
        stride, dilation and padding (as ``_conv_forward`` pads: zeros by the numbers, else ``x`` padded first by its
        ``padding_mode`` or for ``"same"``)."""
        conv = self.conv
        if x.dim() == self.spatial + 1:  # an unbatched call
            x, d = x.unsqueeze(0), d.unsqueeze(0)
        x = x.to(d.dtype)
        padding = conv.padding
        if conv.padding_mode != "zeros" or isinstance(padding, str):  # torch's own explicit padding for these
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0  # (N, c, *padded)
        shape = cast(Tensor, self.module.weight).shape
        g = _CONV_WEIGHT_GRAD[self.spatial](x, shape, d, conv.stride, padding, conv.dilation, 1)  # (out, c, *k)
        return g.flatten(1)  # out x in

    def peft_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """PEFT's conv weights: ``lora_A`` ``(r, c, *k)``, ``lora_B`` ``(out, r, 1, ...)``, magnitude ``(1, out, 1, ...)``."""
        shape = tuple(int(n) for n in cast(Tensor, self.module.weight).shape)
        ones = (1,) * self.spatial
        return (rank, *shape[1:]), (shape[0], rank, *ones), (1, shape[0], *ones)

    def peft_mismatch(self, peft: peft_version.Version | None = None) -> str | None:
        """PEFT 0.21 (and older, and a PEFT that does not say) builds ``lora_A`` as ``Conv(c, r, kernel, stride,
        padding)``: without a ``padding_mode`` (zeros) and without the base's dilation, so its forward then differs from
        its own merge (and with a dilated kernel the shapes differ). PEFT 0.22 passes both (``dilation``,
        ``padding_mode``; its DoRA's base term is the module's ``_conv_forward``): ``None`` for it."""
        if peft_version.at_least(peft, peft_version.PEFT_022):
            return None
        if self.conv.padding_mode != "zeros":
            return (f"padding_mode={self.conv.padding_mode!r}: HF PEFT 0.21 and older build lora_A padding with zeros "
                    "whatever the base does, so their forward differs from W0 + ΔW")
        if any(d != 1 and k != 1 for d, k in zip(self.conv.dilation, self.conv.kernel_size)):
            return (f"dilation={tuple(self.conv.dilation)}: HF PEFT 0.21 and older build lora_A without the base's "
                    "dilation, so their forward differs from W0 + ΔW (or fails on the shapes)")
        return None

    def describe(self) -> str:
        return f"nn.{next(t for t in CONV_TYPES if isinstance(self.module, t)).__name__}"

    def layout(self) -> dict[str, list[int]]:
        """``{"weight_shape": [out, c, *k]}``: ``in = c·∏k`` alone does not say which input values a column of ``W0``
        (and of ``A``) multiplies, so ``load`` refuses a convolution of another kernel (or a ``Linear``) with the same
        ``out x in``."""
        return {"weight_shape": [int(n) for n in cast(Tensor, self.module.weight).shape]}


KINDS: list[type[BaseKind]] = [Bnb4bitKind, Bnb8bitKind, ConvKind, EmbeddingKind, Conv1DKind, BaseKind]  # asked in this order


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
    """The dispatcher: the :class:`BaseKind` for ``module``.

    ``TypeError`` for a module no kind handles or with a non-float weight that is no bitsandbytes layer;
    ``ImportError``/``ValueError`` for a bitsandbytes layer rankwise cannot use (:func:`rankwise.quant.check_adaptable`).
    The refusals of a module its kind matches but cannot reproduce (:meth:`BaseKind.check_module`) are not asked here:
    they run once, where attach / load / import_peft choose the modules (:func:`rankwise.targeting.check_target`),
    before anything changes.
    """
    quant.check_adaptable(module)
    kind = kind_class(module)
    if kind is None:
        raise TypeError(f"cannot adapt a {type(module).__name__}: rankwise adapts {', '.join(supported_types())} layers")
    return kind(module)


def supported_types() -> tuple[str, ...]:
    """The module types the registered kinds adapt, for messages (``("Linear", "Conv1D", "Embedding", "Conv1d/2d/3d")``
    built in)."""
    return tuple(dict.fromkeys(kind.type_name for kind in reversed(KINDS)))


__all__ = [
    "CONV_TYPES",
    "KINDS",
    "BaseKind",
    "Bnb4bitKind",
    "Bnb8bitKind",
    "Conv1DKind",
    "ConvKind",
    "EmbeddingKind",
    "InOutKind",
    "base_kind",
    "check_stored_weight",
    "forward_bypassed",
    "is_conv1d",
    "kind_class",
    "register_kind",
    "supported_types",
    "takes_ids",
]
