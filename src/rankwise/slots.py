"""Putting a module in a model's slot (``parent.child = module``), with the slot's hooks going along.

``attach`` puts an adapter layer where a module was (and ``detach``, ``delete``, ``set_active`` and a failed
attach's rollback put modules back); the adapter layer computes the base itself, so the module it replaced is never
called. Hooks a user (or a library) registered on that module — forward pre-hooks that change the input, forward
hooks that read or change the output, backward hooks — would silently stop running. So every replacement moves the
hook tables to the module now in the slot and gives the one leaving it the new module's (empty, for a new adapter
layer): each hook keeps running exactly once per call, on the module that now stands there, seeing its input and
its (adapted) output; the ``RemovableHandle`` it returned still removes it, since the table moves as one object.
HF PEFT instead calls the wrapped base layer, so its hooks see the base's own output, without the update.
Accelerate's hooks (``accelerate.hooks.add_hook_to_module``, which ``device_map`` dispatch uses: ``_hf_hook``, run by
a ``forward`` it wraps) move the same way, through Accelerate's own functions.
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, MutableMapping
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.module import _WrappedHook

M = TypeVar("M", bound=nn.Module)

# nn.Module's per-module hook tables (torch 2.x); state-dict hooks stay with their module (they describe its tensors)
HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")
# the state-dict tables: shared with a copy by copy_module, never moved (they describe their module's tensors)
STATE_DICT_TABLES = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def state_dict_hooks(module: nn.Module, *, besides: Collection[int] = frozenset()) -> dict[str, dict[int, Any]]:
    """``module``'s state-dict hooks by kind: ``{kind: {handle id: hook}}``, the kind its table's name without the
    underscores (``state_dict_hooks``, ``load_state_dict_pre_hooks``, ...: :data:`STATE_DICT_TABLES`), leaving out the
    hooks whose handle ids are in ``besides`` and the kinds then holding none. The one listing of them: the hooks
    ``attach`` names as left on a target, those an adapter layer records as its own when it goes on the model, and
    those it names as a user's at ``detach``."""
    out: dict[str, dict[int, Any]] = {}
    for table in STATE_DICT_TABLES:
        hooks = {k: h for k, h in getattr(module, table, {}).items() if k not in besides}
        if hooks:
            out[table.strip("_")] = hooks
    return out


def hook_package(hook: Any) -> str:
    """The top-level package a hook's function comes from (``"bitsandbytes"``, ``"rankwise"``, ...; ``""`` where it
    does not say), looking through torch's wrapper of a state-dict hook registered with its module."""
    return str(getattr(getattr(hook, "hook", hook), "__module__", "") or "").split(".")[0]


def swap_hooks(leaving: nn.Module, arriving: nn.Module) -> None:
    """Exchange the two modules' hook tables (the table objects themselves, so handles stay valid)."""
    for table in HOOK_TABLES:
        if hasattr(leaving, table) and hasattr(arriving, table):
            held = getattr(leaving, table)
            object.__setattr__(leaving, table, getattr(arriving, table))
            object.__setattr__(arriving, table, held)


def swap_accelerate_hooks(leaving: nn.Module, arriving: nn.Module) -> None:
    """Exchange the two modules' Accelerate hooks (``_hf_hook``, set by ``accelerate.hooks.add_hook_to_module``), each
    taken off with ``remove_hook_from_module`` and put on the other with ``add_hook_to_module``."""
    hooks = [getattr(leaving, "_hf_hook", None), getattr(arriving, "_hf_hook", None)]
    if hooks == [None, None]:
        return
    # a hook is there, so Accelerate is installed
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    for module, hook in zip((leaving, arriving), hooks):
        if hook is not None:
            remove_hook_from_module(module)
    for module, hook in zip((arriving, leaving), hooks):
        if hook is not None:
            add_hook_to_module(module, hook)


