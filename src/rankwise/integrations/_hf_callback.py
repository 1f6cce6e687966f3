"""The :class:`RankwiseCallback` class (imports ``transformers``). Import it from
:mod:`rankwise.integrations.hf`, which loads this module only when the name is first used."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..config import check_positive_int
from ..lifecycle import step
from ..methods.raclora import end_link


class RankwiseCallback(TrainerCallback):  # type: ignore[misc]
    """Calls ``rankwise.step(model, optimizer)`` after every optimizer step of an HF ``Trainer``.

    Args:
        model: the model rankwise adapted (default: the ``model`` the Trainer passes to callbacks).
        epochs_per_link: also end a RAC-LoRA link every this many epochs (``None``: only by steps).
    """

    def __init__(self, model: nn.Module | None = None, epochs_per_link: int | None = None) -> None:
        check_positive_int("epochs_per_link", epochs_per_link, none="")
        self.model = model
        self.epochs_per_link = epochs_per_link
        self._epochs = 0

    def _model(self, kwargs: dict[str, Any]) -> nn.Module:
        model = self.model if self.model is not None else kwargs.get("model")
        if model is None:
            raise ValueError("RankwiseCallback got no model: pass RankwiseCallback(model=...)")
        return model

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step(self._model(kwargs), kwargs.get("optimizer"))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.epochs_per_link is None:
            return
        self._epochs += 1
        if self._epochs % self.epochs_per_link == 0:
            from ..methods.raclora import end_link

            end_link(self._model(kwargs), kwargs.get("optimizer"))
