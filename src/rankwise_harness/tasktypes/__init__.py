"""The task-type registry: which :class:`TaskType` trains a task on a model.

Three are built in, one file each: an encoder with a task head (classification, regression;
:mod:`.encoder_head`), a causal LM scored by label words (classification; :mod:`.label_words`) and
generation with a causal LM (:mod:`.generation`). A new one is a file with a :class:`TaskType` subclass and
a :func:`register_task_type` line; the first registered type whose ``kinds`` hold the task's kind and which
:meth:`~TaskType.claims` the model trains it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import ConfigError
from ..data import Task
from .base import Indexed, Say, TaskType

if TYPE_CHECKING:
    from ..config import RunConfig

_TASK_TYPES: list[type[TaskType]] = []


def register_task_type(cls: type[TaskType]) -> type[TaskType]:
    """Add ``cls`` to the registry (again: it replaces the one of the same name, in place); returns it."""
    for i, known in enumerate(_TASK_TYPES):
        if known.name == cls.name:
            _TASK_TYPES[i] = cls
            return cls
    _TASK_TYPES.append(cls)
    return cls


def unregister_task_type(name: str) -> None:
    """Remove the task type called ``name`` (a test's toy one, say)."""
    _TASK_TYPES[:] = [cls for cls in _TASK_TYPES if cls.name != name]


def all_task_types() -> dict[str, type[TaskType]]:
    return {cls.name: cls for cls in _TASK_TYPES}


def task_type_class(task: Task, model_name: str) -> type[TaskType]:
    """The registered task type that trains ``task`` on ``model_name``; a :class:`ConfigError` when none does."""
    for cls in _TASK_TYPES:
        if task.kind in cls.kinds and cls.claims(task, model_name):
            return cls
    raise ConfigError(f"no task type trains {task.name} (a {task.kind} task) on {model_name}; "
                      f"known task types: {', '.join(all_task_types())}")


def task_type_for(task: Task, model_name: str, cfg: RunConfig) -> TaskType:
    """``task`` on ``model_name`` under ``cfg``, its flags checked (before anything loads or is written)."""
    return task_type_class(task, model_name)(task, model_name, cfg)


from .encoder_head import EncoderHead  # noqa: E402  (the built-in task types register themselves)
from .generation import Generation  # noqa: E402
from .label_words import LabelWordsType  # noqa: E402

register_task_type(LabelWordsType)
register_task_type(EncoderHead)
register_task_type(Generation)

__all__ = ["EncoderHead", "Generation", "Indexed", "LabelWordsType", "Say", "TaskType", "all_task_types",
           "register_task_type", "task_type_class", "task_type_for", "unregister_task_type"]
