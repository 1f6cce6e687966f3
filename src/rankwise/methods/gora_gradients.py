"""GoRA's steps 1 and 2: the mean gradient of every target weight over calibration batches, and each
layer's importance from it (the method, its config and its layer are in ``gora.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from ..base_layers import base_kind
from ..distributed import comm_device, mean_across_ranks, process_group, true_on_every_rank
from ..quant import dense_weight, is_quantized, keep_layout
from ..registry import LossFn
from ..state import base_modules, slot_layers
from ..targeting import out_in
from ..ties import tied_heads

if TYPE_CHECKING:
    from .gora import GoraConfig


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


FP16_INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's init_scale


@dataclass
class LossScale:
    """The calibration loss's scale on an fp16 model, as ``torch.amp.GradScaler`` scales a training loss.

    fp16 keeps 11 significant bits only above 6.1e-5 and flushes values below 6e-8 to zero, and the mean gradient
    of a weight entry is often that small: unscaled, the gradients fp16 backpropagates lose their precision or
    vanish (GoRA's importance and initial ``B`` with them). On an fp16 model the loss is multiplied by ``scale``
    (2^16 to start, a power of two: exact), each batch's gradients are held until its backward ends
    (:attr:`pending`, :attr:`staged`), then divided by ``scale`` into the fp32 accumulators (:meth:`settle`); a batch
    whose scaled gradients overflow runs again at half the scale. Off on other models (bf16 has fp32's range): their
    gradients go straight into the accumulators, and the loss is not multiplied."""

    scale: float = 1.0
    pending: dict[str, Tensor] | None = None  # this batch's weight gradients (their own dtype); None: not scaling
    staged: dict[str, Tensor] = field(default_factory=dict)  # this batch's tapped gradient sums (fp32), when scaling

    @classmethod
    def for_model(cls, model: nn.Module) -> LossScale:
        """Scaling on when any of the model's parameters is fp16 (its activations' gradients then are too)."""
        if any(p.dtype == torch.float16 for p in model.parameters()):
            return cls(scale=FP16_INITIAL_SCALE, pending={})
        return cls()

    def sink(self, name: str, acc: Tensor) -> Tensor:
        """Where a tapped layer adds this batch's gradient: its accumulator, or (scaling) a staging sum of its shape."""
        if self.pending is None:
            return acc
        return self.staged.setdefault(name, torch.zeros_like(acc))

    def take(self, name: str, grad: Tensor, acc: Tensor) -> None:
        """A weight's gradient from this batch's backward: into its accumulator, or (scaling) held for
        :meth:`settle`."""
        if self.pending is None:
            acc.add_(grad.detach().to(device=acc.device, dtype=acc.dtype))
        else:
            self.pending[name] = grad.detach()

    def settle(self, acc: dict[str, Tensor]) -> bool:
        """After a batch's backward: ``False`` (run it again, at half the scale) when scaled gradients overflowed;
        else each held gradient ``/ scale`` into ``acc`` and ``True``. At scale 1 they are added whatever they hold
        (a non-finite gradient then stops the calibration, naming its layer)."""
        if self.pending is None:
            return True
        held = {**self.pending, **self.staged}
        self.pending = {}
        finite = all(bool(torch.isfinite(g).all()) for g in held.values())
        if finite or self.scale <= 1.0:
            for name, g in held.items():
                acc[name].add_(g.to(device=acc[name].device, dtype=acc[name].dtype) / self.scale)
        for t in self.staged.values():
            t.zero_()
        if finite or self.scale <= 1.0:
            return True
        self.scale /= 2.0
        return False


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
            "the calibration loss does not require grad (computed under torch.no_grad() or torch.inference_mode(), "
            "detached, or from frozen inputs only?): GoRA needs the gradient of the loss w.r.t. the target weights; "
            "attach it outside those blocks"
        )
    return loss.reshape(())


def _weight_out_in(module: nn.Module, t: Tensor) -> Tensor:
    """A weight-shaped tensor as ``out x in`` (transposed for GPT-2 ``Conv1D``, ``(out, c, *k)`` flattened for a
    convolution; a view of a contiguous tensor)."""
    return out_in(module, t)


