"""RAC-LoRA: randomized asymmetric chain of LoRA (Malinovsky et al. 2024, arXiv 2410.08305).

Training is a chain of links ``t = 0, 1, ...``. In link ``t`` one factor is *sampled* (Gaussian,
the sketch) and frozen, the other starts at zero and is trained; the adapted layer computes::

    h = x W0ᵀ + b + x Cₐᵀ C_bᵀ + s · dropout(x) A_tᵀ B_tᵀ,      C_b Cₐ = Σ_{τ<t} s B_τ A_τ

At the link's end (:func:`rankwise.step` every ``link_steps`` optimizer steps, or
:func:`end_link`) the link is merged — ``s B_t A_t`` is appended to the chain's stacked factors
``(Cₐ, C_b)`` (scale baked into ``C_b``) — the trained factor is re-zeroed, the sketch resampled,
and the optimizer state of both factors dropped. The model's function does not change at a link
boundary (the product moves from the link into the chain, and the new link's product is zero).

Optimizer state at a link end (``keep_optimizer_state``): ``False`` (default) drops it for both
factors, so each link starts like a fresh LoRA (Adam's moments and step count at zero).
``True`` keeps it for every factor that is trained again in the next link (the trained factor; with
``train_both`` both), as the authors' code does (one Adam over the whole chain); a factor that becomes
the sketch (``frozen="alternate"``) still loses its state, so it never carries moments from a link
where it was frozen. Either way the merge is exact and ``step`` leaves the outputs unchanged; with
kept moments the first step of a link already moves the re-zeroed factor along the old momentum.

Why a stacked record and not ``W ← W + s B A``: writing into the base weight rounds every link into
its dtype (in bf16 a small ``s B A`` is mostly lost), and would destroy the original ``W0`` that
``unmerge``/``detach`` must restore bit for bit. The stacked factors are exact in fp32, cost a
rank-``T r`` LoRA in the forward pass, are saved as ordinary adapter buffers, and *are* the chain's
PEFT export (a LoRA of rank ``T r``). When ``T r`` would exceed ``min(in, out)`` the record is
re-factored losslessly by an SVD to rank ``min(in, out)``; :func:`compress_chain` truncates it.

The analysed step (paper §4): with ``A`` frozen, training ``B`` is projected gradient descent on
``W``, ``W⁺ = W − γ ∇f(W) H_A``, ``H_A = Aᵀ(AAᵀ)†A``; for Gaussian sketches ``E[H_A] = (r/n) I``, so
the chain converges to the *full* fine-tuning solution (rate ``(1 − γ μ r/n)^T`` under PL).

The sketch ``A ~ N(0, σ²)`` with ``σ = sketch_scale / √n`` (``n`` the dimension the sketch
contracts: ``in`` for ``A``, ``out`` for ``B``). With the default ``sketch_scale = 1`` the sketch's
rows are nearly orthonormal (``AAᵀ ≈ I``), so an SGD step of size ``η`` on ``B`` *is* the analysed
step ``W − η s² ∇f H_A``, at every layer width, and LoRA's learning rates carry over (LoRA's
Kaiming-uniform ``A`` has ``σ² = 1/(3 in)``). The follow-up code's unit variance is
``sketch_scale = √n``; under SGD it multiplies the effective step by ``n`` (measured in ``docs/raclora.md``);
under Adam, whose update of ``B`` is normalised per element, by about ``√n``.

Over an ``nn.Embedding`` (``in = num_embeddings``, ``out = embedding_dim``) ``x Aᵀ`` is the lookup ``Aᵀ[ids]``, no
dropout applies, the chain is merged the same way (into ``(Cₐ, C_b)``, never into the embedding table), and a sampled
``A`` has its ``padding_idx`` column zeroed, so the padding row's update stays zero (``σ = sketch_scale / √n`` with
``n = num_embeddings``).

The same machinery gives the paper's baselines, one flag apart:

* RAC-LoRA: ``train_both=False, chain=True`` (default);
* Asymmetric LoRA: ``train_both=False, chain=False`` (one link, never merged);
* Chain of LoRA (COLA): ``train_both=True, chain=True`` (both factors trained, merge, restart);
* plain LoRA with a Gaussian ``A``: ``train_both=True, chain=False``.

With ``train_both`` nothing is frozen: ``frozen`` then names the factor initialised Gaussian (the
other starts at zero) — the paper's "A Gaussian, B zero" / "A zero, B Gaussian" columns.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, check_number, check_positive_int
from ..distributed import assign, check_unflattened, shared_seed, whole
from ..fused import FusedInputs
from ..layer import AdapterLayer, PeftFactors, kept_tensor, wide_dtype
from ..optim import check_optimizer, reset_optimizer_state
from ..registry import BuildResult, Method, register_method, simple_build
from ..state import RankwiseState, adapter_layers, adapter_set, get_state, trained_adapters

FROZEN_CHOICES = ("A", "B", "alternate")


@dataclass(frozen=True)
class RacLoraConfig(AdapterConfig):
    """RAC-LoRA and its cousins (see the module docstring). Common fields: :class:`AdapterConfig`.

    Attributes:
        link_steps: optimizer steps per link (``rankwise.step`` ends a link every ``link_steps``
            calls); ``None``: links end only when you call :func:`rankwise.methods.raclora.end_link` (e.g. per epoch).
        frozen: the sampled (random, frozen) factor: ``"A"`` (train ``B`` from zero, the paper's
            default), ``"B"`` (train ``A`` from zero), or ``"alternate"`` (``A`` in even links, ``B`` in
            odd ones). With ``train_both`` it names the Gaussian-initialised factor.
        sketch_scale: the sketch's standard deviation times ``√n`` (``n``: the dimension it contracts).
        chain: merge and restart at link ends (``False``: a single link — Asymmetric LoRA / LoRA).
        train_both: train both factors (COLA / LoRA) instead of freezing the sketch.
        keep_optimizer_state: at a link end keep the optimizer's state (Adam's moments) of the factor(s)
            trained in the next link, as the authors' code does; ``False`` (default) resets it (see the
            module docstring).
        seed: seeds every link's sketch (layer ``i``, link ``t``); ``None`` draws one seed from torch's
            global RNG at attach (broadcast from rank 0 under ``torch.distributed``) and records it.
    """

    method: ClassVar[str] = "raclora"

    link_steps: int | None = 500
    frozen: str = "A"
    sketch_scale: float = 1.0
    chain: bool = True
    train_both: bool = False
    keep_optimizer_state: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frozen not in FROZEN_CHOICES:
            raise ValueError(f"frozen must be one of {FROZEN_CHOICES}, got {self.frozen!r}")
        check_positive_int("link_steps", self.link_steps, none="links end by rankwise.end_link")
        check_number("sketch_scale", self.sketch_scale)

    @classmethod
    def asymmetric(cls, **kwargs: Any) -> "RacLoraConfig":
        """Asymmetric LoRA: one frozen random factor, one trained factor, one link (``chain=False``)."""
        return cls(**{"chain": False, "train_both": False, **kwargs})

    @classmethod
    def cola(cls, **kwargs: Any) -> "RacLoraConfig":
        """Chain of LoRA (COLA): both factors trained; merge and restart every link (``train_both=True``)."""
        return cls(**{"chain": True, "train_both": True, **kwargs})

    @classmethod
    def lora(cls, **kwargs: Any) -> "RacLoraConfig":
        """Plain LoRA with a Gaussian sketch initialisation (``train_both=True, chain=False``): the paper's LoRA row."""
        return cls(**{"chain": False, "train_both": True, **kwargs})


