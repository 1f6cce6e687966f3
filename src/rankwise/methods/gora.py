"""GoRA: gradient-driven adaptive rank and initialization (He et al. 2025, arXiv 2502.12171).

One procedure before training decides, from gradients, each layer's rank *and* B's initial value:

1. **Collect gradients.** Everything frozen but the target weights ``W_i``; ``n_steps`` forward /
   backward passes (each the mean of ``grad_accumulation`` micro-batches) on calibration batches give
   the mean gradient ``Ḡ_i`` (out x in). Each weight's ``.grad`` is folded into an fp32 accumulator
   (optionally on the CPU) by a post-accumulate hook and freed at once, so peak memory stays near
   inference + one layer's gradient. A quantised weight holds no gradient: there ``Ḡ_i = Σ δᵀ x``
   comes from the layer's input and output gradient (:func:`tap_weight_gradient`). Under ``torch.distributed`` the mean is all-reduced, so every rank
   allocates the same ranks and (with a shared seed) builds identical adapters.
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

``GoraConfig.r`` is an alias of ``r_ref`` (leave it out, or pass the same value): GoRA has no single
rank, and ``r_ref`` is what LoRA at equal budget would use.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, check_positive_int
from ..layer import AdapterLayer, layer_generator
from ..quant import dense_weight, is_quantized
from ..registry import BuildResult, LossFn, Method, register_method, simple_build
from ..targeting import out_in
from .lora import LoraLinear

IMPORTANCES = ("mean_abs_wg", "nuclear_g", "nuclear_wg")
BUDGETS = ("params", "sqrt")
_RIDGE = 1e-12  # relative ridge on A Aᵀ (fp64): keeps the solve safe, changes nothing measurable


@dataclass(frozen=True)
class GoraConfig(AdapterConfig):
    """GoRA. See :class:`rankwise.config.AdapterConfig` for the common fields.

    Attributes:
        r_ref: the reference rank: the budget is what LoRA at rank ``r_ref`` would train.
        r_min, r_max: bounds on every layer's rank (also capped by ``min(in, out)``).
        gamma: ``γ``, the size of the initial step (0 gives B = 0: adaptive ranks, LoRA-style init).
        n_steps: calibration steps whose gradients are averaged.
        grad_accumulation: micro-batches per step (so ``n_steps · grad_accumulation`` batches are read).
        importance: ``"mean_abs_wg"`` (mean |W ⊙ Ḡ|, default), ``"nuclear_g"`` (‖Ḡ‖_*) or
            ``"nuclear_wg"`` (‖W ⊙ Ḡ‖_*).
        budget: ``"params"`` (b = r_ref · Σ(in+out), the official code) or ``"sqrt"`` (the paper's √ form).
        early_stop_threshold: stop collecting once every layer's importance changes by less than this
            (relative) between steps; ``None`` never stops early (the paper's option uses 0.1).
        early_stop_min_steps: steps always taken before early stopping may trigger.
        offload_to_cpu: keep the gradient accumulators in CPU memory (for large models on a GPU).
        r: alias of ``r_ref`` (0 or equal to ``r_ref``); set automatically.
        use_rslora: must stay ``True``: GoRA's forward scale is ``α/√r_i``.
    """

    method: ClassVar[str] = "gora"

    r: int = 0
    use_rslora: bool = True
    r_ref: int = 8
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
        for name in ("r_ref", "r_min", "r_max", "n_steps", "grad_accumulation", "early_stop_min_steps"):
            check_positive_int(name, getattr(self, name))
        if self.r not in (0, self.r_ref):
            raise ValueError(f"GoRA's r is an alias of r_ref: leave r out or pass r == r_ref (got r={self.r}, r_ref={self.r_ref})")
        object.__setattr__(self, "r", self.r_ref)
        super().__post_init__()
        if self.r_min > self.r_max:
            raise ValueError(f"r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        if not self.use_rslora:
            raise ValueError("GoRA always scales by alpha/sqrt(r_i) (rsLoRA-style): use_rslora must be True")
        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        t = self.early_stop_threshold
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"early_stop_threshold must be None or a positive number, got {t!r}")


class GoraLinear(LoraLinear):
    """A LoRA layer whose rank came from GoRA's allocation and whose B starts at ``−ξ Ḡ A⁺``."""

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


# ---------------------------------------------------------------------------- 1. gradients
@dataclass
class GradientStats:
    """What the collection did: steps taken, whether it stopped early, time and memory."""

    steps: int
    batches: int
    early_stopped: bool
    seconds: float
    accumulator_bytes: int
    peak_cuda_bytes: int | None
    world_size: int


def calibration_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> Tensor:
    """The scalar loss of one batch: ``loss_fn(model, batch)``, else ``model(**batch).loss`` / ``model(batch).loss``."""
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        out = model(**batch) if isinstance(batch, dict) else model(batch)
        loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError(
                f"the model's output ({type(out).__name__}) has no .loss for the calibration batch: "
                "put labels in the batches or pass loss_fn=(model, batch) -> loss to attach"
            )
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"the calibration loss must be a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
    if not loss.requires_grad:
        raise ValueError(
            "the calibration loss does not require grad (computed under torch.no_grad(), detached, or from "
            "frozen inputs only?): GoRA needs the gradient of the loss w.r.t. the target weights"
        )
    return loss.reshape(())


def _dist() -> Any:
    """``torch.distributed`` when a process group is initialised, else ``None``."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _comm_device(dist: Any) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce_mean(t: Tensor, dist: Any) -> Tensor:
    buf = t.to(_comm_device(dist))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return (buf / dist.get_world_size()).to(t.device)


def _weight_out_in(module: nn.Module, t: Tensor) -> Tensor:
    """A weight-shaped tensor as ``out x in`` (transposed for GPT-2 ``Conv1D``)."""
    return out_in(module, t)


def tap_weight_gradient(module: nn.Module, acc: Tensor) -> Any:
    """Add the gradient of ``module``'s weight, ``Σ δᵀ x`` (``out x in``), into ``acc`` on every backward,
    from the layer's input ``x`` and output gradient ``δ``; for weights that cannot hold a ``.grad``
    (bitsandbytes-quantised bases). Returns the hook's handle (``.remove()`` it).

    When nothing before the layer needs a gradient, its output is made a leaf that does, so ``δ`` still
    flows back to it (the layers before it need no gradient of their own from this one).
    """

    def forward_hook(_module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0].detach()  # (..., in)
        out = output if output.requires_grad else output.detach().requires_grad_(True)

        def grad_hook(delta: Tensor) -> None:
            d = delta.detach().reshape(-1, delta.shape[-1]).to(torch.float32)  # tokens x out
            acc.add_((d.t() @ x.reshape(-1, x.shape[-1]).to(torch.float32)).to(acc.device))  # out x in

        out.register_hook(grad_hook)
        return out

    return module.register_forward_hook(forward_hook)


def _check_calibration_size(calibration: Iterable[Any] | None, config: GoraConfig) -> None:
    """Calibration is given and, when it has a length, holds the ``n_steps x grad_accumulation`` batches read."""
    if calibration is None:
        raise ValueError("GoRA initialises from data: pass calibration=<iterable of training batches> to attach")
    needed = config.n_steps * config.grad_accumulation
    if hasattr(calibration, "__len__"):
        n = len(calibration)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("no calibration data: the calibration batches are empty")
        if n < needed:
            raise ValueError(
                f"GoRA needs n_steps x grad_accumulation = {config.n_steps} x {config.grad_accumulation} = {needed} "
                f"calibration batches, got {n}"
            )


def _accumulators(targets: dict[str, nn.Module], tapped: set[str], offload_to_cpu: bool) -> dict[str, Tensor]:
    """A zero gradient sum per target, at least fp32 (bf16/fp16 gradients are summed in fp32); ``out x in``
    for a tapped (quantised) layer, else the weight's own layout."""
    acc = {}
    for name, m in targets.items():
        w = m.weight
        acc[name] = torch.zeros(
            (m.out_features, m.in_features) if name in tapped else w.shape,
            dtype=torch.float32 if name in tapped else torch.promote_types(w.dtype, torch.float32),
            device="cpu" if offload_to_cpu else w.device,
        )
    return acc


def _next_batch(it: Iterator[Any], batches: int, config: GoraConfig) -> Any:
    """The next calibration batch; an iterable that runs out early is an error naming how many were needed."""
    try:
        return next(it)
    except StopIteration:
        if batches == 0:
            raise ValueError("no calibration data: the calibration batches are empty") from None
        raise ValueError(
            f"GoRA needs n_steps x grad_accumulation = {config.n_steps} x {config.grad_accumulation} = "
            f"{config.n_steps * config.grad_accumulation} calibration batches, but the iterable ran out after {batches}"
        ) from None


def _settled(
    targets: dict[str, nn.Module], acc: dict[str, Tensor], steps: int, previous: dict[str, float] | None,
    config: GoraConfig, dist: Any,
) -> tuple[bool, dict[str, float]]:
    """Early stopping: whether every layer's importance moved by at most ``early_stop_threshold`` (relative)
    since the last step, agreed across ranks (every rank stops at the same step); and the importances now."""
    now = {n: _importance(targets[n], a / steps, config.importance) for n, a in acc.items()}
    settled = previous is not None and all(
        abs(now[n] - previous[n]) <= config.early_stop_threshold * max(abs(previous[n]), 1e-30) for n in now
    )
    if dist is not None:
        flag = torch.tensor([0.0 if settled else 1.0], device=_comm_device(dist))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        settled = bool(flag.item() == 0.0)
    return settled, now


def _hook_gradients(targets: dict[str, nn.Module], tapped: set[str], acc: dict[str, Tensor], hooks: list[Any]) -> None:
    """Each target weight's gradient summed into ``acc`` as it arrives (and freed at once: peak memory ~ one
    layer's gradient), tapped from the layer's input and output gradient for a quantised weight; the
    handles go into ``hooks`` one by one, so the caller removes every one made, also after an error."""

    def fold(name: str) -> Any:
        def hook(p: Tensor) -> None:
            assert p.grad is not None
            acc[name].add_(p.grad.detach().to(device=acc[name].device, dtype=acc[name].dtype))
            p.grad = None

        return hook

    for name, m in targets.items():
        if name in tapped:
            hooks.append(tap_weight_gradient(m, acc[name]))
            continue
        m.weight.requires_grad_(True)
        hooks.append(m.weight.register_post_accumulate_grad_hook(fold(name)))


def _restore(model: nn.Module, hooks: list[Any], params: dict[str, nn.Parameter], flags: dict[str, bool],
             grads: dict[str, Tensor | None], buffers: dict[str, Tensor]) -> None:
    """The model as calibration found it: hooks removed, ``requires_grad`` flags, ``.grad`` fields and buffers back."""
    for h in hooks:
        h.remove()
    for n, p in params.items():
        p.requires_grad_(flags[n])
        p.grad = grads[n]
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])


