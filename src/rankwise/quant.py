"""Quantised base layers (bitsandbytes 4-bit and 8-bit): detection, dequantisation, the base forward.

rankwise adapts bitsandbytes' ``Linear4bit`` (nf4 or fp4, with or without double quantisation; also
its ``LinearNF4``/``LinearFP4`` subclasses) and ``Linear8bitLt`` (int8 weights, ``has_fp16_weights=False``)
as it adapts ``nn.Linear``, QLoRA-style:

* the quantised weight is shared, frozen and never written; the base path is the bitsandbytes module's
  own ``forward`` (its matmul), the adapter path computes in fp32;
* methods that need ``W0`` itself dequantise **one layer at a time, when they need it**, via
  :func:`dequantize`: EDoRA's SVD and norm terms, GoRA's importance and DoRA's ``‖W0‖²_row``, once at
  attach; the base fingerprint when saving and loading. DoRA's per-step row norm needs ``W0 Aᵀ``: over a
  4-bit base computing in fp32 (without dropout) A's rows ride along the base forward, so no extra
  dequantisation; otherwise (8-bit, dropout, bf16 compute) it dequantises per step, as HF PEFT's QDoRA does.
  GoRA's gradient comes from the layer's input and output gradients (a quantised weight has no ``.grad``);
* ``merge`` is refused (rounding ``W0 + ΔW`` back into 4 or 8 bits loses most of the update, and the
  original bits could not be restored); ``rankwise.detach(model, merge=True)`` instead gives float
  ``nn.Linear`` layers holding ``dequantised W0 + ΔW`` (:func:`float_linear`, :func:`dequantize_model`).

Detection reads class names (no import), so a quantised model met without bitsandbytes importable
gets an error naming the extra to install (``pip install 'rankwise[quant]'``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from .slots import set_submodule

QUANT_EXTRA = "pip install 'rankwise[quant]'"
QUANT_TYPES: dict[str, str] = {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}  # bitsandbytes class -> kind
_PARAM_TYPES = ("Params4bit", "Int8Params")  # bitsandbytes' weight classes


def bnb() -> Any:
    """The ``bitsandbytes`` module; ``ImportError`` naming the extra when it cannot be imported."""
    try:
        import bitsandbytes
    except Exception as exc:  # installed but broken raises anything (OSError, RuntimeError, ...): one line
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        how = QUANT_EXTRA if isinstance(exc, ModuleNotFoundError) else "fix or reinstall it (pip install --force-reinstall bitsandbytes)"
        raise ImportError(
            f"this model has bitsandbytes-quantised layers, and adapting them needs bitsandbytes, which cannot be "
            f"imported ({type(exc).__name__}: {first}): {how}"
        ) from None
    return bitsandbytes


def quant_kind(module: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (or subclass), else ``None``."""
    for cls in type(module).__mro__:
        if cls.__name__ in QUANT_TYPES and cls.__module__.startswith("bitsandbytes"):
            return QUANT_TYPES[cls.__name__]
    return None


def is_quantized(module: nn.Module) -> bool:
    return quant_kind(module) is not None


def quant_block(module: nn.Module) -> int:
    """How many consecutive values of the flattened ``out x in`` weight share one scale: the 4-bit
    ``blocksize`` (64 by default), or a whole row (int8's row-wise absmax)."""
    layer: Any = module  # a bitsandbytes layer (untyped)
    if quant_kind(module) == "4bit":
        state = getattr(layer.weight, "quant_state", None)
        block: Any = getattr(state, "blocksize", None) or getattr(layer.weight, "blocksize", 64)
        return int(block)
    return int(layer.in_features)


def describe_quant(module: nn.Module) -> str:
    """A short label: ``"nf4"``, ``"fp4"``, ``"nf4 (double quant)"``, ``"int8"``; ``""`` for a float layer."""
    kind = quant_kind(module)
    if kind == "8bit":
        return "int8"
    if kind == "4bit":
        state = getattr(module.weight, "quant_state", None)
        qt = getattr(state, "quant_type", None) or getattr(module.weight, "quant_type", "4bit")
        nested = bool(getattr(state, "nested", False) or getattr(module.weight, "compress_statistics", False))
        return f"{qt} (double quant)" if nested else str(qt)
    return ""


