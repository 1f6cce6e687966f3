"""Putting a module in a model's slot (``parent.child = module``), with the slot's hooks going along.

``attach`` puts an adapter layer where a module was (and ``detach``, ``delete``, ``set_active`` and a failed
attach's rollback put modules back); the adapter layer computes the base itself, so the module it replaced is never
called. Hooks a user (or a library) registered on that module — forward pre-hooks that change the input, forward
hooks that read or change the output, backward hooks — would silently stop running. So every replacement moves the
hook tables to the module now in the slot and gives the one leaving it the new module's (empty, for a new adapter
layer): each hook keeps running exactly once per call, on the module that now stands there, seeing its input and
its (adapted) output; the ``RemovableHandle`` it returned still removes it, since the table moves as one object.
HF PEFT instead calls the wrapped base layer, so its hooks see the base's own output, without the update.
"""

from __future__ import annotations

from torch import nn

# nn.Module's per-module hook tables (torch 2.x); state-dict hooks stay with their module (they describe its tensors)
HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def swap_hooks(leaving: nn.Module, arriving: nn.Module) -> None:
    """Exchange the two modules' hook tables (the table objects themselves, so handles stay valid)."""
    for table in HOOK_TABLES:
        if hasattr(leaving, table) and hasattr(arriving, table):
            held = getattr(leaving, table)
            object.__setattr__(leaving, table, getattr(arriving, table))
            object.__setattr__(arriving, table, held)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` in ``model`` (``name`` non-empty), the hooks of the one there moving to it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    leaving = getattr(parent, child)
    if isinstance(leaving, nn.Module) and leaving is not module:
        swap_hooks(leaving, module)
    setattr(parent, child, module)
