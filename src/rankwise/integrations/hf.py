"""Hugging Face Trainer integration: ``RankwiseCallback`` calls :func:`rankwise.step` per optimizer step.

::

    from rankwise.integrations.hf import RankwiseCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[RankwiseCallback()])

``on_step_end`` fires once per *optimizer* step (``on_substep_end`` marks the micro-batches of
gradient accumulation), so RAC-LoRA's ``link_steps`` counts optimizer steps. ``epochs_per_link=k``
also ends a link every ``k`` epochs (use it with ``RacLoraConfig(link_steps=None)``).

With Accelerate, call step only when gradients were synchronised (an optimizer step happened)::

    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step(); optimizer.zero_grad()
        if accelerator.sync_gradients:
            rankwise.step(accelerator.unwrap_model(model), optimizer)

``transformers`` is imported only when ``RankwiseCallback`` is first used (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import check_positive_int
from ..lifecycle import step


def _callback_class() -> type:
    from transformers import TrainerCallback

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

    return RankwiseCallback


_CACHE: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "RankwiseCallback":
        if name not in _CACHE:
            _CACHE[name] = _callback_class()
        return _CACHE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RankwiseCallback"]
