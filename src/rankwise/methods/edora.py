"""EDoRA: efficient weight-decomposed low-rank adaptation via SVD (Nasiri & Garraghan, arXiv 2501.12067).

DoRA's magnitude/direction split with frozen, SVD-initialised factors and a small trainable core
(PyTorch's ``out x in`` convention, per-output-row norms)::

    W' = m ⊙ (W0 + s·B R A) / ‖W0 + s·B R A‖_row,        s = alpha / r

* ``W0 ≈ U_r Σ_r V_rᵀ`` (truncated SVD): ``B = U_r`` (``out x r``) and ``A = Σ_r V_rᵀ`` (``r x in``),
  all singular values in A. Both are **frozen** buffers (saved with the adapter); ``W0`` is unchanged.
  ``B A`` is the best rank-r approximation of ``W0`` (Eckart–Young).
* ``R`` (``r x r``) is trainable, drawn from ``N(0, σ²)`` (σ = 1e-5: the update starts near zero).
* ``m`` (``out``) is trainable and starts at ``‖W0‖_row``. The norm is a constant in backward
  (detached, as in DoRA §4.3). Trainable per layer: ``r² + out``.

Because A and B never change, the row norm needs no ``out x in`` matrix. With ``n0 = ‖W0‖²_row``,
``C = W0 Aᵀ`` (``out x r``) and ``K = A Aᵀ`` (``r x r``), computed once from ``W0`` and ``A``::

    ‖W0 + s·B R A‖²_row = n0 + rowsum((BR) ⊙ (2s·C + s²·(BR) K))

which costs ``O(out·r²)`` per step instead of DoRA's ``O(out·in·r)``. The terms are kept for ``W0 / c``
and ``A / c`` (``c`` a power of two near ``max |W0|``, so the division is exact): ``n0/c²``, ``C/c²``,
``K/c²`` stay in range in every dtype, and the norm is ``c·√(…)`` computed in fp32 (fp64 for fp64),
so ``W' = W0`` at init holds for any finite weight scale (see :mod:`rankwise.methods.dora`). The forward pass is DoRA's
(PEFT's, with its dropout semantics, :func:`rankwise.methods.dora.magnitude_forward`) with the
low-rank path ``s·((x Aᵀ) Rᵀ) Bᵀ``.

Over an ``nn.Embedding`` (``in = num_embeddings``, ``out = embedding_dim``) everything above holds as written, with
DoRA's embedding convention (:mod:`rankwise.methods.dora`): the norm runs over ``W0``'s ``out x in`` rows, one per
embedding dimension (across the vocabulary), so ``m`` has ``embedding_dim`` entries; ``x Aᵀ`` is the lookup
``Aᵀ[ids]``, no dropout, and ``A``'s ``padding_idx`` column is zeroed (the padding row's update stays zero).

``factors="random"`` is the paper's ablation: frozen random factors instead of the SVD ones, drawn as
the official code draws them (Kaiming-uniform, a = √5, on the transposed factors:
``A ~ U(±1/√r)``, ``B ~ U(±1/√out)``).

Exported to PEFT as a DoRA adapter with ``lora_A = A``, ``lora_B = B R``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, check_number
from ..fused import FusedInputs
from ..layer import AdapterLayer, PeftFactors, layer_generator, wide_dtype
from ..registry import BuildResult, Method, register_method, simple_build
from .dora import low_rank_row_norm, magnitude_direction, magnitude_forward, magnitude_scale, pow2_scale

SVD_MODES = ("exact", "randomized")
FACTOR_MODES = ("svd", "random")
OVERSAMPLE = 10  # extra sketch columns for the randomized SVD (Halko et al. 2011, §4.2)


@dataclass(frozen=True)
class EdoraConfig(AdapterConfig):
    """EDoRA. See :class:`rankwise.config.AdapterConfig` for the common fields.

    Attributes:
        sigma: standard deviation of the trainable core ``R``'s normal init (paper: 1e-5).
        svd: ``"exact"`` (``torch.linalg.svd``; fp32, fp64 for fp64 weights) or ``"randomized"``
            (Halko et al. randomized range finder with ``svd_niter`` power iterations, for large
            layers; its sketch is drawn from ``seed`` — 0 when ``seed`` is None — so it is deterministic).
        svd_niter: power iterations of the randomized SVD (official code: 10).
        factors: ``"svd"`` (the method) or ``"random"`` (the paper's ablation: random frozen factors).
    """

    method: ClassVar[str] = "edora"
    default_lr: ClassVar[float] = 1e-2  # only an r x r core per layer trains: ~10x LoRA's rate (docs/evidence/defaults.md)

    sigma: float = 1e-5
    svd: str = "exact"
    svd_niter: int = 10
    factors: str = "svd"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("sigma", self.sigma, ">= 0")
        if self.svd not in SVD_MODES:
            raise ValueError(f"svd must be one of {SVD_MODES}, got {self.svd!r}")
        if not isinstance(self.svd_niter, int) or isinstance(self.svd_niter, bool) or self.svd_niter < 0:
            raise ValueError(f"svd_niter must be an integer >= 0, got {self.svd_niter!r}")
        if self.factors not in FACTOR_MODES:
            raise ValueError(f"factors must be one of {FACTOR_MODES}, got {self.factors!r}")


# ---------------------------------------------------------------------------- named init steps
def _flip_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic signs: the largest-magnitude entry of each column of ``U`` is made positive."""
    rows = u.abs().argmax(dim=0)  # r
    signs = torch.sign(u[rows, torch.arange(u.shape[1], device=u.device)])  # r
    signs[signs == 0] = 1
    return u * signs, vh * signs.unsqueeze(1)


def randomized_svd(w: Tensor, rank: int, niter: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD of ``w`` (``out x in``) by a randomized range finder with QR-stabilised power
    iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1; the algorithm of ``torch.svd_lowrank``).

    ``torch.svd_lowrank`` draws its sketch from the global RNG of ``w``'s device and takes no
    generator; here the sketch is drawn on the CPU from ``generator`` and moved, so a seed gives the
    same factors on every device and leaves the global RNG alone.
    """
    out_f, in_f = w.shape
    q = min(rank + OVERSAMPLE, out_f, in_f)
    omega = torch.randn(in_f, q, generator=generator, dtype=w.dtype).to(w.device)  # in x q
    basis = torch.linalg.qr(w @ omega).Q  # out x q
    for _ in range(niter):
        basis = torch.linalg.qr(w @ torch.linalg.qr(w.t() @ basis).Q).Q  # out x q
    u_small, s, vh = torch.linalg.svd(basis.t() @ w, full_matrices=False)  # q x q, q, q x in
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def svd_factors(w0: Tensor, rank: int, mode: str, niter: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Named init step: ``B = U_r`` (``out x r``), ``A = Σ_r V_rᵀ`` (``r x in``) and ``Σ_r``, with
    deterministic signs, computed in fp32 (fp64 for an fp64 weight)."""
    if not torch.isfinite(w0).all():
        raise ValueError("the base weight holds non-finite values; its SVD is undefined")
    w = w0.detach().to(torch.float64 if w0.dtype == torch.float64 else torch.float32)  # out x in
    if mode == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, vh = randomized_svd(w, rank, niter, generator)
    u, vh = _flip_signs(u, vh)  # out x r, r x in
    return u, s.unsqueeze(1) * vh, s  # B: out x r, A: r x in, Σ_r: r


def random_factors(out_f: int, in_f: int, rank: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Named init step of the ablation: ``A ~ U(±1/√r)`` (``r x in``), ``B ~ U(±1/√out)`` (``out x r``),
    i.e. Kaiming-uniform (a = √5) on ``Aᵀ`` and ``Bᵀ`` as in the official code."""
    a_t = torch.empty(in_f, rank)  # in x r
    b_t = torch.empty(rank, out_f)  # r x out
    nn.init.kaiming_uniform_(a_t, a=math.sqrt(5), generator=generator)
    nn.init.kaiming_uniform_(b_t, a=math.sqrt(5), generator=generator)
    return b_t.t(), a_t.t()


# ---------------------------------------------------------------------------- the layer
class EdoraLinear(AdapterLayer):
    """Frozen ``B`` (``frozen_b``), ``A`` (``frozen_a``); trainable core ``R`` (``core``) and magnitude ``m``."""

    trainable: tuple[str, ...] = ("core", "magnitude")
    # LoRA+ groups give the core (the update's only trained factor) the multiplied rate, the magnitude the
    # base rate. On MiniLM one rate for both, ~10x LoRA's, scored higher (docs/evidence/edora.md §3d).
    lr_multiplied: ClassVar[tuple[str, ...]] = ("core",)
    _terms_stale: bool = False  # a conversion changed the norm terms' dtype: recomputed once W0 is converted too
    frozen_a: Tensor  # buffers (typed here: nn.Module's __getattr__ says Tensor | Module)
    frozen_b: Tensor
    norm_n0: Tensor
    norm_c: Tensor
    norm_k: Tensor

    def __init__(self, base: nn.Module, config: EdoraConfig, rank: int, *, index: int = 0, init: bool = True) -> None:
        super().__init__(base, config, rank)
        self.register_buffer("frozen_a", self.new_tensor(rank, self.in_features))  # r x in
        self.register_buffer("frozen_b", self.new_tensor(self.out_features, rank))  # out x r
        self.core = nn.Parameter(self.new_tensor(rank, rank))  # r x r
        self.magnitude = nn.Parameter(self.new_tensor(self.out_features))  # out
        # norm terms, functions of (W0, A): recomputed, not saved (see precompute_norm_terms)
        self.register_buffer("norm_scale", self.new_tensor(1), persistent=False)  # c: a power of two (1,)
        self.register_buffer("norm_n0", self.new_tensor(self.out_features), persistent=False)  # out
        self.register_buffer("norm_c", self.new_tensor(self.out_features, rank), persistent=False)  # out x r
        self.register_buffer("norm_k", self.new_tensor(rank, rank), persistent=False)  # r x r
        self.frozen_a: Tensor
        self.frozen_b: Tensor
        self.norm_scale: Tensor
        self.norm_n0: Tensor
        self.norm_c: Tensor
        self.norm_k: Tensor
        if init:
            self.initialise(config, index)

    # ------------------------------------------------------------------ init
    def initialise(self, config: EdoraConfig, index: int) -> Tensor | None:
        """Run the named init steps in order; returns ``Σ_r`` (``None`` for random factors)."""
        generator = layer_generator(config.seed, index)
        factor_generator = generator if generator is not None else layer_generator(0, index)
        assert factor_generator is not None  # a seed gives a generator
        spectrum = self.init_factors(config, factor_generator)
        self.init_core(config.sigma, generator)
        self.init_magnitude()
        return spectrum

    @torch.no_grad()
    def init_factors(self, config: EdoraConfig, generator: torch.Generator) -> Tensor | None:
        """Named init step: the frozen ``B``, ``A`` from the SVD of ``W0`` (or random, for the ablation)."""
        if config.factors == "svd":
            b, a, spectrum = svd_factors(self.unmerged_base_weight(), self.rank, config.svd, config.svd_niter, generator)
        else:
            b, a = random_factors(self.out_features, self.in_features, self.rank, generator)
            spectrum = None
        self.kind.clear_padding(a)  # an embedding's padding row keeps a zero update (W0's is zero: A's column ~0)
        self.frozen_b.copy_(b)
        self.frozen_a.copy_(a)
        self.precompute_norm_terms()
        return spectrum

    @torch.no_grad()
    def init_core(self, sigma: float, generator: torch.Generator | None) -> None:
        """Named init step: ``R ~ N(0, σ²)`` (drawn on the CPU, then moved)."""
        self.core.copy_(torch.randn(self.rank, self.rank, generator=generator) * sigma)

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """Named init step: ``m = ‖W0‖_row`` (the norm of :meth:`weight_norm` with ``R = 0``, bit for bit)."""
        self.magnitude.copy_(self.weight_norm(torch.zeros_like(self.frozen_b)))

    @torch.no_grad()
    def precompute_norm_terms(self) -> None:
        """``c``, ``n0/c² = ‖W0/c‖²_row``, ``C/c² = (W0/c)(A/c)ᵀ``, ``K/c² = (A/c)(A/c)ᵀ`` (in fp64, stored in
        the adapter dtype; ``c`` a power of two near ``max |W0|``).

        Deterministic functions of ``W0`` and ``A``, so they are recomputed after loading rather than
        saved; a load therefore reproduces them bit for bit.
        """
        w0 = self.unmerged_base_weight().double()  # out x in
        c = pow2_scale(w0.abs().amax())
        w0, a = w0 / c, self.frozen_a.double() / c  # out x in, r x in
        self.norm_scale.copy_(c)
        self.norm_n0.copy_((w0 * w0).sum(dim=1))  # out
        self.norm_c.copy_(w0 @ a.t())  # out x r
        self.norm_k.copy_(a @ a.t())  # r x r

    def _apply(self, fn: Any, recurse: bool = True) -> EdoraLinear:
        """``model.half()`` / ``.to(torch.bfloat16)`` would round the norm terms to the new dtype: they are kept
        in fp32 (fp64 for fp64) instead, recomputed from the converted ``W0``, so ``m/n`` stays exact."""
        super()._apply(fn, recurse)
        wide = wide_dtype(self.adapter_dtype)
        if self.norm_n0.dtype != wide:
            for name in ("norm_scale", "norm_n0", "norm_c", "norm_k"):
                setattr(self, name, getattr(self, name).to(wide))
            self._terms_stale = True
        if self._terms_stale and not self.is_peer:  # a peer's W0 is its host's, converted after it: base_converted
            self.base_converted()
        return self

    def base_converted(self) -> None:
        """Recompute the norm terms where a conversion changed their dtype (:meth:`_apply`), now that ``W0`` is
        converted too (a peer's host calls this after converting its ``W0``; review round 34)."""
        if self._terms_stale:
            self._terms_stale = False
            self.precompute_norm_terms()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """After ``load_state_dict`` filled in a new ``A`` or a new base: recompute the norm terms here, as the tensors
        arrive, not in a post-hook. A merged stack merges again in :class:`AdapterLayer`'s post-hook, registered
        first, so a post-hook of this class ran after that merge: an EDoRA host with an adapter before it then
        merged with the old terms in its row scale (review round 34). A peer's ``W0`` is its host's, loaded before it."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self.precompute_norm_terms()

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def weight_norm(self, br: Tensor | None = None) -> Tensor:
        """``‖W0 + s·B R A‖_row`` (``out``) in ``O(out·r²)``, detached (a constant in backward).

        ``br`` is ``B R`` when the caller already has it.
        """
        wide = wide_dtype(self.adapter_dtype)
        br = (self.frozen_b @ self.core if br is None else br.detach()).to(wide)  # out x r
        c, n0, cc, k = (t.to(wide) for t in (self.norm_scale, self.norm_n0, self.norm_c, self.norm_k))
        # the terms are those of W0 / c and A / c, so the norm is c · ‖W0/c + s·(BR)(A/c)‖_row
        return (c * low_rank_row_norm(n0, cc, br, k, self.scale)).to(self.adapter_dtype)  # out

    def row_scale(self) -> Tensor:
        """``μ = m / ‖W0 + s·B R A‖_row`` (``out``, the norm detached): DoRA's row scale, which also rescales the
        updates of the adapters active before this one (:meth:`AdapterLayer.stacked_forward`, HF PEFT's rule)."""
        return magnitude_scale(self.magnitude, self.weight_norm())

    def lora_out(self, x: Tensor) -> Tensor:
        """``s · ((x Aᵀ) Rᵀ) Bᵀ`` for an input already dropped-out, in the adapter dtype."""
        return self._lora_out(x, self.frozen_b @ self.core)

    def _lora_out(self, x: Tensor, br: Tensor) -> Tensor:
        h = self.kind.down(x, self.frozen_a, self.adapter_dtype)  # (..., r)
        return self.kind.up(h, br * self.scale)  # (..., out); s applied to the out x r factor

    def fused_inputs(self) -> FusedInputs:
        """The training step's factors (no dropout), one autograd node (:class:`rankwise.fused.LowRankLinear`):
        DoRA's with ``A`` frozen, so the backward forms only ``d(s·BR) = g'ᵀ (x Aᵀ)`` (-> ``dR``), ``dμ``, ``dx``."""
        br = self.frozen_b @ self.core  # out x r, computed once for the norm and the update
        mag_scale = magnitude_scale(self.magnitude, self.weight_norm(br))  # out; finite on an all-zero row
        return FusedInputs(self.frozen_a, br * self.scale, mag_scale)

    def adapter_forward(self, x: Tensor) -> Tensor:
        """The plain implementation (eval, dropout, quantised base; what the fused path is tested against)."""
        br = self.frozen_b @ self.core  # out x r, computed once for the norm and the update
        mag_scale = magnitude_scale(self.magnitude, self.weight_norm(br))  # out; finite on an all-zero row
        return magnitude_forward(self, x, mag_scale, lambda x_d: self._lora_out(x_d, br))

    # ------------------------------------------------------------------ merge / export
    def merged_weight(self) -> Tensor:
        w0 = self.wide(self.unmerged_base_weight())  # out x in
        delta = self.wide(self.frozen_b) @ self.wide(self.core) @ self.wide(self.frozen_a)  # out x in
        return magnitude_direction(self.magnitude, w0 + self.scale * delta)  # out x in

    def peft_factors(self) -> PeftFactors:
        """PEFT DoRA form: ``lora_A = A``, ``lora_B = B R``, the magnitude and ``s``."""
        b_r = self.frozen_b.detach() @ self.core.detach()  # out x r
        return PeftFactors(self.frozen_a.detach(), b_r, self.scale, self.magnitude.detach())


# ---------------------------------------------------------------------------- build
def _zero_tail(spectrum: Tensor, shape: tuple[int, int]) -> int:
    """How many of the top-r singular values are numerically zero (``σ_i ≤ σ_1 · max(shape) · eps``)."""
    tol = spectrum.max().clamp_min(torch.finfo(spectrum.dtype).tiny) * max(shape) * torch.finfo(spectrum.dtype).eps
    return int((spectrum <= tol).sum())


def _build(model: nn.Module, targets: dict[str, nn.Module], config: EdoraConfig, calibration: Any, loss_fn: Any) -> BuildResult:  # noqa: ARG001
    layers: dict[str, AdapterLayer] = {}
    extras: dict[str, dict[str, Any]] = {}
    for index, (name, module) in enumerate(targets.items()):
        try:
            layer = EdoraLinear(module, config, config.r, index=index, init=False)
            spectrum = layer.initialise(config, index)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from exc
        layers[name] = layer
        if spectrum is None:
            continue
        zeros = _zero_tail(spectrum, (layer.out_features, layer.in_features))
        if zeros:
            warnings.warn(
                f"EDoRA layer {name!r}: {zeros} of its top {layer.rank} singular values are zero (its weight has "
                f"rank {layer.rank - zeros} < r={layer.rank}); those directions of A are zero, so the matching "
                "entries of R have no effect. The adapter is still correct; a smaller r wastes nothing.",
                stacklevel=3,
            )
        total = layer.norm_n0.double().sum().clamp_min(torch.finfo(torch.float64).tiny) * layer.norm_scale.double() ** 2
        extras[name] = {"svd_energy": float(spectrum.double().pow(2).sum() / total)}
    return BuildResult(layers, extras)


_, _rebuild = simple_build(EdoraLinear)  # uninitialised layers of the saved ranks: the constructor contract


EDORA = register_method(Method(name="edora", config_cls=EdoraConfig, build=_build, rebuild=_rebuild))
