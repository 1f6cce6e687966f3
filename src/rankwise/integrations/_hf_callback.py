"""The :class:`RankwiseCallback` class (imports ``transformers``). Import it from
:mod:`rankwise.integrations.hf`, which loads this module only when the name is first used."""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..config import check_positive_int
from ..lifecycle import step
from ..methods.raclora import end_link


class RankwiseCallback(TrainerCallback):  # type: ignore[misc]
    """Calls ``rankwise.step(model, optimizer)`` after every optimizer update of an HF ``Trainer``.

    An update the fp16 loss scaler skipped (the Accelerate optimizer's ``step_was_skipped``: Trainer calls
    ``on_step_end`` after it too, holding back only its lr scheduler) is not counted: a method's step count is
    the updates made, so a RAC-LoRA link is ``link_steps`` updates at any precision.

    Args:
        model: the model rankwise adapted (default: the ``model`` the Trainer passes to callbacks).
        epochs_per_link: also end a RAC-LoRA link every this many epochs (``None``: only by steps). Epochs
            are the Trainer's own count (``state.epoch``), so a run resumed from a checkpoint ends its links
            at the epochs the uninterrupted run does; an epoch's link ends right after its last optimizer
            step, before a checkpoint or an evaluation at that step.
    """

    def __init__(self, model: nn.Module | None = None, epochs_per_link: int | None = None) -> None:
        check_positive_int("epochs_per_link", epochs_per_link, none="")
        self.model = model
        self.epochs_per_link = epochs_per_link
        self._epochs = 0  # epochs whose end this callback has handled (or the checkpoint it resumed from had)

    def _model(self, kwargs: dict[str, Any]) -> nn.Module:
        model = self.model if self.model is not None else kwargs.get("model")
        if model is None:
            raise ValueError("RankwiseCallback got no model: pass RankwiseCallback(model=...)")
        return model

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epochs = math.floor(state.epoch or 0)  # whole epochs the (restored) state has behind it

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        if not getattr(optimizer, "step_was_skipped", False):
            step(self._model(kwargs), optimizer)
        if state.epoch is not None and state.epoch == int(state.epoch):  # this step finished an epoch
            self._epoch_done(int(state.epoch), kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch_done(math.ceil(state.epoch or 0), kwargs)  # an epoch cut short (max_steps) counts too

    def _epoch_done(self, epochs: int, kwargs: dict[str, Any]) -> None:
        """End a link when epoch number ``epochs`` (1-based) is one of every ``epochs_per_link``th, once."""
        if self.epochs_per_link is None or epochs <= self._epochs:
            return
        self._epochs = epochs
        if epochs % self.epochs_per_link == 0:
            end_link(self._model(kwargs), kwargs.get("optimizer"))