def collect_gradients(
    model: nn.Module, targets: dict[str, nn.Module], config: GoraConfig, calibration: Iterable[Any], loss_fn: LossFn | None
) -> tuple[dict[str, Tensor], GradientStats]:
    """Step 1: the mean gradient ``Ḡ_i`` (fp32, or fp64 for an fp64 model; ``out x in``) of every target weight.

    The model comes back as it went in: ``requires_grad`` flags, ``.grad`` fields and buffers (e.g.
    batch-norm statistics updated in train mode) are restored, also when this raises. The model's
    train/eval mode is left as the caller set it (dropout then acts as in training).

    Under ``torch.distributed`` every rank must call this with the same ``n_steps`` and
    ``grad_accumulation`` (each on its own shard of the batches): the mean is all-reduced at the end
    and, with early stopping, a stop flag after every step. A rank that raises (e.g. runs out of
    batches) leaves the others waiting in the collective, as any failed rank in a DDP job does.
    """
    _check_calibration_size(calibration, config)
    dist = _dist()
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    weights = {name: m.weight for name, m in targets.items()}
    tapped = {name for name, m in targets.items() if is_quantized(m)}  # no .grad on a quantised weight
    acc = _accumulators(targets, tapped, config.offload_to_cpu)
    cuda_devices = {w.device for w in weights.values() if w.device.type == "cuda"}
    for d in cuda_devices:
        torch.cuda.reset_peak_memory_stats(d)
    hooks: list[Any] = []
    start = time.perf_counter()
    steps = batches = 0
    early = False
    previous: dict[str, float] | None = None
    try:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        _hook_gradients(targets, tapped, acc, hooks)
        it: Iterator[Any] = iter(calibration)
        while steps < config.n_steps:
            for _ in range(config.grad_accumulation):
                loss = calibration_loss(model, _next_batch(it, batches, config), loss_fn)
                (loss / config.grad_accumulation).backward()
                batches += 1
            steps += 1
            for name, a in acc.items():
                if not torch.isfinite(a).all():
                    raise FloatingPointError(
                        f"non-finite gradient (NaN/inf) for layer {name!r} at calibration step {steps}: check the "
                        "batches, the loss, or lower the precision risk (e.g. fp32 calibration)"
                    )
            if config.early_stop_threshold is not None:
                settled, previous = _settled(targets, acc, steps, previous, config, dist)
                if settled and steps >= config.early_stop_min_steps and steps < config.n_steps:
                    early = True
                    break
    finally:
        _restore(model, hooks, params, flags, grads, buffers)
    mean = {name: _weight_out_in(targets[name], a / steps) for name, a in acc.items()}
    if dist is not None:
        mean = {name: _all_reduce_mean(g, dist) for name, g in mean.items()}
    stats = GradientStats(
        steps=steps,
        batches=batches,
        early_stopped=early,
        seconds=time.perf_counter() - start,
        accumulator_bytes=sum(a.numel() * a.element_size() for a in acc.values()),
        peak_cuda_bytes=max((torch.cuda.max_memory_allocated(d) for d in cuda_devices), default=None),
        world_size=dist.get_world_size() if dist is not None else 1,
    )
    return mean, stats


