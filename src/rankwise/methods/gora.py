"""GoRA: gradient-driven adaptive rank and initialization (He et al. 2025, arXiv 2502.12171).

One procedure before training decides, from gradients, each layer's rank *and* B's initial value:

1. **Collect gradients.** Everything frozen but the target weights ``W_i``; ``n_steps`` forward /
   backward passes (each the mean of ``grad_accumulation`` micro-batches) on calibration batches give
   the mean gradient ``Ḡ_i`` (out x in). Each weight's ``.grad`` is folded into an fp32 accumulator
   (optionally on the CPU) by a post-accumulate hook and freed at once, so peak memory stays near
   inference + one layer's gradient. A quantised weight holds no gradient: there ``Ḡ_i = Σ δᵀ x`` comes from
   the layer's input and output gradient (:func:`gora_gradients.tap_weight_gradient`; at the adapter layer in
   its slot when another adapter is attached there). A tied one's ``.grad`` adds its other uses (``lm_head``
   tied to the input embedding), while the adapter changes this layer's use only: during calibration the layer
   reads a leaf of its own on the same storage; with ``ensure_weight_tying`` the tied head computes with the
   embedding layer's update (:mod:`rankwise.ties`), so there ``.grad``, every use's, is the gradient. Beside
   other active adapters the gradient is the model's as it computes (base plus their updates). Under
   ``torch.distributed`` the mean is all-reduced, so every rank allocates the same ranks and (with a
   shared seed) builds identical adapters. Steps 1 and 2 live in ``gora_gradients.py``.
2. **Importance** ``I_i = mean(|W_i ⊙ Ḡ_i|)`` (default; the paper's ablation winner), or the nuclear
   norm of ``Ḡ_i`` / of ``W_i ⊙ Ḡ_i``. Normalised: ``a_i = I_i / Σ_j I_j``.
3. **Ranks** under LoRA-``r_ref``'s budget. With weights ``w_i = in_i + out_i`` (``budget="params"``,
   the official code's default) or ``w_i = √(in_i + out_i)`` (``budget="sqrt"``, the paper's formula),
   ``b = r_ref · Σ_i w_i`` and ``r_i = clip(round(b · a_i / w_i), r_min, r_max)``. Clipping alone
   loses or overspends budget, so we solve for the multiplier ``λ`` with
   ``Σ_i w_i · clip(λ a_i / w_i, lo_i, hi_i) = b`` (water-filling: what the clips free or take is
   redistributed over the unclipped layers), then round (floor, and round up the largest remainders
   while that brings ``Σ_i w_i r_i`` nearer ``b``: every rank stays within one unit of its target). ``hi_i = min(r_max, in_i, out_i)``.
4. **Init** (GoRA eq. 8-9). ``A_i`` Kaiming-uniform (``r_i x in_i``), ``B_i = −Ḡ_i A_i⁺ · ξ_i`` with
   ``A⁺ = Aᵀ(AAᵀ)⁻¹`` (an fp64 solve with a tiny ridge) and ``ξ_i = γ √in_i / α``. With the forward
   scale ``s_i = α / √r_i`` (rsLoRA-style, always on for GoRA) the initial update is
   ``ΔW_i = s_i B_i A_i = −γ √(in_i / r_i) · Ḡ_i P_{A_i}``, ``P_A = Aᵀ(AAᵀ)⁻¹A``: about one gradient
   step of length γ, projected on A's row space. **W0 is not modified**, so the model's output moves at
   attach time — by design, a step down the calibration loss.
5. **Train** like LoRA: a :class:`GoraLinear` *is* a :class:`LoraLinear` of rank ``r_i``, so merge,
   save/load (ranks come back from the file) and PEFT export (``rank_pattern``) work unchanged.

``GoraConfig.r`` and ``r_ref`` name one number (pass either, or both equal; default 8): GoRA has no
single rank, and ``r_ref`` is what LoRA at equal budget would use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, check_number, check_positive_int
from ..distributed import process_group, shared_seed
from ..layer import AdapterLayer, layer_generator
from ..registry import BuildResult, LossFn, Method, register_method, simple_build
from .gora_gradients import collect_gradients, importance_shares, importances
from .lora import LoraLinear, kaiming_a

IMPORTANCES = ("mean_abs_wg", "nuclear_g", "nuclear_wg")
BUDGETS = ("params", "sqrt")
_RIDGE = 1e-12  # relative ridge on A Aᵀ (fp64): keeps the solve safe, changes nothing measurable


@dataclass(frozen=True)
class GoraConfig(AdapterConfig):
    """GoRA. See :class:`rankwise.config.AdapterConfig` for the common fields.

    Attributes:
        r_ref: the reference rank: the budget is what LoRA at rank ``r_ref`` would train (default 8; ``r``
            is another name for it).
        r_min: the lower bound on every layer's rank.
        r_max: the upper bound on every layer's rank (also capped by ``min(in, out)``).
        gamma: ``γ``, the size of the initial step (0 gives B = 0: adaptive ranks, LoRA-style init).
        n_steps: calibration steps whose gradients are averaged.
        grad_accumulation: micro-batches per step (so ``n_steps · grad_accumulation`` batches are read).
            ``Ḡ`` is the mean over all of them of each batch's mean-loss gradient, ``(1/N) Σ_b ∇L_b``, so only
            the product counts (4 x 1, 2 x 2 and 1 x 4 give the same init, float rounding apart); a short
            batch weighs as much as a full one (the paper's mean over passes; PEFT's LoRA-GA likewise). The
            split matters only to early stopping, which checks after each step.
        importance: ``"mean_abs_wg"`` (mean |W ⊙ Ḡ|, default), ``"nuclear_g"`` (‖Ḡ‖_*) or
            ``"nuclear_wg"`` (‖W ⊙ Ḡ‖_*).
        budget: ``"params"`` (b = r_ref · Σ(in+out), the official code) or ``"sqrt"`` (the paper's √ form).
        early_stop_threshold: stop collecting once every layer's importance changes by less than this
            (relative) between steps; ``None`` never stops early (the paper's option uses 0.1).
        early_stop_min_steps: steps always taken before early stopping may trigger.
        offload_to_cpu: keep the gradient accumulators in CPU memory (for large models on a GPU).
        r: ``r_ref`` under the name every method has: pass either (0 or left out: not given); after
            construction both hold the reference rank, and :meth:`replace` changes both.
        use_rslora: must stay ``True``: GoRA's forward scale is ``α/√r_i``.
    """

    method: ClassVar[str] = "gora"

    r: int = 0
    use_rslora: bool = True
    r_ref: int = 0
    r_min: int = 4
    r_max: int = 32
    gamma: float = 5e-2
    n_steps: int = 8
    grad_accumulation: int = 1
    importance: str = "mean_abs_wg"
    budget: str = "params"
    early_stop_threshold: float | None = None
    early_stop_min_steps: int = 4
    offload_to_cpu: bool = False

    def __post_init__(self) -> None:
        given = {self.r, self.r_ref} - {0}
        if len(given) > 1:
            raise ValueError(f"GoRA's r is an alias of r_ref: pass one of them, or both equal (got r={self.r}, r_ref={self.r_ref})")
        rank = given.pop() if given else 8
        for name in ("r", "r_ref"):
            object.__setattr__(self, name, rank)
        for name in ("r_ref", "r_min", "r_max", "n_steps", "grad_accumulation", "early_stop_min_steps"):
            check_positive_int(name, getattr(self, name))
        super().__post_init__()
        if self.r_min > self.r_max:
            raise ValueError(f"r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        if not self.use_rslora:
            raise ValueError("GoRA always scales by alpha/sqrt(r_i) (rsLoRA-style): use_rslora must be True")
        check_number("gamma", self.gamma, ">= 0")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        check_number("early_stop_threshold", self.early_stop_threshold, none=True)

    def replace(self, **changes: Any) -> GoraConfig:
        """A copy with some fields changed; ``r`` or ``r_ref`` alone changes both (one number, two names)."""
        for name, alias in (("r", "r_ref"), ("r_ref", "r")):
            if name in changes and alias not in changes:
                changes[alias] = changes[name]
        return cast(GoraConfig, super().replace(**changes))


class GoraLinear(LoraLinear):
    """A LoRA layer whose rank came from GoRA's allocation and whose B starts at ``−ξ Ḡ A⁺``."""

    @torch.no_grad()
    def init_lora(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform(a=√5), B = 0, over every base kind: B is then solved against A
        (:meth:`init_from_gradient`), which needs A of full row rank, so an embedding keeps this init too (not
        LoRA's A = 0 there), with its padding column zero (``Ḡ``'s is zero: the padding row's update stays zero)."""
        self.lora_a.copy_(kaiming_a(self.rank, self.in_features, generator))
        self.kind.clear_padding(self.lora_a)
        self.lora_b.zero_()

    @torch.no_grad()
    def init_from_gradient(self, grad: Tensor, gamma: float, alpha: float) -> None:
        """Named init step (GoRA eq. 8-9): ``B = −Ḡ Aᵀ(AAᵀ)⁻¹ · γ√in/α``, solved in fp64; A is kept.

        Args:
            grad: the mean gradient ``Ḡ`` of the base weight, ``out x in`` (any device, any float dtype).
        """
        if grad.shape != (self.out_features, self.in_features):
            raise ValueError(f"gradient has shape {tuple(grad.shape)}, expected out x in = {(self.out_features, self.in_features)}")
        if not torch.isfinite(grad).all():
            raise FloatingPointError("the mean gradient has non-finite entries")
        g = grad.detach().to(torch.float64)  # out x in
        a = self.lora_a.detach().to(device=g.device, dtype=torch.float64)  # r x in
        gram = a @ a.t()  # r x r
        ridge = _RIDGE * float(gram.diagonal().mean()) * torch.eye(self.rank, dtype=torch.float64, device=g.device)
        b_t = torch.linalg.solve(gram + ridge, -(a @ g.t()))  # r x out  (= (−Ḡ A⁺)ᵀ)
        xi = gamma * math.sqrt(self.in_features) / alpha
        b = (b_t.t() * xi).to(device=self.lora_b.device, dtype=self.lora_b.dtype)  # out x r
        if not torch.isfinite(b).all():
            raise FloatingPointError(
                f"GoRA's initial B is not finite in {self.lora_b.dtype} (gamma={gamma:g}, largest |mean gradient| "
                f"{float(g.abs().max()):.3g}): lower gamma, or the loss scale of the calibration batches"
            )
        self.lora_b.copy_(b)


# ---------------------------------------------------------------------------- 3. ranks
@dataclass
class Allocation:
    """Step 3's result: integer ranks, the continuous targets, and the budget figures."""

    ranks: dict[str, int]
    targets: dict[str, float]  # continuous r_i after redistribution, before rounding
    budget: float  # b, in units of the budget form's weights
    spent: float  # Σ w_i r_i
    lora_params: int  # r_ref · Σ(in_i + out_i): what LoRA at r_ref trains
    params: int  # Σ r_i (in_i + out_i): what these ranks train
    form: str


@dataclass(frozen=True)
class _Fill:
    """Step 3's water-filling problem: each layer's budget weight ``w_i``, its rank bounds ``lo_i .. hi_i`` and its
    importance share ``a_i``, every dict in the layers' order."""

    w: dict[str, float]
    lo: dict[str, int]
    hi: dict[str, int]
    share: dict[str, float]

    def fill(self, lam: float) -> dict[str, float]:
        """The continuous ranks at the multiplier ``λ``: ``clip(λ a_i / w_i, lo_i, hi_i)``."""
        return {n: min(max(lam * self.share[n] / self.w[n], self.lo[n]), self.hi[n]) for n in self.w}

    def spend(self, t: Mapping[str, float]) -> float:
        """``Σ_i w_i t_i``: what ranks (or continuous targets) ``t`` cost, in the budget's units."""
        return sum(self.w[n] * t[n] for n in self.w)


def _checked_budget(r_ref: int, r_min: int, w: dict[str, float]) -> float:
    """The budget ``b = r_ref · Σ_i w_i``, refused when it cannot give every layer ``r_min``."""
    budget = r_ref * sum(w.values())
    if budget < r_min * sum(w.values()):
        raise ValueError(
            f"the budget b = r_ref x Σw = {budget:.6g} is below r_min everywhere (r_min x Σw = {r_min * sum(w.values()):.6g}): "
            f"raise r_ref ({r_ref}) to at least r_min ({r_min}) or lower r_min"
        )
    return budget


def _check_importance(importance: dict[str, float]) -> None:
    """Every importance ``I_i`` finite and ``>= 0`` (step 2's values; the shares ``a_i`` are made from them)."""
    for n, v in importance.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"importance of layer {n!r} is {v!r}; it must be finite and >= 0")


def _fill_problem(importance: dict[str, float], shapes: dict[str, tuple[int, int]], cost: dict[str, int],
                  r_ref: int, r_min: int, r_max: int, form: str) -> tuple[_Fill, float]:
    """Step 3's problem and its budget ``b``: the weights ``w_i`` (``in_i + out_i``, or its square root for the
    ``"sqrt"`` form), the bounds, the budget and importances checked, and the shares ``a_i = I_i / Σ_j I_j``
    (``w_i / Σ_j w_j`` where every importance is zero)."""
    names = list(shapes)
    w = {n: float(cost[n]) if form == "params" else math.sqrt(cost[n]) for n in names}
    lo = {n: min(r_min, *shapes[n]) for n in names}
    hi = {n: min(r_max, *shapes[n]) for n in names}
    budget = _checked_budget(r_ref, r_min, w)
    _check_importance(importance)
    share = importance_shares({n: importance[n] for n in names}) or {n: w[n] / sum(w.values()) for n in names}
    return _Fill(w, lo, hi, share), budget


def _multiplier(p: _Fill, budget: float) -> float:
    """Water-filling: the ``λ`` with ``Σ_i w_i · clip(λ a_i / w_i, lo_i, hi_i) = b`` (monotone in ``λ``: doubled
    until it brackets ``b`` or every layer is at its cap, then 200 bisection steps); the bracket's upper end."""
    lo_lam, hi_lam = 0.0, budget
    while p.spend(p.fill(hi_lam)) < budget and hi_lam < 1e300 and p.spend(p.fill(hi_lam)) < p.spend(p.hi):
        hi_lam *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo_lam + hi_lam)
        if p.spend(p.fill(mid)) < budget:
            lo_lam = mid
        else:
            hi_lam = mid
    return hi_lam


def _integer_ranks(p: _Fill, target: dict[str, float], budget: float) -> dict[str, int]:
    """Integer ranks from the continuous targets: floor every target, then round up the largest remainders while
    that brings ``Σ_i w_i r_i`` nearer ``b`` (each rank stays within one unit of its target)."""
    ranks = {n: int(math.floor(target[n] + 1e-9)) for n in p.w}
    for n in sorted(p.w, key=lambda n: ranks[n] - target[n]):
        gap = budget - p.spend(ranks)
        if target[n] - ranks[n] > 1e-9 and abs(gap - p.w[n]) < abs(gap):
            ranks[n] += 1
    return ranks


def allocate_ranks(
    importance: dict[str, float],
    shapes: dict[str, tuple[int, int]],
    r_ref: int,
    r_min: int,
    r_max: int,
    form: str = "params",
) -> Allocation:
    """Ranks ``r_i ∈ [min(r_min, d_i), min(r_max, d_i)]`` (``d_i = min(in_i, out_i)``) with ``Σ w_i r_i ≈ b``.

    Args:
        importance: ``I_i ≥ 0`` per layer (normalised here).
        shapes: ``(out_i, in_i)`` per layer.
        form: ``"params"`` (``w_i = in_i + out_i``) or ``"sqrt"`` (``w_i = √(in_i + out_i)``).

    Raises:
        ValueError: ``r_min > r_max``, an unknown ``form``, layers named in only one of ``importance`` and
            ``shapes``, ``b < r_min · Σ w_i``, or a negative/non-finite importance (checked in that order).
    """
    if r_min > r_max:
        raise ValueError(f"r_min ({r_min}) must not exceed r_max ({r_max})")
    if form not in BUDGETS:
        raise ValueError(f"budget form must be one of {BUDGETS}, got {form!r}")
    if set(importance) != set(shapes):
        raise ValueError(f"importance and shapes must name the same layers: {sorted(set(shapes) - set(importance))} "
                         f"have no importance, {sorted(set(importance) - set(shapes))} no shape")
    cost = {n: shapes[n][0] + shapes[n][1] for n in shapes}
    problem, budget = _fill_problem(importance, shapes, cost, r_ref, r_min, r_max, form)
    target = problem.fill(_multiplier(problem, budget))
    ranks = _integer_ranks(problem, target, budget)
    return Allocation(
        ranks=ranks,
        targets=target,
        budget=budget,
        spent=problem.spend(ranks),
        lora_params=r_ref * sum(cost.values()),
        params=sum(ranks[n] * cost[n] for n in shapes),
        form=form,
    )


# ---------------------------------------------------------------------------- steps 1-4 together: build
def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def build(
    model: nn.Module, targets: dict[str, nn.Module], config: AdapterConfig, calibration: Iterable[Any] | None, loss_fn: LossFn | None
) -> BuildResult:
    """Steps 1-4: gradients, importance, ranks, layers initialised from the gradients (not yet installed)."""
    assert isinstance(config, GoraConfig)
    grads, stats = collect_gradients(model, targets, config, calibration, loss_fn)  # type: ignore[arg-type]
    imp = importances(targets, grads, config.importance)
    shapes = {n: (g.shape[0], g.shape[1]) for n, g in grads.items()}
    alloc = allocate_ranks(imp, shapes, config.r_ref, config.r_min, config.r_max, config.budget)
    seed = shared_seed(config.seed)
    seed_source = "config" if config.seed is not None else (
        "drawn from torch's global RNG" + (", broadcast from rank 0" if process_group() is not None else ""))
    layers: dict[str, AdapterLayer] = {}
    for i, (name, module) in enumerate(targets.items()):
        layer = GoraLinear(module, config, alloc.ranks[name], index=i, init=False)
        layer.init_lora(layer_generator(seed, i))
        try:
            layer.init_from_gradient(grads[name], config.gamma, config.alpha)
        except (ValueError, FloatingPointError) as exc:
            raise type(exc)(f"GoRA layer {name!r}: {exc}") from exc
        layers[name] = layer
    share = importance_shares(imp)
    extras = {
        n: {
            "importance": imp[n],
            "share": share[n] if share is not None else float("nan"),
            "rank_target": alloc.targets[n],
        }
        for n in targets
    }
    w_name = "in+out" if alloc.form == "params" else "sqrt(in+out)"
    diff = 100.0 * (alloc.params - alloc.lora_params) / alloc.lora_params
    notes = [
        f"GoRA budget ({alloc.form} form, w = {w_name}): b = r_ref x Σw = {alloc.budget:.6g}; spent Σ w·r_i = {alloc.spent:.6g} "
        f"({100.0 * (alloc.spent - alloc.budget) / alloc.budget:+.3f}%)",
        f"GoRA adapter size: {alloc.params:,} parameters vs LoRA r={config.r_ref}: {alloc.lora_params:,} ({diff:+.3f}%); "
        f"ranks in [{min(alloc.ranks.values())}, {max(alloc.ranks.values())}] (bounds {config.r_min}..{config.r_max})",
        f"GoRA importance: {config.importance}; gamma = {config.gamma:g}; A seed: {seed} ({seed_source})",
        f"GoRA gradient collection: {stats.steps} steps x {config.grad_accumulation} micro-batches ({stats.batches} batches"
        f"{', early stop' if stats.early_stopped else ''}), world size {stats.world_size}, {stats.seconds:.3f} s, "
        f"accumulators {_mib(stats.accumulator_bytes)} on {'CPU' if config.offload_to_cpu else 'the weights device'}, "
        f"peak CUDA memory {_mib(stats.peak_cuda_bytes) if stats.peak_cuda_bytes is not None else 'n/a (no CUDA weights)'}",
    ]
    return BuildResult(layers, extras, notes)


# ---------------------------------------------------------------------------- after step 3: the ranks as a table and a plot
@dataclass
class RankTable:
    """Ranks as a grid: ``ranks[i][j]`` is the rank of module type ``module_types[i]`` in block ``layer_indices[j]``."""

    module_types: list[str]
    layer_indices: list[int]
    ranks: list[list[int | None]]


def _split_name(name: str) -> tuple[int, str, str]:
    """``'bert.encoder.layer.3.attention.self.query'`` -> ``(3, 'bert.encoder.layer', 'attention.self.query')``:
    layer number, the stack the number counts in, module type; no number -> ``(0, '', name)``."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[:k]), ".".join(parts[k + 1:]) or parts[k - 1]
    return 0, "", name


def _row_labels(keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """A row label per ``(stack, module type)``: the type, or ``stack.type`` where several stacks have that type
    (an encoder's and a decoder's ``self_attn.q_proj``), so no layer's cell is written over another's."""
    pairs = list(keys)
    stacks: dict[str, set[str]] = {}
    for stack, kind in pairs:
        stacks.setdefault(kind, set()).add(stack)
    return {(stack, kind): kind if len(stacks[kind]) == 1 else f"{stack}.{kind}" for stack, kind in pairs}


def gora_rank_table(model_or_report: Any) -> RankTable:
    """The ranks of an attached model (or an :class:`~rankwise.AttachReport`) by module type x layer number."""
    if hasattr(model_or_report, "layers") and isinstance(model_or_report.layers, list):
        ranks = {row.name: row.rank for row in model_or_report.layers}
    elif isinstance(model_or_report, nn.Module):
        from ..state import adapter_layers

        ranks = {n: layer.rank for n, layer in adapter_layers(model_or_report).items()}
    else:
        raise TypeError(f"expected a model with rankwise adapters or an AttachReport, got {type(model_or_report).__name__}")
    if not ranks:
        raise ValueError("no adapted layers to tabulate")
    split = {n: _split_name(n) for n in ranks}
    labels = _row_labels((stack, kind) for _, stack, kind in split.values())
    cells = {(i, labels[stack, kind]): ranks[n] for n, (i, stack, kind) in split.items()}
    types = list(dict.fromkeys(t for _, t in cells))
    indices = sorted({i for i, _ in cells})
    return RankTable(types, indices, [[cells.get((i, t)) for i in indices] for t in types])


def plot_gora_ranks(model_or_report: Any, path: str | None = None, title: str = "GoRA ranks") -> Any:
    """Draw the rank heatmap (rows: module type, columns: layer number) and save it to ``path``.

    Returns the matplotlib ``Figure``. Needs matplotlib (imported here, not at module level).
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    table = gora_rank_table(model_or_report)
    grid = np.array([[np.nan if r is None else r for r in row] for row in table.ranks], dtype=float)
    label_width = 0.09 * max(len(t) for t in table.module_types)  # inches for the row labels
    fig, ax = plt.subplots(figsize=(2.5 + label_width + 0.6 * len(table.layer_indices), 1.5 + 0.45 * len(table.module_types)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(table.layer_indices)), [str(i) for i in table.layer_indices])
    ax.set_yticks(range(len(table.module_types)), table.module_types)
    ax.set_xlabel("layer")
    ax.set_title(title)
    for i, row in enumerate(table.ranks):
        for j, r in enumerate(row):
            if r is not None:
                ax.text(j, i, str(r), ha="center", va="center", color="white" if r < np.nanmean(grid) else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def _reading(config: GoraConfig, n: int) -> GoraConfig:
    """The config that reads ``n`` calibration batches: ``n_steps = n / grad_accumulation``."""
    if n % config.grad_accumulation:
        raise ValueError(f"GoRA reads n_steps x grad_accumulation batches: {n} is not a multiple of "
                         f"grad_accumulation = {config.grad_accumulation}")
    return config.replace(n_steps=n // config.grad_accumulation)


_, _rebuild = simple_build(GoraLinear)
GORA = register_method(Method(name="gora", config_cls=GoraConfig, build=build, rebuild=_rebuild, uses_calibration=True,
                              calibration_batches=lambda c: c.n_steps * c.grad_accumulation,
                              calibration_config=_reading, plot=plot_gora_ranks))
