"""What a task type is: one way to train and evaluate a task on a model, as one object.

A run's task type is chosen from its task's ``kind`` and its model (:func:`~rankwise_harness.tasktypes.task_type_for`)
before anything is written; the training loop then asks it, and nothing else, how to load the model, turn
examples into batches, compute the loss and score predictions. Adding a task type is one file holding a
:class:`TaskType` subclass and one :func:`~rankwise_harness.tasktypes.register_task_type` line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..config import ConfigError
from ..data import Example, Task
from ..models import head_modules

if TYPE_CHECKING:
    from ..config import RunConfig

Say = Callable[[str], None]
Indexed = list[tuple[int, Example]]  # (position in the split, example), in split order


class TaskType(ABC):
    """One run's task on one model: loading, batches, loss and evaluation.

    Attributes:
        name: the task type's name (``encoder-head``, ``label-words``, ``generation``, ...).
        kinds: the :attr:`Task.kind` values it can train.
        task, model_name, cfg: the run's task, the model path to load and the run's settings.
        tokenizer: set by :meth:`load`.
        model_class: the transformers class :meth:`load` loaded, when the model it returns wraps it (recorded
            for ``rankwise export``).
    """

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]

    def __init__(self, task: Task, model_name: str, cfg: RunConfig) -> None:
        """Check the flags this task type reads (a :class:`ConfigError` names a bad one); nothing is loaded yet."""
        self.task, self.model_name, self.cfg = task, model_name, cfg
        self.tokenizer: Any = None
        self.model_class: str | None = None  # set by ``load`` when the model it returns wraps another class

    def refuse_head_flags(self, why: str) -> None:
        """For a task type that puts no head on its model: refuse the flags only a head reads (``--head-lr``,
        ``--head-warmup-steps``), which would change nothing while ``config.json`` recorded them."""
        given = [flag for flag, value in (("--head-lr", self.cfg.head_lr is not None),
                                          ("--head-warmup-steps", bool(self.cfg.head_warmup_steps))) if value]
        if given:
            raise ConfigError(f"{', '.join(given)}: {why}; drop {'it' if len(given) == 1 else 'them'}")

    @classmethod
    def claims(cls, task: Task, model_name: str) -> bool:
        """Whether this task type trains ``task`` (one of its :attr:`kinds`) on ``model_name``."""
        return True

    @property
    def max_length(self) -> int:
        return self.cfg.max_length

    # ------------------------------------------------------------------------ model
    @abstractmethod
    def load(self, device: torch.device, say: Say) -> nn.Module:
        """The base model, with whatever this task type puts on it (a head, a wrapper); sets :attr:`tokenizer`."""

    def heads(self, model: nn.Module) -> tuple[str, ...] | None:
        """The model's task-head modules, trained fully next to the adapter (``None``: none)."""
        return head_modules(model)

    def train_rows(self, rows: list[Example], say: Say) -> list[Example]:
        """The training rows this task type can learn from (after :meth:`load`); a row it cannot use is dropped, said."""
        return rows

    # ------------------------------------------------------------------------ training
    @abstractmethod
    def train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        """The model's inputs for ``rows``, with their ``labels``."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch (default: the model's own ``.loss``)."""
        return model(**batch).loss

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms :meth:`loss` averages over in ``batch`` (default: its rows, one loss each). Under several
        processes each process's loss is weighted by its share of the global batch's terms
        (:func:`rankwise_harness.train.share_weighted`), so that they average to the whole batch's mean, the loss
        one process with the whole batch minimises."""
        return int(batch["labels"].shape[0])

    # ------------------------------------------------------------------------ evaluation
    @abstractmethod
    def predict(self, model: nn.Module, rows: list[Example], device: torch.device, autocast: Any) -> list[Any]:
        """One prediction per row (anything picklable, gathered across processes); ``autocast()`` opens the
        run's precision context."""

    @abstractmethod
    def score(self, rows: Indexed, predictions: list[Any], records: list[dict[str, Any]] | None) -> dict[str, float]:
        """The task's metrics for ``predictions`` of ``rows``; appends one ``predictions.jsonl`` record per row to
        ``records`` when given."""

    def baseline(self, train: list[Example], dev: list[Example]) -> dict[str, float] | None:
        """Dev's metrics of a trivial predictor fitted on train, for ``majority_baseline`` (``None``: none)."""
        return None

    # ------------------------------------------------------------------------ records
    @property
    def pooling(self) -> str | None:
        """The pooling of the run's head, recorded in ``config.json`` / ``metrics.json`` (``None``: no head of ours)."""
        return None

    def label_words(self) -> dict[str, Any] | None:
        """The label words the run scores, recorded in ``config.json`` / ``metrics.json`` (``None``: none)."""
        return None