class BoundLoadPreHooks(MutableMapping[int, Any]):
    """A module's load pre-hook table (``_load_state_dict_pre_hooks``) over a table it shares with another module
    (a ``modules_to_save`` module and its trained copy: :func:`copy_module`). torch binds such a hook to the module it
    was registered on (``_WrappedHook``, holding it weakly) and passes that module, not the one being loaded; read
    through this table every bound hook gets its :attr:`owner`, the module whose table it is. Entries live in
    :attr:`hooks`, the one table both modules read, so a hook's ``RemovableHandle`` (registered on either, before
    attach or after) removes it from both."""

    def __init__(self, hooks: MutableMapping[int, Any], owner: nn.Module) -> None:
        self.hooks = hooks
        self._owner = weakref.ref(owner)  # the owner holds this table: a strong reference would be a cycle

    def _bound(self, hook: Any) -> Any:
        owner = self._owner()
        if isinstance(hook, _WrappedHook) and hook.with_module and owner is not None and hook.module() is not owner:
            return _WrappedHook(hook.hook, owner)
        return hook

    def __getitem__(self, key: int) -> Any:
        return self._bound(self.hooks[key])

    def __setitem__(self, key: int, hook: Any) -> None:
        self.hooks[key] = hook

    def __delitem__(self, key: int) -> None:
        del self.hooks[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)

    def _plain(self) -> OrderedDict[int, Any]:
        return OrderedDict(self.items())

    def __deepcopy__(self, memo: dict[int, Any]) -> MutableMapping[int, Any]:
        """A copy of the owner (being copied: it is in ``memo``) gets this table over the copy of :attr:`hooks`, which
        the copy of the other module sharing it (copied in the same ``deepcopy``) reads too, so the copy shares as the
        original does; a copy of the owner alone gets a table of its own, as torch's would. A table copied without
        its owner is the plain table, bound to the owner."""
        owner = memo.get(id(self._owner()))
        if owner is None:
            return copy.deepcopy(self._plain(), memo)
        return BoundLoadPreHooks(copy.deepcopy(self.hooks, memo), owner)

    def __reduce__(self) -> tuple[Any, ...]:
        """``torch.save`` of a model: the shared table and the owner, so ``torch.load`` shares as :meth:`__deepcopy__`
        does (the file holds each object once); without an owner, the plain table."""
        owner = self._owner()
        if owner is None:
            return (OrderedDict, (list(self.items()),))
        return (BoundLoadPreHooks, (self.hooks, owner))


def _shared_load_pre_hooks(module: nn.Module) -> MutableMapping[int, Any]:
    """The table ``module``'s load pre-hooks live in (the one under its :class:`BoundLoadPreHooks`, if it has one)."""
    table = module._load_state_dict_pre_hooks
    return table.hooks if isinstance(table, BoundLoadPreHooks) else table


def copy_module(module: M, shared: dict[int, Any] | None = None) -> M:
    """A deep copy of ``module`` (``modules_to_save``'s trained copy) sharing its hook tables: each hook table of it
    and its submodules is the same table object in the copy, so an object a hook is a method of (one holding the
    model, or a lock) is not copied, and a hook's ``RemovableHandle`` (registered on the original or on the copy,
    before attach or after) removes it from both. Only one of the two is in the model at a time (the original inside
    ``disabled()`` or while its adapter is idle, the copy otherwise), so each hook runs once per call. The load
    pre-hooks, which torch binds to the module they were registered on, are shared through a
    :class:`BoundLoadPreHooks` on each side, so each runs on the module being loaded. ``shared``: a memo kept across
    the copies of several modules, so modules that share a tensor (a tied head and its embedding) share its copy."""
    memo: dict[int, Any] = {} if shared is None else shared
    for m in module.modules():
        for name in HOOK_TABLES + STATE_DICT_TABLES:
            table = getattr(m, name, None)
            if isinstance(table, (dict, BoundLoadPreHooks)):
                memo[id(table)] = table
    copied = copy.deepcopy(module, memo)
    for original, twin in zip(module.modules(), copied.modules()):
        hooks = _shared_load_pre_hooks(original)
        for m in (original, twin):
            object.__setattr__(m, "_load_state_dict_pre_hooks", BoundLoadPreHooks(hooks, m))
    return copied


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` in ``model`` (``name`` non-empty), the hooks of the one there moving to it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    leaving = getattr(parent, child)
    if isinstance(leaving, nn.Module) and leaving is not module:
        swap_hooks(leaving, module)
        swap_accelerate_hooks(leaving, module)
    setattr(parent, child, module)


def replace_all(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Put each of ``modules`` in its slot (``{name: module}``, :func:`set_submodule`), all or nothing: if a
    replacement raises (an interrupt too), the slots already replaced get back the modules they held, hooks and
    all, before the error goes on."""
    done: list[tuple[str, nn.Module]] = []
    try:
        for name, module in modules.items():
            leaving = model.get_submodule(name)
            set_submodule(model, name, module)
            done.append((name, leaving))
    except BaseException:
        for name, leaving in reversed(done):
            set_submodule(model, name, leaving)
        raise


def hand_over_tensors(leaving: nn.Module, arriving: nn.Module, names: list[str]) -> None:
    """Move parameters and buffers ``names`` (the same objects: ``requires_grad``, a buffer's persistence kept) from
    ``leaving`` to ``arriving`` (which holds no attribute of those names: the caller checks), so
    ``model.state_dict()`` keeps their keys when a module leaves its slot for good."""
    for name in names:
        if name in leaving._parameters:
            arriving.register_parameter(name, leaving._parameters.pop(name))
            continue
        persistent = name not in leaving._non_persistent_buffers_set
        arriving.register_buffer(name, leaving._buffers.pop(name), persistent=persistent)
        leaving._non_persistent_buffers_set.discard(name)