def check_adaptable(module: nn.Module) -> str | None:
    """The layer's quantisation kind (``None``: a float layer); raises for what rankwise cannot adapt.

    ``TypeError`` names the type of a layer with a non-float weight that is not a supported bitsandbytes
    layer; ``ImportError`` names the extra when a bitsandbytes layer is met without bitsandbytes.
    """
    kind = quant_kind(module)
    weight = getattr(module, "weight", None)
    if kind is None:
        if weight is not None and not torch.is_floating_point(weight):
            raise TypeError(
                f"cannot adapt a {type(module).__name__} whose weight ({type(weight).__name__}) has dtype {weight.dtype}: "
                f"rankwise adapts floating-point weights and bitsandbytes {' / '.join(QUANT_TYPES)} layers "
                f"({QUANT_EXTRA}); dequantise this layer first or leave it out of target_modules"
            )
        return None
    bnb()
    if kind == "4bit" and getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        raise ValueError(
            f"this {type(module).__name__}'s weight was repacked by bitsandbytes for CPU inference (an eval-mode forward "
            "without gradients ran before attach); training through it fails. Reload the model, or call "
            "rankwise.quant.keep_layout(model) right after loading it"
        )
    if kind == "4bit" and getattr(weight, "bnb_quantized", True) is False:
        raise ValueError(
            f"this {type(module).__name__}'s weight is not quantised yet: bitsandbytes quantises it when the layer moves "
            "to a device (`.to(device)`); attach after that, so the adapter is built on the 4-bit weights the layer "
            "computes with"
        )
    if kind == "8bit" and weight is not None and weight.dtype != torch.int8:
        raise TypeError(
            f"cannot adapt a {type(module).__name__} with has_fp16_weights=True (weight dtype {weight.dtype}): rankwise "
            "adapts frozen int8 Linear8bitLt layers (has_fp16_weights=False, as transformers' load_in_8bit loads them)"
        )
    return kind


def parameter_count(p: Tensor) -> int:
    """How many weights ``p`` holds. A quantised bitsandbytes 4-bit weight packs two per byte of its storage,
    padded to whole storage elements (15 values take 8 bytes), so it counts the shape it was quantised from
    (``quant_state.shape``); one not yet quantised (a ``Linear4bit`` before its move to a device) holds its values
    as they are. A DeepSpeed ZeRO-3 parameter counts its whole shape (``ds_shape``; outside a gather the tensor is
    an empty placeholder), as FSDP2's ``DTensor`` does by itself."""
    if getattr(p, "ds_id", None) is not None and getattr(p, "ds_shape", None) is not None:
        return int(torch.Size(p.ds_shape).numel())  # type: ignore[attr-defined]
    if type(p).__name__ == "Params4bit":
        state = getattr(p, "quant_state", None)
        if state is not None:
            return int(torch.Size(state.shape).numel())
        if getattr(p, "bnb_quantized", True):
            return p.numel() * p.element_size() * 2  # packed, its shape lost: two per byte
    return p.numel()


def keep_layout(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU inference repacking on every 4-bit layer in ``model`` (or ``model`` itself);
    returns how many layers it applies to.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) rewrites a 4-bit weight into a packed layout at its first
    eval-mode forward without gradients, then computes in bf16; a training forward after that fails for
    layers with a bias (and computes differently for the others). rankwise calls this on each layer it
    adapts (so their weights keep their bytes, and eval computes what training computes); the harness calls
    it on the whole model, so evaluating mid-run leaves training intact.
    """
    modules = [m for m in model.modules() if quant_kind(m) == "4bit"]
    for m in modules:
        if hasattr(m, "support_avx512bf16_for_cpu"):
            cast(Any, m).support_avx512bf16_for_cpu = False
    return len(modules)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantised layer computes in: ``Linear4bit.compute_dtype``, else its bias's dtype, else fp32."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None and torch.is_floating_point(bias) else torch.float32


def float_dtype(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The float dtype a quantised layer takes and returns (bitsandbytes casts its output back to the input's):
    a 4-bit weight's ``quant_state.dtype`` (the checkpoint's dtype it was quantised from); an int8 layer keeps
    no such record, so its bias's dtype (bitsandbytes casts the bias to the input's), else ``default`` (for a
    whole model: :func:`model_float_dtype`, the dtype its other layers hand this one)."""
    dtype = getattr(getattr(getattr(module, "weight", None), "quant_state", None), "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None and torch.is_floating_point(bias) else default


def model_float_dtype(model: nn.Module, exclude: Iterable[Tensor] = ()) -> torch.dtype:
    """The float dtype most of ``model``'s float parameters have (counted by size; quantised weights, which are
    not float, and ``exclude`` left out), fp32 when it has none: what the model's float layers compute in, so
    what an int8 layer without a bias, which records no float dtype, takes and returns."""
    skip = {id(t) for t in exclude}
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in skip:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=lambda d: sizes[d]) if sizes else torch.float32