def tap_weight_gradient(module: nn.Module, acc: Tensor, where: nn.Module | None = None) -> Any:
    """Add the gradient of ``module``'s weight through this module's own calls, ``Σ δᵀ x`` (``out x in``; in
    ``acc`` in the weight's layout: transposed for ``Conv1D``), into ``acc`` on every backward, from the layer's
    input ``x`` and output gradient ``δ``; for weights that cannot hold a ``.grad`` (bitsandbytes-quantised bases).
    ``where``: the module whose calls are tapped, ``module`` by default; the adapter layer in ``module``'s slot when
    another adapter is attached there (its forward computes ``x W0ᵀ`` itself, never calling ``module``; its output
    is ``x W0ᵀ + b`` plus updates that do not read ``W0``, so ``δᵀ x`` is still ``W0``'s gradient). Returns the
    hook's handle (``.remove()`` it).

    When nothing before the layer needs a gradient, its output is made a leaf that does, so ``δ`` still
    flows back to it (the layers before it need no gradient of their own from this one). For an embedding ``x`` is
    the ids (a one-hot input): the kind's :meth:`~rankwise.base_layers.BaseKind.weight_grad` scatter-adds ``δ``; for a
    convolution it is torch's convolution weight gradient (``δ`` channels first, as the module returns its output).
    """
    kind = base_kind(module)  # how this module's input makes its weight's gradient (rankwise.base_layers)

    def forward_hook(_module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0].detach()  # (..., in), or ids
        out = output if output.requires_grad else output.detach().requires_grad_(True)

        def grad_hook(delta: Tensor) -> None:
            g = kind.weight_grad(x, delta.detach().to(acc.dtype))  # out x in: Σ δᵀ x (ids: a scatter-add)
            _weight_out_in(module, acc).add_(g.to(acc.device))  # into acc (the weight's layout) through its out x in view

        out.register_hook(grad_hook)
        return out

    return (where if where is not None else module).register_forward_hook(forward_hook)


def _tapped(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The targets whose weight gradient comes from :func:`tap_weight_gradient` (a quantised weight holds no
    ``.grad``), each with the module whose calls are tapped: its slot's adapter layer where another adapter is
    attached there (refused where one of the active layers there rescales its rows: ``δᵀ x`` is not ``W0``'s
    gradient then), else the target itself."""
    hosts = slot_layers(model)
    out: dict[str, nn.Module] = {}
    for name, m in targets.items():
        if not is_quantized(m):
            continue
        host = hosts.get(name)
        # (a host here is never merged: a quantised base refuses merge, and attach refuses a merged model)
        scaling = [] if host is None else [layer.adapter_name for layer in host.computing()
                                           if layer.row_scale() is not None]
        if scaling:
            raise ValueError(
                f"GoRA cannot tap the gradient of the quantised weight of {name!r} beside adapter(s) {scaling}, which "
                "rescale its rows (DoRA family), so its output gradient times its input is not that weight's gradient: "
                "attach GoRA before them, or make other adapters the active ones while GoRA attaches "
                "(rankwise.set_active(model, [...]))"
            )
        out[name] = host if host is not None else m
    return out


def _shared(model: nn.Module, targets: dict[str, nn.Module], followed: set[str]) -> set[str]:
    """The float targets whose weight the model also uses elsewhere (tied: ``lm_head`` and the input embedding):
    their ``.grad`` would add every use's gradient, while the adapter changes this layer's use only, so calibration
    gives them a leaf of their own (:func:`_own_leaves`). ``followed``: targets whose other users all compute with
    this layer's update (:func:`_followed`), where every use's gradient is the one."""
    users: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    return {name for name, m in targets.items()
            if not is_quantized(m) and users.get(id(m.weight), 0) > 1 and name not in followed}


def _put_weight(owner: nn.Module, weight: nn.Parameter) -> None:
    """``weight`` as ``owner``'s ``weight`` parameter; an adapter layer (the slot's host) then points its base
    module and peers at it (:meth:`~rankwise.layer.AdapterLayer.share_base`)."""
    owner._parameters["weight"] = weight
    share = getattr(owner, "share_base", None)
    if share is not None:
        share()


def _own_leaves(model: nn.Module, targets: dict[str, nn.Module], shared: set[str],
                swapped: dict[str, tuple[nn.Module, nn.Parameter]]) -> None:
    """Give each shared target (:func:`_shared`) a weight of its own for the calibration: a new leaf on the same
    storage (nothing copied), in the target's module, or in its slot's adapter layer where another adapter is
    attached there, so its ``.grad`` is this layer's use's gradient alone, whatever computes ``x W0ᵀ``. Each
    ``name: (owner, original weight)`` goes into ``swapped`` before its swap, for :func:`_original_weights`."""
    hosts = slot_layers(model)
    for name in shared:
        owner = hosts.get(name, targets[name])
        original = cast(nn.Parameter, owner._parameters["weight"])
        swapped[name] = (owner, original)
        _put_weight(owner, nn.Parameter(original.detach(), requires_grad=False))


def _original_weights(swapped: dict[str, tuple[nn.Module, nn.Parameter]]) -> None:
    """Undo :func:`_own_leaves`: each owner's original (shared) weight back."""
    for owner, original in swapped.values():
        _put_weight(owner, original)


