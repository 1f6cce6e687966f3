"""Adapter control: switch every adapter off for a block, choose the active ones, delete one.

``with rankwise.disabled(model):`` — inside, each adapted module runs its base module's own forward,
so the model computes exactly what it computed before ``attach`` (bit for bit, in any dtype, merged or
not), and no adapter tensor is in the graph; a fully-trained module (``modules_to_save``, trained as a
copy) is its original for the block. A merged model is not refused: each merged layer swaps
its kept original bits into the weight for the block and the merged bits back after (exact both ways,
one layer's copy at a time). On exit — also when the block raises — everything is as it was; blocks
nest. This is how a preference trainer gets reference log-probabilities from the policy's own
weights (HF PEFT's ``disable_adapter()``).

Several adapters on one model (``attach(model, cfg, name=...)``): :func:`set_active` chooses those
that compute, and their order (:func:`active_adapters` reads them) (as HF PEFT's ``set_adapter``: LoRA-form updates add up, a DoRA adapter
rescales those before it); :func:`delete` removes one, leaving the others
computing exactly what they computed before.

``with rankwise.per_example(model, ["a", "b", None, ["a", "b"]]):`` — a mixed batch (HF PEFT's
``adapter_names=``): row ``i`` computes with its own adapter(s) or, for ``None``, the base model, whatever is
active; each adapted module runs each distinct set of adapters on its rows
(:meth:`rankwise.AdapterLayer.per_example_forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from typing import Any, cast

from torch import Tensor, nn

from .distributed import sharded
from .layer import AdapterLayer, Examples
from .lifecycle import _like, check_leaving, detach, hand_over_additions, refuse_if_merged_or_disabled
from .slots import replace_all as _replace_all
from .state import RankwiseState, adapter_set, names_in_order, slot_layers, unwrap_model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is its base model: every adapter (of every name) is off, and each
    fully-trained module (``modules_to_save``, trained as a copy) is its original again.

    Merge, unmerge, attach, delete and detach are refused inside the block. The modules are swapped all or
    nothing (:func:`rankwise.slots.replace_all`). Should the exit fail part way (an interrupt, out of memory while a
    merged layer gets its bits back), the model is *half enabled*: the trained copies stay set aside (kept, saved),
    some layers may still compute the base, and every forward (and merge, detach, delete, attach, a new block) is
    refused, naming ``set_active(model, list(active_adapters(model)))``, which finishes the exit.
    """
    model = unwrap_model(model)
    adapters = adapter_set(model)
    for layer in slot_layers(model).values():
        layer.refuse_if_half_enabled("enter rankwise.disabled")
        layer.refuse_in_per_example("enter rankwise.disabled (use None for the examples that run the base model)")
    switched: list[AdapterLayer] = []
    aside: dict[str, tuple[RankwiseState, nn.Module]] = {}
    try:
        for where, layer in slot_layers(model).items():
            if not layer.disabled:  # an enclosing block's layers are left to it
                switched.append(layer)
                layer.disable(where)
        copies = _trained_copies(model, adapters.adapters.values())  # (an enclosing block, or set_active: none)
        _replace_all(model, {name: _like(state.original_modules[name], copy) for name, (state, copy) in copies.items()})
        for name, (state, copy) in copies.items():
            state.idle_modules[name] = copy  # set aside as an idle adapter's: save, state_dict find it
        aside = copies
        yield model
    finally:
        try:
            try:  # the copies back, all or nothing: on an error they stay set aside (kept; set_active puts them back)
                _replace_all(model, {name: copy for name, (_, copy) in aside.items()})
                for name, (state, _) in aside.items():
                    del state.idle_modules[name]
            finally:
                for layer in reversed(switched):
                    layer.enable()  # each one all or nothing
        except BaseException as error:
            _mark_half_enabled(model, error, aside)
            raise