@torch.no_grad()
def dequantize(module: nn.Module) -> Tensor:
    """One quantised layer's weight as a new fp32 ``out x in`` tensor (the quantised weight is not touched)."""
    kind = quant_kind(module)
    functional = bnb().functional
    layer: Any = module  # a bitsandbytes layer (untyped)
    weight = layer.weight
    if kind == "4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a CPU weight for its AVX512-BF16 inference kernel (eval mode, no grad);
            # its inverse edits the state it is given, so give it a copy
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        return functional.dequantize_4bit(data, state).float()
    if kind == "8bit":
        scb = getattr(weight, "SCB", None)
        if scb is None:  # after the first forward bitsandbytes keeps the row scales on the module's state
            scb = layer.state.SCB
        return functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantised layer")


def dense_weight(module: nn.Module) -> Tensor:
    """The layer's weight in its own layout: dequantised (fp32) for a quantised layer, else ``module.weight``."""
    return dequantize(module) if is_quantized(module) else cast(Tensor, module.weight)


def base_forward(module: nn.Module, x: Tensor, training: bool) -> Tensor:
    """The bitsandbytes layer's own forward (its matmul), in the adapter layer's train/eval mode.

    The base module sits outside the model's module tree once adapted, so ``model.train()`` /
    ``model.eval()`` do not reach it: its mode is set from the adapter layer's here.
    """
    if module.training != training:
        module.train(training)
    out = module(x)
    # bitsandbytes' 4-bit matmul with a bias returns a view of its autograd node's output, which an adapter's
    # in-place add would make autograd refuse in training: give the adapter a tensor of its own (as PEFT clones)
    return out.clone() if out._is_view() else out


def merge_refusal(module: nn.Module) -> ValueError:
    """The error ``merge`` raises on a quantised base: why, and what to do instead."""
    return ValueError(
        f"cannot merge into a bitsandbytes {describe_quant(module)} weight ({type(module).__name__}): rounding "
        "W0 + ΔW back into the quantised format loses most of the update (it is far smaller than one quantisation "
        "step), and unmerge could not restore the original bits. Keep the adapter unmerged (it trains, saves and "
        "exports as it is), or call rankwise.detach(model, merge=True) for a float model (dequantised W0 + update)"
    )


def float_linear(module: nn.Module, weight: Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` (``out x in``) and the quantised ``module``'s bias, in ``dtype``
    (default: the float dtype the module takes and returns, :func:`float_dtype`, so the model around it still
    fits), on the weight's device."""
    dtype = dtype or float_dtype(module)
    bias = getattr(module, "bias", None)
    out_f, in_f = weight.shape
    with torch.inference_mode(False):  # normal parameters inside inference mode too: the merged model can train after
        # built on the meta device and given empty storage: an initialised Linear would draw throwaway weights from
        # torch's global generator and move the user's random stream
        linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=dtype).to_empty(device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    for name, p in linear.named_parameters():  # frozen; and loaded from the checkpoint if the quantised one was
        p.requires_grad_(False)
        if getattr(getattr(module, name, None), "_is_hf_initialized", False):
            p._is_hf_initialized = True  # type: ignore[attr-defined]  # transformers' mark: attach's "newly initialised" check
    linear.train(module.training)
    return linear


def dequantize_model(model: nn.Module, default_dtype: torch.dtype | None = None) -> list[str]:
    """Replace every bitsandbytes layer left in ``model`` by a float ``nn.Linear`` (one layer at a time)
    and drop transformers' quantisation markers, so ``save_pretrained`` writes a plain float checkpoint.

    Each layer gets the float dtype it takes and returns (:func:`float_dtype`); an int8 layer without a bias
    gets ``default_dtype`` (default: :func:`model_float_dtype`, the model's own). Returns the names replaced.
    """
    names = [name for name, m in model.named_modules() if name and is_quantized(m)]
    default = default_dtype or model_float_dtype(model)
    for name in names:
        module = model.get_submodule(name)
        set_submodule(model, name, float_linear(module, dequantize(module), float_dtype(module, default)))
    if names or getattr(model, "is_quantized", False):
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
        for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
            if hasattr(model, attr):
                delattr(model, attr)
        if hasattr(model, "is_quantized"):
            cast(Any, model).is_quantized = False
    return names


__all__ = [
    "QUANT_EXTRA", "base_forward", "check_adaptable", "compute_dtype", "dense_weight", "dequantize",
    "dequantize_model", "describe_quant", "float_dtype", "float_linear", "is_quantized", "keep_layout", "merge_refusal",
    "model_float_dtype",
    "parameter_count", "quant_kind",
]