def resolve_seed(seed: int | None) -> int:
    """Deprecated: :func:`rankwise.distributed.shared_seed`, every method's one seed helper."""
    warnings.warn("rankwise.methods.raclora.resolve_seed is deprecated: use rankwise.distributed.shared_seed",
                  DeprecationWarning, stacklevel=2)
    return shared_seed(seed)


def sketch_generator(seed: int, index: int, link: int) -> torch.Generator:
    """The CPU generator for layer ``index``'s sketch in link ``link``: the same on every device and rank."""
    return torch.Generator().manual_seed(((int(seed) * 1_000_003 + index) * 1_000_033 + link) % (2**63 - 1))


class RacLoraLinear(AdapterLayer):
    """A link ``s·B A`` (one factor a frozen Gaussian sketch) plus the merged chain ``C_b Cₐ`` over ``W0``."""

    trainable: tuple[str, ...] = ("lora_a", "lora_b")  # narrowed per instance in __init__ (the config decides)
    lr_multiplied: ClassVar[tuple[str, ...]] = ("lora_b",)
    lora_a: Tensor  # a parameter or the frozen sketch buffer (typed here: nn.Module's __getattr__ is untyped)
    lora_b: Tensor
    chain_a: Tensor
    chain_b: Tensor
    links: Tensor
    sketch_seed: Tensor

    def __init__(
        self, base: nn.Module, config: RacLoraConfig, rank: int, *, index: int = 0, seed: int = 0, init: bool = True
    ) -> None:
        super().__init__(base, config, rank)
        self.index: int = index
        self.frozen: str = config.frozen
        self.sketch_scale: float = float(config.sketch_scale)
        self.train_both: bool = config.train_both
        # which Parameters the optimizer must hold: the trained factor, or both when the role alternates
        both = config.train_both or config.frozen == "alternate"
        self.trainable = ("lora_a", "lora_b") if both else ("lora_b",) if config.frozen == "A" else ("lora_a",)
        # a factor that is never trained is the sketch: a buffer (saved, not a parameter, never in an optimizer)
        for name, shape in (("lora_a", (rank, self.in_features)), ("lora_b", (self.out_features, rank))):  # r x in, out x r
            if name in self.trainable:
                self.register_parameter(name, nn.Parameter(self.new_tensor(*shape)))
            else:
                self.register_buffer(name, self.new_tensor(*shape))
        self.lora_a: Tensor
        self.lora_b: Tensor
        self.register_buffer("chain_a", self.new_tensor(0, self.in_features))  # k x in
        self.register_buffer("chain_b", self.new_tensor(self.out_features, 0))  # out x k, scale baked in
        # shape (1,), not 0-d: safetensors-friendly; links = merged links so far, sketch_seed = the chain's seed
        self.register_buffer("links", torch.zeros(1, dtype=torch.int64, device=self.weight.device))
        self.register_buffer("sketch_seed", torch.tensor([int(seed)], dtype=torch.int64, device=self.weight.device))
        self.chain_factor: float = 1.0  # what rankwise.scaled multiplies the chain record by (rescaled), else 1
        if init:
            self.init_link()

    # ------------------------------------------------------------------ the link
    def sampled(self) -> str:
        """The factor sampled (and, unless ``train_both``, frozen) in the current link: ``"A"`` or ``"B"``."""
        if self.frozen == "alternate":
            return "A" if int(self.links) % 2 == 0 else "B"
        return self.frozen

    def link_trained(self) -> tuple[Tensor, ...]:
        """The factor(s) trained in the current link: both with ``train_both``, else the one not sampled."""
        if self.train_both:
            return (self.lora_a, self.lora_b)
        return (self.lora_b,) if self.sampled() == "A" else (self.lora_a,)

    def link_factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` for the forward pass, the frozen sketch detached (no gradient, skipped by optimizers)."""
        if self.train_both:
            return self.lora_a, self.lora_b
        if self.sampled() == "A":
            return self.lora_a.detach(), self.lora_b
        return self.lora_a, self.lora_b.detach()

    @torch.no_grad()
    def init_link(self) -> None:
        """Named init step: sample the sketch ``N(0, (sketch_scale/√n)²)`` for link ``links``; zero the other factor."""
        g = sketch_generator(int(self.sketch_seed), self.index, int(self.links))
        if self.sampled() == "A":
            sketch = torch.randn(self.rank, self.in_features, generator=g) * (self.sketch_scale / math.sqrt(self.in_features))
            self.kind.clear_padding(sketch)  # an embedding's padding row keeps a zero update
            assign(self.lora_a, sketch)  # r x in
            self.lora_b.zero_()
        else:
            sketch = torch.randn(self.out_features, self.rank, generator=g) * (self.sketch_scale / math.sqrt(self.out_features))
            assign(self.lora_b, sketch)  # out x r
            self.lora_a.zero_()

    @torch.no_grad()
    def end_link(self) -> None:
        """Merge ``s B_t A_t`` into the chain record (exact, fp32), then start link ``t+1``.

        Parameters are changed in place only (never replaced), so optimizers, schedulers, DDP, FSDP2 and
        HF Trainer keep their references. A link whose product is exactly zero adds nothing.
        """
        a, b = self.whole_link()
        if bool(a.any()) and bool(b.any()):
            chain_a = torch.cat([self.chain_a, a])  # (k + r) x in
            chain_b = torch.cat([self.chain_b, self.scale * b], dim=1)  # out x (k + r)
            if chain_a.shape[0] > min(self.in_features, self.out_features):
                chain_a, chain_b, _ = refactor(chain_a, chain_b, min(self.in_features, self.out_features))
            self.chain_a = kept_tensor(chain_a)  # a link ended inside inference mode: still normal tensors
            self.chain_b = kept_tensor(chain_b)
        self.links += 1
        self.init_link()

    def check_link_shapes(self) -> None:
        """Refuse FSDP1's flattened shards (outside its forward) before a link end changes anything."""
        check_unflattened("lora_a", self.lora_a, (self.rank, self.in_features))
        check_unflattened("lora_b", self.lora_b, (self.out_features, self.rank))

    def whole_link(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of the current link, detached and whole (FSDP2 shards gathered: every rank calls this)."""
        self.check_link_shapes()
        return whole(self.lora_a.detach()), whole(self.lora_b.detach())  # r x in, out x r

    # ------------------------------------------------------------------ the contract
    def rescaled(self, factor: float) -> dict[str, Any]:
        """As :meth:`AdapterLayer.rescaled`, and the chain record's product too: the whole update
        ``C_b Cₐ + s·B A`` (what :meth:`peft_factors` exports as one LoRA) is multiplied by ``factor``."""
        old = super().rescaled(factor)
        old["chain_factor"] = self.chain_factor
        self.chain_factor = self.chain_factor * factor
        return old

    def chain_b_now(self) -> Tensor:
        """``C_b`` (``out x k``) as the forward uses it: times :attr:`chain_factor` inside ``rankwise.scaled``."""
        return self.chain_b if self.chain_factor == 1.0 else self.chain_b * self.chain_factor

    def chain_delta(self) -> Tensor:
        """``Σ_{τ<t} s B_τ A_τ = C_b Cₐ`` in :attr:`merge_dtype`, ``out x in``."""
        return self.wide(self.chain_b_now()) @ self.wide(self.chain_a)  # out x in

    def forward_factors(self) -> tuple[Tensor, Tensor]:
        """``(A, s·B)`` of the whole update: chain and current link as one rank-``(k + r)`` product
        (``(k + r) x in``, ``out x (k + r)``); the frozen sketch and the chain carry no gradient."""
        a, b = self.link_factors()
        b = b * self.scale  # out x r: the scale on the small factor, not on the activations
        if self.chain_a.shape[0]:
            a = torch.cat([self.chain_a, a])  # (k + r) x in
            b = torch.cat([self.chain_b_now(), b], dim=1)  # out x (k + r)
        return a, b

    def fused_inputs(self) -> FusedInputs:
        """The whole update's factors (chain and link; the sketch detached): one autograd node
        (:class:`rankwise.fused.LowRankLinear`), LoRA's backward."""
        return FusedInputs(*self.forward_factors())

    def adapter_forward(self, x: Tensor) -> Tensor:
        """The plain implementation (eval, dropout, quantised base; what the fused path is tested against)::

            h = x W0ᵀ + b + x Cₐᵀ C_bᵀ + s · dropout(x) A_tᵀ B_tᵀ

        The merged chain is part of ``W`` (``W ← W + s B_t A_t``), so dropout acts on the current link only."""
        return self.kind.add_update(self.base_forward(x), self.delta_forward(x))

    def delta_forward(self, x: Tensor) -> Tensor:
        """``x Cₐᵀ C_bᵀ + s · dropout(x) A_tᵀ B_tᵀ`` alone (beside other adapters on this module), in the adapter
        dtype: the update the stack adds to the layers before and rounds once (not this layer's rounded output less
        a second base matmul, review round 61)."""
        x_d, dtype, down, up = self.dropout(x), self.adapter_dtype, self.kind.down, self.kind.up  # x Aᵀ, h Bᵀ
        a, b = self.forward_factors()  # (k + r) x in, out x (k + r): the chain's k rows first
        k = self.chain_a.shape[0]
        if isinstance(self.dropout, nn.Identity) or not k:
            return up(down(x_d, a, dtype), b)  # (..., out)
        # the chain is merged into W: x Cₐᵀ C_bᵀ on x itself, dropout on the current link only
        return up(down(x, a[:k], dtype), b[:, :k]) + up(down(x_d, a[k:], dtype), b[:, k:])  # (..., out)

    def merged_weight(self) -> Tensor:
        w0 = self.wide(self.unmerged_base_weight())  # out x in
        return w0 + self.chain_delta() + self.scale * (self.wide(self.lora_b) @ self.wide(self.lora_a))  # out x in

    def peft_factors(self) -> PeftFactors:
        """The whole chain as one LoRA of rank ``k + r`` (``k`` = chain rank), scale baked into ``B``.

        The current link is left out when its product is exactly zero (e.g. right after a link end).
        """
        wide = wide_dtype(self.adapter_dtype)  # fp32, or fp64 for an fp64 chain (never rounded to fp32)
        a = self.lora_a.detach().to(wide)  # r x in
        b = self.scale * self.lora_b.detach().to(wide)  # out x r
        chain_a, chain_b = self.chain_a.to(wide), self.chain_b_now().to(wide)  # k x in, out x k
        if self.chain_a.shape[0] and not (bool(a.any()) and bool(b.any())):
            return PeftFactors(chain_a, chain_b, 1.0)
        return PeftFactors(torch.cat([chain_a, a]), torch.cat([chain_b, b], dim=1), 1.0)

    def resize_for_load(self, shapes: dict[str, torch.Size]) -> None:
        """Give the chain record the saved rank before a saved adapter is filled in (it grows in training), in the
        dtype the record holds now (``load_state_dict`` keeps a module's dtypes; :func:`rankwise.load` set the file's)."""
        if "chain_a" in shapes and len(shapes["chain_a"]) == 2:
            self.chain_a = self.chain_a.new_zeros(int(shapes["chain_a"][0]), self.in_features)  # k x in
        if "chain_b" in shapes and len(shapes["chain_b"]) == 2:
            self.chain_b = self.chain_b.new_zeros(self.out_features, int(shapes["chain_b"][1]))  # out x k

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """As :class:`AdapterLayer`'s, but an empty chain record absent from ``state_dict`` is not a missing key.

        Accelerate's ``save_state`` (safetensors) takes every empty tensor for one storage shared by all (their storage
        pointer is 0), keeps the first and drops the others, so a RAC-LoRA / COLA model saved before its first link
        ended (or an asymmetric one, whose record stays empty) came back without them and ``load_state`` raised
        "Missing key(s)". A ``chain_a`` / ``chain_b`` key is forgiven only where the state says no link has ended yet
        (its ``links`` is there and zero: the record it was saved with was empty) and the record after loading is
        empty: nothing a file held is lost. A state whose links ended holds a record of their updates, so its absent
        record stays missing, as a truncated or hand-edited checkpoint's must (review round 52: it loaded, silently
        without the chain, into a fresh model, whose record is empty)."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if not _no_link_ended(state_dict.get(prefix + "links")) or self.chain_a.shape[0] or self.chain_b.shape[1]:
            return
        for key in (prefix + "chain_a", prefix + "chain_b"):
            if key in missing_keys:
                missing_keys.remove(key)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, links={int(self.links)}, chain_rank={self.chain_a.shape[0]}, sketch={self.sampled()}"


def _no_link_ended(links: Any) -> bool:
    """Whether a state's saved ``links`` (the count of ended links, shape ``(1,)``) says none has ended; ``False``
    where the state holds no count (``None``) or something else."""
    return isinstance(links, Tensor) and links.numel() == 1 and not links.is_floating_point() and int(links) == 0


@torch.no_grad()
def refactor(chain_a: Tensor, chain_b: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``C_b Cₐ ≈ U_k S_k V_kᵀ`` (truncated SVD, in fp32, fp64 for an fp64 chain): new ``(Cₐ, C_b)`` of rank
    ``≤ rank`` and the relative Frobenius error ``‖S_{k:}‖ / ‖S‖`` (0 when ``rank ≥`` the product's rank)."""
    wide = wide_dtype(chain_a.dtype)
    delta = chain_b.to(wide) @ chain_a.to(wide)  # out x in
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # out x m, m, m x in
    k = min(rank, s.shape[0])
    total = float(torch.linalg.norm(s))
    error = float(torch.linalg.norm(s[k:])) / total if total > 0 else 0.0
    return vh[:k].to(chain_a.dtype).contiguous(), (u[:, :k] * s[:k]).to(chain_b.dtype).contiguous(), error  # k x in, out x k


# ---------------------------------------------------------------------------- the step machinery
def link_end_resets(layer: RacLoraLinear, keep: bool) -> tuple[Tensor, ...]:
    """After ``layer.end_link()``: the factors whose optimizer state to drop — both, or with ``keep`` only those
    not trained in the new link (a factor that has just become the sketch)."""
    if not keep:
        return (layer.lora_a, layer.lora_b)
    trained = {id(t) for t in layer.link_trained()}
    return tuple(t for t in (layer.lora_a, layer.lora_b) if id(t) not in trained)


def refuse_parametrized(layers: dict[str, AdapterLayer]) -> None:
    """Raise, changing nothing, where a user put a torch parametrization on a factor of the chain's layers after attach:
    a link end (and :func:`compress_chain`) re-zeroes the trained factor and resamples the sketch in place, which on a
    parametrized factor would write a computed value and leave the tensor behind it as it was (the link counted twice,
    the same sketch kept)."""
    for name, layer in layers.items():
        found = layer.parametrized_factors()
        if found:
            raise ValueError(
                f"RAC-LoRA / COLA rewrites its factors in place at a link end, and adapter layer {name!r} has torch "
                f"parametrizations on {found}: the write would miss the tensor behind them. Take them off, keeping their "
                f"value (torch.nn.utils.parametrize.remove_parametrizations(layer, {found[0]!r}, leave_parametrized=True):"
                " a trained factor stays the same object, so the optimizer keeps it); nothing was changed")


NO_OPTIMIZER = ("a RAC-LoRA link ends here and its optimizer state must be reset: call rankwise.step(model, optimizer) "
                "(or rankwise.end_link(model, optimizer)) with the optimizer")


def _check_link_end(layers: dict[str, AdapterLayer], optimizer: Any) -> list[RacLoraLinear]:
    """What a link end refuses, raised before anything changes: no optimizer, one that does not hold the trained
    factors, FSDP1's flattened shards. Returns the chain's layers."""
    if optimizer is None:
        raise ValueError(NO_OPTIMIZER)
    refuse_parametrized(layers)
    for layer in layers.values():  # the record would keep the rescaled link (rankwise.scaled)
        layer.refuse_in_scaled("end a link")
    check_optimizer(layers, optimizer)
    chain = [layer for layer in layers.values() if isinstance(layer, RacLoraLinear)]
    assert len(chain) == len(layers)
    for layer in chain:
        layer.check_link_shapes()  # every layer before any changes: a refusal leaves the chain as it was
    return chain


def _end_links(chain: list[RacLoraLinear], optimizer: Any, state: RankwiseState) -> None:
    """End the link of ``chain`` (layers :func:`_check_link_end` passed): merge, resample, reset Adam's state."""
    for layer in chain:
        layer.end_link()
        reset_optimizer_state(optimizer, link_end_resets(layer, bool(getattr(state.config, "keep_optimizer_state", False))))
        layer.lora_a.grad = None
        layer.lora_b.grad = None
    state.method_state["link_step"] = 0
    state.method_state["links"] = int(state.method_state.get("links", 0)) + 1


def _link_ends(config: RacLoraConfig, state: RankwiseState) -> bool:
    """Whether the coming step ends the current link (a chain with ``link_steps``)."""
    return config.link_steps is not None and int(state.method_state.get("link_step", 0)) + 1 >= config.link_steps


def check_step(model: nn.Module, layers: dict[str, AdapterLayer], optimizer: Any, state: RankwiseState) -> None:  # noqa: ARG001
    """What :func:`on_step` refuses, raised before anything changes: a parametrized factor (:func:`refuse_parametrized`)
    or an optimizer that does not hold the chain's trained factors (checked every step, so either is caught at once,
    not at a link end), or no optimizer at a link end."""
    config = state.config
    assert isinstance(config, RacLoraConfig)
    if not config.chain:
        return
    refuse_parametrized(layers)
    if _link_ends(config, state):
        for layer in layers.values():  # the record would keep the rescaled link (rankwise.scaled)
            layer.refuse_in_scaled("end a link")
    if optimizer is not None:
        check_optimizer(layers, optimizer)
    elif _link_ends(config, state):
        raise ValueError(NO_OPTIMIZER)


def on_step(model: nn.Module, layers: dict[str, AdapterLayer], optimizer: Any, state: RankwiseState) -> None:
    """After each optimizer step: count it; end the link after ``link_steps`` steps (chains only)."""
    config = state.config
    assert isinstance(config, RacLoraConfig)
    if not config.chain:
        return
    check_step(model, layers, optimizer, state)
    link_step = int(state.method_state.get("link_step", 0)) + 1
    if _link_ends(config, state):
        _end_links(_check_link_end(layers, optimizer), optimizer, state)  # a refusal changes nothing; resets link_step
    else:
        state.method_state["link_step"] = link_step


def _rac_state(model: nn.Module, name: str | None = None) -> tuple[RacLoraConfig, RankwiseState, dict[str, RacLoraLinear]]:
    state = get_state(model, name)
    if not isinstance(state.config, RacLoraConfig):
        raise ValueError(f"this model's adapter is {state.config.method!r}, not a RAC-LoRA chain (rankwise.RacLoraConfig)")
    layers = {n: layer for n, layer in adapter_layers(model, name).items() if isinstance(layer, RacLoraLinear)}
    return state.config, state, layers


def chain_names(model: nn.Module, name: str | None = None) -> list[str]:
    """The adapters :func:`end_link` ends: ``name``; ``None``: the model's only adapter or, with several, every
    active one that is a RAC-LoRA / COLA chain (``chain=True``) and trains, as :func:`rankwise.step` steps every
    active adapter that trains (inside ``rankwise.per_example``: every one its examples name).
    Raises where that names no chain."""
    adapters = adapter_set(model)
    if name is not None or len(adapters.adapters) == 1:
        names = [adapters.resolve(name)]
    else:
        covered = trained_adapters(model, adapters)
        names = [n for n in covered if getattr(adapters.adapters[n].config, "chain", False) is True
                 and isinstance(adapters.adapters[n].config, RacLoraConfig)
                 and any(layer.requires_grad() for layer in adapter_layers(model, n).values())]
        if not names:
            which = "active adapter" if covered == adapters.active else "adapter the rankwise.per_example block names"
            raise ValueError(f"no {which} of this model ({covered}) is a trained RAC-LoRA / COLA chain "
                             "(rankwise.RacLoraConfig with chain=True): there is no link to end")
    for n in names:
        if not _rac_state(model, n)[0].chain:
            raise ValueError("this RacLoraConfig has chain=False (Asymmetric LoRA / LoRA: a single link); there is no link to end")
    return names


def end_link(model: nn.Module, optimizer: Any, name: str | None = None) -> None:
    """End the current link now (e.g. at an epoch's end): merge, resample, reset the optimizer state
    (only the new sketch's with ``keep_optimizer_state``).

    Never changes the model's function. Raises for a config with ``chain=False`` (one link by definition).
    ``name``: which adapter, on a model with several; ``None``: the only adapter or, with several, every active
    chain (:func:`chain_names`), all or none: every refusal is raised before any link ends.
    """
    chains = [(state, _check_link_end(dict(layers), optimizer))
              for _, state, layers in (_rac_state(model, n) for n in chain_names(model, name))]
    for state, chain in chains:  # every chain checked before any link ends
        _end_links(chain, optimizer, state)


@torch.no_grad()
def compress_chain(model: nn.Module, rank: int, name: str | None = None) -> dict[str, float]:
    """Fold each layer's whole update (chain + current link) into a chain of rank ``≤ rank`` by SVD.

    For export/serving after training: the current link's trained factor is zeroed (its product moves
    into the chain). Lossy unless ``rank`` is at least the update's rank. Returns each layer's relative
    Frobenius error ``‖ΔW − ΔW_rank‖ / ‖ΔW‖``.
    """
    check_positive_int("rank", rank)
    _, _, layers = _rac_state(model, name)
    refuse_parametrized(dict(layers))
    for layer in layers.values():
        layer.refuse_in_scaled("compress the chain")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"unmerge before compressing the chain (merged layers: {merged[:4]})")
    errors: dict[str, float] = {}
    for name, layer in layers.items():
        link_a, link_b = layer.whole_link()
        a = torch.cat([layer.chain_a, link_a])  # (k + r) x in
        b = torch.cat([layer.chain_b, layer.scale * link_b], dim=1)  # out x (k + r)
        chain_a, chain_b, errors[name] = refactor(a, b, rank)
        layer.chain_a, layer.chain_b = kept_tensor(chain_a), kept_tensor(chain_b)  # normal, inside inference mode too
        (layer.lora_b if layer.sampled() == "A" else layer.lora_a).zero_()
    return errors


# ---------------------------------------------------------------------------- registration
def _build(model: nn.Module, targets: dict[str, nn.Module], config: AdapterConfig, calibration: Any, loss_fn: Any) -> BuildResult:  # noqa: ARG001
    assert isinstance(config, RacLoraConfig)
    seed = shared_seed(config.seed)
    layers: dict[str, AdapterLayer] = {
        name: RacLoraLinear(m, config, config.r, index=i, seed=seed) for i, (name, m) in enumerate(targets.items())
    }
    notes = [] if config.seed is not None else [f"raclora: sketch seed {seed} (drawn; recorded in the adapter)"]
    return BuildResult(layers, notes=notes)


_, _rebuild = simple_build(RacLoraLinear)  # uninitialised layers of the saved ranks: the constructor contract


RACLORA = register_method(Method(name="raclora", config_cls=RacLoraConfig, build=_build, rebuild=_rebuild, on_step=on_step,
                                  check_step=check_step))
