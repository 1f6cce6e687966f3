"""Hugging Face Trainer integration: ``RankwiseCallback`` calls :func:`rankwise.step` per optimizer step.

::

    from rankwise.integrations.hf import RankwiseCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[RankwiseCallback()])

``on_step_end`` fires once per *optimizer* step (``on_substep_end`` marks the micro-batches of
gradient accumulation), so RAC-LoRA's ``link_steps`` counts optimizer steps; one the fp16 loss scaler skipped
(Trainer calls ``on_step_end`` after it too) is not counted. ``epochs_per_link=k``
also ends a link every ``k`` epochs (use it with ``RacLoraConfig(link_steps=None)``).

With Accelerate, call step only when an optimizer update happened (gradients synchronised, not skipped by the
fp16 loss scaler)::

    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step(); optimizer.zero_grad()
        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
            rankwise.step(accelerator.unwrap_model(model), optimizer)

``transformers`` is imported only when ``RankwiseCallback`` is first used (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and the API reference; at run time __getattr__ imports it on first use
    from ._hf_callback import RankwiseCallback


def __getattr__(name: str) -> Any:
    if name == "RankwiseCallback":
        from ._hf_callback import RankwiseCallback

        return RankwiseCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RankwiseCallback"]


def __dir__() -> list[str]:
    """PEP 562: the module's names and ``RankwiseCallback``, imported on first use."""
    return sorted({*globals(), *__all__})