def _followed(model: nn.Module, targets: dict[str, nn.Module], config: GoraConfig) -> set[str]:
    """The target embeddings whose tied heads follow their layer (``ensure_weight_tying``: every module sharing the
    weight computes with the embedding layer's factors, :mod:`rankwise.ties`), so the update moves every use."""
    if not config.ensure_weight_tying:
        return set()
    return set(tied_heads(base_modules(model), [n for n, m in targets.items() if isinstance(m, nn.Embedding)]).values())


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


def _accumulators(targets: dict[str, nn.Module], offload_to_cpu: bool) -> dict[str, Tensor]:
    """A zero gradient sum per target, at least fp32 (bf16/fp16 gradients are summed in fp32); ``out x in``
    for a quantised layer (its weight is packed storage), else the weight's own layout."""
    acc = {}
    for name, m in targets.items():
        w: Tensor = cast(Tensor, m.weight)
        acc[name] = torch.zeros(
            (cast(Any, m).out_features, cast(Any, m).in_features) if is_quantized(m) else w.shape,
            dtype=torch.promote_types(w.dtype, torch.float32),  # a quantised weight's storage dtype gives fp32
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
    now = {n: _importance(targets[n], _weight_out_in(targets[n], a / steps), config.importance) for n, a in acc.items()}
    threshold = config.early_stop_threshold or 0.0  # called only when it is set
    settled = previous is not None and all(
        abs(now[n] - previous[n]) <= threshold * max(abs(previous[n]), 1e-30) for n in now
    )
    if dist is not None:
        flag = torch.tensor([0.0 if settled else 1.0], device=comm_device(dist))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        settled = bool(flag.item() == 0.0)
    return settled, now


def _hook_gradients(targets: dict[str, nn.Module], tapped: dict[str, nn.Module], acc: dict[str, Tensor],
                    hooks: list[Any], scaler: LossScale) -> None:
    """Each target weight's gradient summed into ``acc`` as it arrives (and freed at once: peak memory ~ one
    layer's gradient; on an fp16 model one batch's gradients, held by ``scaler``), tapped from the input and
    output gradient of ``tapped[name]`` for a quantised weight; the handles go into ``hooks`` one by one, so the
    caller removes every one made, also after an error."""

    def fold(name: str) -> Any:
        def hook(p: Tensor) -> None:
            assert p.grad is not None
            scaler.take(name, p.grad, acc[name])
            p.grad = None

        return hook

    for name, m in targets.items():
        if name in tapped:
            hooks.append(tap_weight_gradient(m, scaler.sink(name, acc[name]), where=tapped[name]))
            continue
        weight = cast(Tensor, m.weight)
        weight.requires_grad_(True)
        hooks.append(weight.register_post_accumulate_grad_hook(fold(name)))


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


def _caught(work: Callable[..., None], *args: Any) -> Exception | None:
    """The exception ``work(*args)`` raised, if any (to be raised once every rank knows: :func:`_stop_together`)."""
    try:
        work(*args)
    except Exception as exc:  # noqa: BLE001 (raised again by _stop_together, on every rank)
        return exc
    return None


def _accumulate_step(model: nn.Module, it: Iterator[Any], done: int, config: GoraConfig, loss_fn: LossFn | None,
                     scaler: LossScale, acc: dict[str, Tensor]) -> None:
    """One calibration step: ``grad_accumulation`` batches' gradients (each loss divided by that count) into the
    accumulators ``acc``, through the hooks; ``done`` batches were read before it. On an fp16 model each loss is
    also multiplied by the loss scale, and a batch whose scaled gradients overflow runs again (:class:`LossScale`)."""
    for i in range(config.grad_accumulation):
        batch = _next_batch(it, done + i, config)
        while True:
            loss = calibration_loss(model, batch, loss_fn) / config.grad_accumulation
            (loss if scaler.scale == 1.0 else loss * scaler.scale).backward()
            if scaler.settle(acc):
                break


def _stop_together(error: Exception | None, acc: dict[str, Tensor], steps: int) -> None:
    """Raise, on every rank alike, when this rank's calibration step raised ``error`` or any rank's accumulated
    gradient is not finite (a collective under ``torch.distributed``: each rank's flags, ANDed); else nothing."""
    ok = torch.stack([torch.tensor(error is None), *(torch.isfinite(a).all().cpu() for a in acc.values())])
    ok = true_on_every_rank(ok)
    if error is not None:
        raise error
    if not bool(ok[0]):
        raise RuntimeError(f"GoRA calibration failed on another process at step {steps} (its error says why); "
                           "this process stopped with it")
    for name, fine in zip(acc, ok[1:].tolist()):
        if not fine:
            raise FloatingPointError(
                f"non-finite gradient (NaN/inf) for layer {name!r} at calibration step {steps}: check the "
                "batches, the loss, or lower the precision risk (e.g. fp32 calibration)"
            )


@dataclass(frozen=True)
class _Saved:
    """The model as calibration found it, for :func:`_restore`: its parameters with their ``requires_grad`` flags
    and ``.grad`` fields, and copies of its buffers (train mode updates batch-norm statistics)."""

    params: dict[str, nn.Parameter]
    flags: dict[str, bool]
    grads: dict[str, Tensor | None]
    buffers: dict[str, Tensor]

    @classmethod
    def of(cls, model: nn.Module) -> _Saved:
        """What calibration will change on ``model``, read now."""
        params = dict(model.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        grads = {n: p.grad for n, p in params.items()}
        return cls(params, flags, grads, {n: b.detach().clone() for n, b in model.named_buffers()})


def _cuda_devices(targets: dict[str, nn.Module]) -> set[torch.device]:
    """The CUDA devices the target weights are on, whose peak memory :class:`GradientStats` reports."""
    weights = {name: m.weight for name, m in targets.items()}
    return {w.device for w in weights.values() if w.device.type == "cuda"}


def _steps(model: nn.Module, targets: dict[str, nn.Module], config: GoraConfig, it: Iterator[Any],
           error: Exception | None, loss_fn: LossFn | None, scaler: LossScale, acc: dict[str, Tensor],
           dist: Any) -> tuple[int, int, bool]:
    """The calibration steps into ``acc`` (the sum over steps of step 1's gradients): ``n_steps`` of them, or fewer
    when early stopping finds the importances settled; ``error`` (a size check that failed) or any rank's failed
    step stops every rank at that step (:func:`_stop_together`). Returns the steps taken, the batches read, and
    whether early stopping ended it."""
    steps = batches = 0
    previous: dict[str, float] | None = None
    while steps < config.n_steps:
        if error is None:
            error = _caught(_accumulate_step, model, it, batches, config, loss_fn, scaler, acc)
        batches += config.grad_accumulation if error is None else 0
        steps += 1
        _stop_together(error, acc, steps)
        if config.early_stop_threshold is not None:
            settled, previous = _settled(targets, acc, steps, previous, config, dist)
            if settled and steps >= config.early_stop_min_steps and steps < config.n_steps:
                return steps, batches, True
    return steps, batches, False


def _calibrate(model: nn.Module, targets: dict[str, nn.Module], config: GoraConfig, calibration: Iterable[Any],
               loss_fn: LossFn | None, tapped: dict[str, nn.Module], shared: set[str], acc: dict[str, Tensor],
               saved: _Saved, dist: Any) -> tuple[int, int, bool]:
    """Every parameter frozen with its ``.grad`` cleared, the shared targets given leaves of their own
    (:func:`_own_leaves`), the gradient hooks on, the calibration's size checked, then the steps (:func:`_steps`);
    the model given back as ``saved`` holds it, also when this raises. Returns what :func:`_steps` returns."""
    hooks: list[Any] = []
    swapped: dict[str, tuple[nn.Module, nn.Parameter]] = {}
    try:
        for p in saved.params.values():
            p.requires_grad_(False)
            p.grad = None
        _own_leaves(model, targets, shared, swapped)
        scaler = LossScale.for_model(model)
        _hook_gradients(targets, tapped, acc, hooks, scaler)
        error = _caught(_check_calibration_size, calibration, config)
        it: Iterator[Any] = iter(calibration) if error is None else iter(())  # type: ignore[arg-type]
        return _steps(model, targets, config, it, error, loss_fn, scaler, acc, dist)
    finally:
        _original_weights(swapped)
        _restore(model, hooks, saved.params, saved.flags, saved.grads, saved.buffers)


def _mean_gradients(targets: dict[str, nn.Module], acc: dict[str, Tensor], steps: int, dist: Any) -> dict[str, Tensor]:
    """Step 1's ``Ḡ_i``: each target's gradient sum over the steps divided by their count, ``out x in``; under
    ``torch.distributed`` the mean over the ranks (each took the same steps, so it is the whole batch's mean)."""
    mean = {name: _weight_out_in(targets[name], a / steps) for name, a in acc.items()}
    if dist is not None:
        mean = {name: mean_across_ranks(g) for name, g in mean.items()}
    return mean


def _gradient_stats(steps: int, batches: int, early: bool, start: float, acc: dict[str, Tensor],
                    cuda_devices: set[torch.device], dist: Any) -> GradientStats:
    """What the collection cost (time since ``start``, accumulator bytes, peak CUDA memory) and how it ended."""
    return GradientStats(
        steps=steps,
        batches=batches,
        early_stopped=early,
        seconds=time.perf_counter() - start,
        accumulator_bytes=sum(a.numel() * a.element_size() for a in acc.values()),
        peak_cuda_bytes=max((torch.cuda.max_memory_allocated(d) for d in cuda_devices), default=None),
        world_size=dist.get_world_size() if dist is not None else 1,
    )


def collect_gradients(
    model: nn.Module, targets: dict[str, nn.Module], config: GoraConfig, calibration: Iterable[Any], loss_fn: LossFn | None
) -> tuple[dict[str, Tensor], GradientStats]:
    """Step 1: the mean gradient ``Ḡ_i`` (fp32, or fp64 for an fp64 model; ``out x in``) of every target weight.
    On an fp16 model the calibration loss is scaled as ``torch.amp.GradScaler`` scales it (:class:`LossScale`), so
    small gradients neither vanish nor lose their precision in fp16.

    The model comes back as it went in: ``requires_grad`` flags, ``.grad`` fields and buffers (e.g.
    batch-norm statistics updated in train mode) are restored, also when this raises. Its 4-bit layers are
    kept out of bitsandbytes' CPU inference repacking (``rankwise.quant.keep_layout``), which an eval-mode
    calibration forward would otherwise trigger. The model's
    train/eval mode is left as the caller set it (dropout then acts as in training).

    Under ``torch.distributed`` every rank must call this with the same ``n_steps`` and
    ``grad_accumulation`` (each on its own shard of the batches, of one size on every rank: the mean of the
    ranks' means is the whole batch's mean only then, as under DDP): the mean is all-reduced at the end; after
    every step, whether each rank's step went well (:func:`_stop_together`) and, with early stopping, a stop
    flag. So a rank whose batches fail (too few, no loss, a NaN gradient) stops every rank at that step, each
    raising, rather than leaving the others waiting in a collective it never joins.
    """
    # the calibration forwards run in the caller's mode; an eval-mode model (as from_pretrained returns it)
    # would let bitsandbytes repack its 4-bit CPU weights, after which training through them fails
    keep_layout(model)
    dist = process_group()
    saved = _Saved.of(model)
    cuda_devices = _cuda_devices(targets)
    tapped = _tapped(model, targets)
    shared = _shared(model, targets, _followed(model, targets, config))
    acc = _accumulators(targets, config.offload_to_cpu)
    for d in cuda_devices:
        torch.cuda.reset_peak_memory_stats(d)
    start = time.perf_counter()
    steps, batches, early = _calibrate(model, targets, config, calibration, loss_fn, tapped, shared, acc, saved, dist)
    mean = _mean_gradients(targets, acc, steps, dist)
    return mean, _gradient_stats(steps, batches, early, start, acc, cuda_devices, dist)


# ---------------------------------------------------------------------------- 2. importance
def _importance(module: nn.Module, grad_like: Tensor, kind: str) -> float:
    """One layer's importance from its (running) mean gradient ``out x in`` (a convolution's too: its weight as the
    ``out x in`` matrix of its patch map; every measure is the same on the transposed matrix)."""
    g = grad_like.float()
    if kind == "nuclear_g":
        return float(torch.linalg.matrix_norm(g, ord="nuc"))
    w = _weight_out_in(module, dense_weight(module)).detach()  # out x in, dequantised if quantised
    wg = w.to(device=g.device, dtype=torch.float32) * g
    return float(wg.abs().mean()) if kind == "mean_abs_wg" else float(torch.linalg.matrix_norm(wg, ord="nuc"))


def importances(targets: dict[str, nn.Module], grads: dict[str, Tensor], kind: str) -> dict[str, float]:
    """Step 2: ``I_i`` for every layer (``grads`` are ``out x in``); raises naming a layer whose ``I_i`` is not finite."""
    out = {name: _importance(targets[name], grads[name], kind) for name in targets}
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