# ---------------------------------------------------------------------------- 2. importance
def _importance(module: nn.Module, grad_like: Tensor, kind: str) -> float:
    """One layer's importance from its (running) mean gradient, in the weight's own layout."""
    g = grad_like.float()
    if kind == "nuclear_g":
        return float(torch.linalg.matrix_norm(g, ord="nuc"))
    wg = dense_weight(module).detach().to(device=g.device, dtype=torch.float32) * g  # dequantised if quantised
    return float(wg.abs().mean()) if kind == "mean_abs_wg" else float(torch.linalg.matrix_norm(wg, ord="nuc"))


def importances(targets: dict[str, nn.Module], grads: dict[str, Tensor], kind: str) -> dict[str, float]:
    """Step 2: ``I_i`` for every layer (``grads`` are ``out x in``); raises naming a layer whose ``I_i`` is not finite."""
    out = {name: _importance(targets[name], _weight_out_in(targets[name], grads[name]), kind) for name in targets}
    for name, value in out.items():
        if not math.isfinite(value):
            raise FloatingPointError(
                f"GoRA importance of layer {name!r} is {value!r} ({kind} overflowed fp32): the calibration loss or "
                "gradients are too large; lower the loss scale"
            )
    return out


def importance_shares(importance: dict[str, float]) -> dict[str, float] | None:
    """``a_i = I_i / Σ_j I_j`` (``None`` if every ``I_i`` is 0); when the sum overflows, after dividing by the largest ``I``."""
    total = sum(importance.values())
    if not math.isfinite(total):
        top = max(importance.values())
        importance = {n: v / top for n, v in importance.items()}
        total = sum(importance.values())
    if not total > 0:
        return None
    return {n: v / total for n, v in importance.items()}


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
        ValueError: ``r_min > r_max``, a negative/non-finite importance, or ``b < r_min · Σ w_i``.
    """
    if r_min > r_max:
        raise ValueError(f"r_min ({r_min}) must not exceed r_max ({r_max})")
    if form not in BUDGETS:
        raise ValueError(f"budget form must be one of {BUDGETS}, got {form!r}")
    names = list(shapes)
    cost = {n: shapes[n][0] + shapes[n][1] for n in names}
    w = {n: float(cost[n]) if form == "params" else math.sqrt(cost[n]) for n in names}
    lo = {n: min(r_min, *shapes[n]) for n in names}
    hi = {n: min(r_max, *shapes[n]) for n in names}
    budget = r_ref * sum(w.values())
    if budget < r_min * sum(w.values()):
        raise ValueError(
            f"the budget b = r_ref x Σw = {budget:.6g} is below r_min everywhere (r_min x Σw = {r_min * sum(w.values()):.6g}): "
            f"raise r_ref ({r_ref}) to at least r_min ({r_min}) or lower r_min"
        )
    for n, v in importance.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"importance of layer {n!r} is {v!r}; it must be finite and >= 0")
    share = importance_shares({n: importance[n] for n in names}) or {n: w[n] / sum(w.values()) for n in names}

    def fill(lam: float) -> dict[str, float]:
        return {n: min(max(lam * share[n] / w[n], lo[n]), hi[n]) for n in names}

    def spend(t: dict[str, float]) -> float:
        return sum(w[n] * t[n] for n in names)

    # water-filling: the multiplier λ whose clipped targets spend exactly b (monotone in λ: bisection)
    lo_lam, hi_lam = 0.0, budget
    while spend(fill(hi_lam)) < budget and hi_lam < 1e300 and spend(fill(hi_lam)) < spend(hi):
        hi_lam *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo_lam + hi_lam)
        if spend(fill(mid)) < budget:
            lo_lam = mid
        else:
            hi_lam = mid
    target = fill(hi_lam)
    # integers: floor every target, then round up the largest remainders while that brings Σ w·r nearer b
    # (each rank stays within one unit of its continuous target)
    ranks = {n: int(math.floor(target[n] + 1e-9)) for n in names}
    for n in sorted(names, key=lambda n: ranks[n] - target[n]):
        gap = budget - spend(ranks)  # type: ignore[arg-type]
        if target[n] - ranks[n] > 1e-9 and abs(gap - w[n]) < abs(gap):
            ranks[n] += 1
    spent = spend(ranks)  # type: ignore[arg-type]
    return Allocation(
        ranks=ranks,
        targets=target,
        budget=budget,
        spent=spent,
        lora_params=r_ref * sum(cost.values()),
        params=sum(ranks[n] * cost[n] for n in names),
        form=form,
    )


# ---------------------------------------------------------------------------- 4. build
def _shared_seed(seed: int | None) -> tuple[int | None, str]:
    """The seed A is drawn from: the config's; under distributed with ``None``, one broadcast from rank 0."""
    dist = _dist()
    if seed is not None or dist is None:
        return seed, "config" if seed is not None else "torch global RNG"
    t = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).to(_comm_device(dist))
    dist.broadcast(t, src=0)
    return int(t.item()), "broadcast from rank 0"


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
    seed, seed_source = _shared_seed(config.seed)
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
        f"GoRA importance: {config.importance}; gamma = {config.gamma:g}; A seed: {seed_source}",
        f"GoRA gradient collection: {stats.steps} steps x {config.grad_accumulation} micro-batches ({stats.batches} batches"
        f"{', early stop' if stats.early_stopped else ''}), world size {stats.world_size}, {stats.seconds:.3f} s, "
        f"accumulators {_mib(stats.accumulator_bytes)} on {'CPU' if config.offload_to_cpu else 'the weights device'}, "
        f"peak CUDA memory {_mib(stats.peak_cuda_bytes) if stats.peak_cuda_bytes is not None else 'n/a (no CUDA weights)'}",
    ]
    return BuildResult(layers, extras, notes)


# ---------------------------------------------------------------------------- 6. the rank picture
@dataclass
class RankTable:
    """Ranks as a grid: ``ranks[i][j]`` is the rank of module type ``module_types[i]`` in block ``layer_indices[j]``."""

    module_types: list[str]
    layer_indices: list[int]
    ranks: list[list[int | None]]


def _split_name(name: str) -> tuple[int, str]:
    """``'bert.encoder.layer.3.attention.self.query'`` -> ``(3, 'attention.self.query')``; no number -> ``(0, name)``."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[k + 1:]) or parts[k - 1]
    return 0, name


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
    cells = {_split_name(n): r for n, r in ranks.items()}
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


_, _rebuild = simple_build(GoraLinear)
GORA = register_method(Method(name="gora", config_cls=GoraConfig, build=build, rebuild=_rebuild, uses_calibration=True,
                              calibration_batches=lambda c: c.n_steps * c.grad_accumulation,
                              plot=plot_gora_ranks))