def _mark_half_enabled(model: nn.Module, error: BaseException,
                       aside: dict[str, tuple[RankwiseState, nn.Module]]) -> None:
    """After a failed exit of :func:`disabled`: every adapter layer refuses the forward (and the calls that would build
    on this state), saying what happened and that :func:`set_active` finishes the exit. So does each fully-trained
    module the block set aside (``aside``: its trained copy and its original, each submodule; one hook per hook table,
    which the two share), since a call of it alone passes through no adapter layer and its slot may still hold the
    original, silently not the trained one."""
    why = (f"rankwise.disabled(model) failed as it exited ({type(error).__name__}: {error}), so the model is half "
           "enabled: some adapter layers may still compute the base model, and some fully-trained modules "
           "(modules_to_save) be their originals, their trained copies set aside (kept; rankwise.save writes them). "
           "Finish the exit with rankwise.set_active(model, list(rankwise.active_adapters(model)))")
    for layer in slot_layers(model).values():
        layer.half_enabled = why
    hooks = adapter_set(model).half_enabled_hooks
    tops = [top for name, (state, copy) in aside.items() for top in (copy, state.original_modules[name])]
    for module in _one_per_table(tops):
        hooks.append(module.register_forward_pre_hook(_RefuseForward(why)))


class _RefuseForward:
    """The forward pre-hook a half-enabled model's fully-trained modules carry (:func:`_mark_half_enabled`): it
    raises, saying why. A class, not a closure, so the model can still be pickled (``torch.save(model)``,
    ``copy.deepcopy``) and the copy refuses and recovers as the model does."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __call__(self, module: nn.Module, args: object) -> None:
        raise RuntimeError(f"cannot run the forward: {self.why}")


def _one_per_table(tops: Iterable[nn.Module]) -> list[nn.Module]:
    """One module per forward pre-hook table among ``tops`` and their submodules: a trained copy and its original
    share their tables (:func:`rankwise.slots.copy_module`), so a hook registered on each would sit in one table
    twice (and run twice)."""
    return list({id(m._forward_pre_hooks): m for top in tops for m in top.modules()}.values())


def _trained_copies(model: nn.Module, states: Iterable[RankwiseState]) -> dict[str, tuple[RankwiseState, nn.Module]]:
    """``{module name: (its adapter's state, trained copy)}`` for each fully-trained module whose slot holds its trained
    copy now (not its original)."""
    out: dict[str, tuple[RankwiseState, nn.Module]] = {}
    for state in states:
        for name, original in state.original_modules.items():
            current = model.get_submodule(name)
            if current is not original:
                out[name] = (state, current)
    return out


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make adapter(s) ``names`` the ones that compute; the others stay on the model, idle.

    Several active adapters are applied in the order given, as HF PEFT's ``set_adapter`` applies them: LoRA-form
    updates add up (``W0 + Σ ΔW_i``, in any order), a DoRA-family adapter's magnitude rescales what the adapters
    before it computed (:class:`rankwise.AdapterLayer`). An idle adapter's fully-trained modules
    (``modules_to_save``, trained as copies) are set aside and the originals put in, as HF PEFT's
    ``set_adapter`` does: an idle adapter contributes nothing. ``requires_grad`` is left as it is (an idle
    adapter gets no gradient because it is not in the graph). Refused inside ``rankwise.disabled``, and on a
    merged model unless ``names`` is the set it merged (which changes nothing). All or nothing: an error while
    swapping the modules (an interrupt too) changes nothing. On a model left half enabled by a failed ``disabled()``
    exit it first finishes that exit (every layer enabled, each all or nothing; then the trained copies back), so
    ``set_active(model, list(active_adapters(model)))`` is the way back, merged or not; the same for a copy of a model
    (``copy.deepcopy``, ``torch.save`` / ``torch.load``) taken inside a ``disabled()`` block, which computes the base
    until then.
    """
    model = unwrap_model(model)
    adapters = adapter_set(model)
    chosen = names_in_order(names)  # in the order given, once each
    if not chosen:
        raise ValueError("set_active needs at least one adapter name (use `with rankwise.disabled(model):` for none)")
    for name in chosen:
        adapters.resolve(name)
    hosts = slot_layers(model).values()
    # a failed disabled() exit, or a copy taken inside a block (which no block will enable): finished here
    half = any(host.half_enabled is not None or host.copied_inside_disabled() for host in hosts)
    for host in hosts:
        if half:  # each layer all or nothing
            host.enable()
        host.refuse_while_disabled("change the active adapters")
    if any(layer.merged for layer in hosts) and chosen != adapters.active:
        raise ValueError(f"cannot change the active adapters of a merged model (merged: {adapters.active}): "
                         "call rankwise.unmerge(model) first")
    _set_idle_modules(model, {name: (state, name not in chosen) for name, state in adapters.adapters.items()})
    for handle in adapters.half_enabled_hooks:  # after the only steps that can fail: the half-enabled marks go
        handle.remove()
    adapters.half_enabled_hooks.clear()
    for host in hosts:
        host.half_enabled = None
        for layer in host.stack():
            layer.active = layer.adapter_name in chosen
            layer.order = chosen.index(layer.adapter_name) if layer.active else 0
    adapters.active = chosen


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The names of the adapters that compute, in the order they are applied (:func:`set_active`'s order; HF PEFT's
    ``active_adapters``).

    ``attach(..., name=)`` puts a new adapter last, ``merge(model, name)`` makes the merged ones the set, ``delete``
    takes one out, and ``load`` of a multi-adapter save restores the saved set. Inside ``rankwise.disabled`` it is the
    set that computes once the block ends. A tuple: a copy, so changing the model's set goes through
    :func:`set_active` (``set_active(model, list(active_adapters(model)))`` changes nothing). ``ValueError`` for a
    model without rankwise adapters.
    """
    return tuple(adapter_set(unwrap_model(model)).active)


def _set_idle_modules(model: nn.Module, states: dict[str, tuple[RankwiseState, bool]]) -> None:
    """Each adapter's fully-trained modules for its activity (``{adapter: (state, idle)}``): the trained copies while
    active; while idle the originals, the copies kept in ``state.idle_modules`` (idempotent both ways). All or nothing
    (:func:`rankwise.slots.replace_all`): ``idle_modules`` changes only once every slot holds its new module."""
    modules: dict[str, nn.Module] = {}
    aside: list[tuple[RankwiseState, str, nn.Module]] = []
    back: list[tuple[RankwiseState, str]] = []
    for state, idle in states.values():
        for name, original in state.original_modules.items():
            if idle and name not in state.idle_modules:
                aside.append((state, name, model.get_submodule(name)))
                modules[name] = _like(original, aside[-1][2])
            elif not idle and name in state.idle_modules:
                back.append((state, name))
                modules[name] = state.idle_modules[name]
    _replace_all(model, modules)
    for state, name, copy in aside:
        state.idle_modules[name] = copy
    for state, name in back:
        del state.idle_modules[name]


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; every other adapter stays and computes exactly what it did.

    Deleting the last adapter is :func:`rankwise.detach` (the original modules back); deleting the only
    active one activates the first remaining (as HF PEFT does). The deleted adapter's fully-trained
    modules get their originals back, as ``detach`` does. Refused on a merged model, inside
    ``rankwise.disabled`` and on a model FSDP shards (delete before ``fully_shard``). All or nothing, as ``detach``:
    its refusals come before any module is replaced, an error while replacing puts every slot and peer back.
    """
    model = unwrap_model(model)
    adapters = adapter_set(model)
    adapters.resolve(name)
    refuse_if_merged_or_disabled(model, f"delete adapter {name!r}")
    if sharded(model):
        raise ValueError(
            f"cannot delete adapter {name!r}: FSDP manages this model (fully_shard / FullyShardedDataParallel), and its "
            "parameter groups and hooks stay on the modules it wrapped, so a layer taken out of them would leave FSDP "
            "gathering tensors no module uses and a promoted layer running another module's hooks. Delete before "
            "sharding, or leave the adapter idle (rankwise.set_active(model, others)): an idle adapter computes nothing")
    if len(adapters.adapters) == 1:
        detach(model)
        return
    hosts = slot_layers(model)
    leaving = {slot: host for slot, host in hosts.items() if host.adapter_name == name}
    check_leaving(leaving, promoting=True)  # before anything changes (a promoted peer's names too)
    modules: dict[str, nn.Module] = {}
    try:  # all or nothing: an error (an interrupt too) puts the slots back and the peers in their hosts
        for slot, host in leaving.items():
            modules[slot] = _promote(host, host.stack()[1:])
        originals = adapters.adapters[name].original_modules  # as detach(): the originals back
        modules.update({n: _like(original, model.get_submodule(n)) for n, original in originals.items()})
        _replace_all(model, modules)
    except BaseException:
        for slot, host in leaving.items():
            if slot in modules:
                _demote(host, modules[slot])
        raise
    for slot, host in leaving.items():
        hand_over_additions(slot, host, modules[slot])
    for host in hosts.values():
        if host.adapter_name != name and any(layer.adapter_name == name for layer in host.stack()):
            host.remove_peer(name)
    del adapters.adapters[name]
    remaining = [n for n in adapters.active if n != name]
    set_active(model, remaining or [next(iter(adapters.adapters))])  # none left active: the first one (as HF PEFT)


def _promote(host: AdapterLayer, peers: list[AdapterLayer]) -> nn.Module:
    """What takes ``host``'s slot when its adapter goes: the first peer (holding the rest), or the base module."""
    if not peers:
        return host.to_base()
    new_host, rest = host.remove_peer(peers[0].adapter_name), peers[1:]
    new_host.make_host()
    new_host.tied = host.tied
    for peer in rest:
        new_host.add_peer(host.remove_peer(peer.adapter_name))
    return new_host


def _demote(host: AdapterLayer, promoted: nn.Module) -> None:
    """Undo :func:`_promote`: the layer that took ``host``'s slot, and the peers it took, back among ``host``'s peers in
    their order (nothing, where the base module took the slot)."""
    if not isinstance(promoted, AdapterLayer) or promoted is host:
        return
    rest = [promoted.remove_peer(peer.adapter_name) for peer in promoted.stack()[1:]]  # the last takes "peers" along
    promoted.tied = False
    for layer in (promoted, *rest):
        host.add_peer(layer)


PerExampleNames = Sequence[str | Sequence[str] | None]  # one entry per example: a name, names in order, or None


@contextmanager
def per_example(model: nn.Module, names: PerExampleNames, *, repeats: int = 1) -> Iterator[nn.Module]:
    """Within the block, example ``i`` of each batch computes with adapter ``names[i]``: row ``i`` of the output is
    the model's output for row ``i`` alone after ``set_active(model, names[i])``, or inside ``disabled()`` for
    ``None`` (HF PEFT's ``adapter_names=``, its ``"__base__"`` spelled ``None``). An entry may also be a list of
    names, an active set in order (a DoRA-family adapter rescales those before it, as in :func:`set_active`).

    Any adapter on the model may be named, active or idle; the active set is not used and not changed. Every method
    is exact through the adapter-layer contract: each adapted module runs each distinct set on its rows
    (:meth:`rankwise.AdapterLayer.per_example_forward`), and each fully-trained module (``modules_to_save``) its
    trained copy for the rows whose set holds its adapter, its original for the rest. ``repeats``: the rows each
    example covers in a batch expanded in place (``generate``: ``max(num_beams, num_return_sequences)``); a module
    whose first dimension is neither ``len(names)`` nor ``len(names) * repeats`` raises rather than guess. Gradients
    and train mode are allowed (each adapter's tensors get the gradient of its own rows); with gradient
    checkpointing, call ``backward`` inside the block (the recomputation runs the layers again, routed only there; a
    layer recomputed after the block raises ``RuntimeError`` rather than compute the active set's gradients).
    Inside ``rankwise.scaled`` the rows compute with the rescaled adapters.
    Refused, with nothing changed: a merged model, inside ``disabled()``, a half-enabled model, a nested block;
    unknown names, none at all. Inside the block, calls that change the adapters (merge, attach, delete,
    set_active, load, save) are refused. On exit, also when the block raises, every layer and module computes as
    before."""
    model = unwrap_model(model)
    adapters = adapter_set(model)
    examples = Examples(tuple(_example_names(adapters.adapters, entry) for entry in _entries(names)), _repeats(repeats))
    hosts = slot_layers(model)
    for host in hosts.values():
        host.refuse_if_half_enabled("enter rankwise.per_example")
        host.refuse_while_disabled("enter rankwise.per_example", scaled_ok=True)  # inside disabled(), or a nested block
    slots = [name for state in adapters.adapters.values() for name in state.original_modules]
    if any(isinstance(model.get_submodule(name).__dict__.get("forward"), _RoutedForward) for name in slots):
        raise RuntimeError("cannot enter rankwise.per_example inside `with rankwise.per_example(model, names):`; "
                           "one block gives each example its adapters")
    if any(host.merged for host in hosts.values()):
        raise ValueError("rankwise.per_example runs each example's adapters unmerged, and this model is merged (its "
                         "weights hold the active set for every example): call rankwise.unmerge(model) first")
    trained = _fully_trained(model, adapters.adapters)
    routed: list[nn.Module] = []
    try:
        for slot, host in hosts.items():
            host.per_example = (examples, f"adapter layer {slot!r}")
        for name, (adapter, copy, original) in trained.items():
            module = model.get_submodule(name)
            if isinstance(module.__dict__.get("forward"), _RoutedForward):
                continue  # one module held at two names: routed once
            module.__dict__["forward"] = _RoutedForward(examples, adapter, copy, original, module, name)
            routed.append(module)
        yield model
    finally:
        for host in hosts.values():
            host.per_example = None
        for module in reversed(routed):
            module.__dict__["forward"] = module.__dict__["forward"].previous
            if module.__dict__["forward"] is None:
                del module.__dict__["forward"]


def _entries(names: PerExampleNames) -> list[str | Sequence[str] | None]:
    """``names`` as a list of entries, one per example; a ``TypeError`` for one string (its letters are no
    examples) or a set (no order), a ``ValueError`` for none."""
    if isinstance(names, (str, bytes, set, frozenset)) or not isinstance(names, Sequence):
        raise TypeError(f"rankwise.per_example needs a list with one entry per example (an adapter name, a list of "
                        f"names, or None for the base model), got {type(names).__name__} {names!r}")
    if not names:
        raise ValueError("rankwise.per_example needs one entry per example, and got none")
    return list(names)


def _example_names(known: dict[str, RankwiseState], entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """One example's adapters as a tuple of names in order (``()`` for ``None`` or an empty list), each checked to be
    on the model; HF PEFT's ``"__base__"`` gets a hint that ``None`` is rankwise's spelling."""
    if entry is not None and not isinstance(entry, (str, list, tuple, set, frozenset)):
        raise TypeError(f"rankwise.per_example: an entry is an adapter name, a list of names or None, "
                        f"got {entry!r}")
    chosen = () if entry is None else tuple(names_in_order(entry))  # a set: refused there (no order)
    for name in chosen:
        if not isinstance(name, str):
            raise TypeError(f"rankwise.per_example: an entry is an adapter name, a list of names or None, "
                            f"got {entry!r}")
        if name not in known:
            hint = " (rankwise spells HF PEFT's '__base__', the base model, as None)" if name == "__base__" else ""
            raise ValueError(f"rankwise.per_example: no adapter named {name!r} on this model{hint}; "
                             f"its adapters: {sorted(known)}")
    return chosen


def _repeats(repeats: int) -> int:
    """``repeats`` checked to be a positive ``int``."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"rankwise.per_example: repeats must be a positive int (generate's "
                         f"max(num_beams, num_return_sequences)), got {repeats!r}")
    return repeats


def _fully_trained(model: nn.Module, states: dict[str, RankwiseState]) -> dict[str, tuple[str, nn.Module, nn.Module]]:
    """``{module name: (its adapter, trained copy, original)}`` for every fully-trained module (``modules_to_save``),
    active or idle; an original out of its slot on the copy's device and dtype, as :func:`set_active` would put it in
    (:func:`rankwise.lifecycle._like`)."""
    out: dict[str, tuple[str, nn.Module, nn.Module]] = {}
    for adapter, state in states.items():
        for name, original in state.original_modules.items():
            current = model.get_submodule(name)
            copy = state.idle_modules.get(name, current)
            out[name] = (adapter, copy, original if current is original else _like(original, copy))
    return out


class _RoutedForward:
    """A fully-trained module's ``forward`` inside :func:`per_example` (set on the module in the slot, which keeps its
    hooks, and run once for the batch): the trained copy's forward for the rows whose adapters include ``adapter``,
    the original's for the rest. Each tensor argument whose first dimension is the batch is split by rows; the
    module must then return one tensor (a head: logits, scores). One set for every row: the whole batch, unsplit."""

    def __init__(self, examples: Examples, adapter: str, copy: nn.Module, original: nn.Module, slot: nn.Module,
                 where: str) -> None:
        self.examples, self.adapter, self.where, self.slot = examples, adapter, where, slot
        self.previous: Callable[..., Any] | None = slot.__dict__.get("forward")  # an instance forward (accelerate's)
        own = self.previous if self.previous is not None else type(slot).forward.__get__(slot)
        # {whether the rows' adapters include `adapter`: the forward to run}; the slot's own runs as its forward was
        self.forwards = {True: own if slot is copy else copy.forward,
                         False: own if slot is original else original.forward}

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., Any]:
        """A copy of the module taken inside the block (``copy.deepcopy``) computes as outside it: its own forward."""
        if self.previous is not None:
            return cast(Callable[..., Any], deepcopy(self.previous, memo))
        return _OwnForward(deepcopy(self.slot, memo))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (``torch.save`` of the model inside the block): loaded, the module computes its own forward."""
        return (_OwnForward, (self.slot,)) if self.previous is None else (_same, (self.previous,))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() > 0), None)
        if first is None:
            raise TypeError(f"rankwise.per_example: fully-trained module {self.where!r} got no tensor to split by "
                            "example")
        rows = int(first.shape[0])
        groups, inverse = self.examples.split(rows, first.device, f"fully-trained module {self.where!r}")
        if len(groups) == 1:  # one set for every row: the whole batch, whatever the module returns
            return self.forwards[self.adapter in groups[0][0]](*args, **kwargs)
        outs = []
        for names, idx in groups:
            part = [_take(t, idx, rows) for t in args]
            out = self.forwards[self.adapter in names](*part, **{k: _take(v, idx, rows) for k, v in kwargs.items()})
            if not isinstance(out, Tensor):
                raise TypeError(f"rankwise.per_example: fully-trained module {self.where!r} returns "
                                f"{type(out).__name__}, not one tensor, so its rows cannot be put back per example; "
                                "train it as adapter layers instead, or run one adapter per batch")
            outs.append(out)
        return Examples.gather(outs, inverse, f"fully-trained module {self.where!r}")


def _take(value: Any, idx: Tensor | slice, rows: int) -> Any:
    """``value[idx]`` for a tensor whose first dimension is the batch (``rows``), else ``value`` as it is."""
    return value[idx] if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows else value


class _OwnForward:
    """What a copy of a routed module (taken inside :func:`per_example`) gets for its ``forward``: the module's class
    forward, as if nothing were set (the copy's own hooks still run around it)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)


def _same(value: Any) -> Any:
    """``value`` itself (unpickling a routed module's earlier instance ``forward``)."""
    return value
