"""The :class:`RankwiseCallback` class (imports ``transformers``). Import it from
:mod:`rankwise.integrations.hf`, which loads this module only when the name is first used."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path, PurePath
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapter_file import CHECKPOINT_ADAPTER_FOLDER
from ..config import check_positive_int
from ..distributed import sharded, zero3_partitioned
from ..io import save
from ..lifecycle import step
from ..methods.raclora import chain_names, end_link


class RankwiseCallback(TrainerCallback):  # type: ignore[misc]
    """Calls ``rankwise.step(model, optimizer)`` after every optimizer update of an HF ``Trainer``.

    An update the fp16 loss scaler skipped (the Accelerate optimizer's ``step_was_skipped``: Trainer calls
    ``on_step_end`` after it too, holding back only its lr scheduler) is not counted: a method's step count is
    the updates made, so a RAC-LoRA link is ``link_steps`` updates at any precision.

    Args:
        model: the model rankwise adapted (default: the ``model`` the Trainer passes to callbacks).
        epochs_per_link: also end a RAC-LoRA link every this many epochs (``None``: only by steps); on a model with
            several adapters, the link of every active RAC-LoRA / COLA chain (:func:`rankwise.methods.raclora.end_link`).
            A model with no such chain is refused when training begins. Epochs
            are the Trainer's own count (``state.epoch``), so a run resumed from a checkpoint ends its links
            at the epochs the uninterrupted run does; an epoch's link ends right after its last optimizer
            step, before a checkpoint or an evaluation at that step.
        adapter_folder: after the Trainer writes a checkpoint, save the adapter (:func:`rankwise.save`, every
            adapter of the model) into this folder inside it, ``<output_dir>/checkpoint-<step>/rankwise_adapter``
            by default, so ``rankwise.load(base, that folder)`` brings it back on its own (GoRA's per-layer ranks
            included, no calibration). Written by the process that writes the checkpoint (``args.should_save``).
            ``None``: write nothing. Not written, with a warning, for a model FSDP shards or DeepSpeed ZeRO-3
            partitions (save it as docs/distributed.md says) or a hyperparameter-search trial (its checkpoints lie elsewhere).
            ``trainer.save_model(dir)`` calls no callback: save the adapter there with ``rankwise.save``.
    """

    def __init__(self, model: nn.Module | None = None, epochs_per_link: int | None = None,
                 adapter_folder: str | os.PathLike[str] | None = CHECKPOINT_ADAPTER_FOLDER) -> None:
        check_positive_int("epochs_per_link", epochs_per_link, none="")
        _check_folder_name(adapter_folder)
        self.model = model
        self.epochs_per_link = epochs_per_link
        self.adapter_folder = adapter_folder
        self._epochs = 0  # epochs whose end this callback has handled (or the checkpoint it resumed from had)
        self._warned = False

    def _model(self, kwargs: dict[str, Any]) -> nn.Module:
        model = self.model if self.model is not None else kwargs.get("model")
        if model is None:
            raise ValueError("RankwiseCallback got no model: pass RankwiseCallback(model=...)")
        return model

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epochs = math.floor(state.epoch or 0)  # whole epochs the (restored) state has behind it
        if self.epochs_per_link is not None:  # a model with no chain to end: refused now, not after an epoch's work
            chain_names(self._model(kwargs))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step(self._model(kwargs), kwargs.get("optimizer"))  # not counted where the update was skipped (made_no_update)
        if state.epoch is not None and state.epoch == int(state.epoch):  # this step finished an epoch
            self._epoch_done(int(state.epoch), kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch_done(math.ceil(state.epoch or 0), kwargs)  # an epoch cut short (max_steps) counts too

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The Trainer has written ``checkpoint-<step>``: save the adapter into its ``adapter_folder``."""
        if self.adapter_folder is None or not args.should_save:
            return
        model = self._model(kwargs)
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if sharded(model):
            self._skip(f"FSDP shards the model, so {checkpoint} and later checkpoints hold no {self.adapter_folder} "
                       "folder: save the adapter as docs/distributed.md says")
        elif any(zero3_partitioned(p) for p in model.parameters()):
            self._skip(f"DeepSpeed ZeRO-3 partitions the model, so {checkpoint} and later checkpoints hold no "
                       f"{self.adapter_folder} folder: save the adapter inside deepspeed.zero.GatheredParameters as "
                       "docs/distributed.md says")
        elif not checkpoint.is_dir():
            self._skip(f"no checkpoint folder {checkpoint} (a hyperparameter-search trial saves under its own run "
                       f"folder), so the adapter was not written into a checkpoint")
        else:
            save(model, checkpoint / self.adapter_folder)

    def _skip(self, why: str) -> None:
        if not self._warned:
            warnings.warn(f"RankwiseCallback: {why}", stacklevel=3)
            self._warned = True

    def _epoch_done(self, epochs: int, kwargs: dict[str, Any]) -> None:
        """End a link when epoch number ``epochs`` (1-based) is one of every ``epochs_per_link``th, once."""
        if self.epochs_per_link is None or epochs <= self._epochs:
            return
        self._epochs = epochs
        if epochs % self.epochs_per_link == 0:
            end_link(self._model(kwargs), kwargs.get("optimizer"))


def _check_folder_name(name: str | os.PathLike[str] | None) -> None:
    """``adapter_folder`` must name a folder inside the checkpoint: one relative path, no ``..``."""
    if name is None:
        return
    parts = PurePath(name).parts if isinstance(name, (str, os.PathLike)) else ()
    if not parts or PurePath(name).is_absolute() or ".." in parts:
        raise ValueError(f"adapter_folder must be a folder name inside the checkpoint (e.g. {CHECKPOINT_ADAPTER_FOLDER!r}) or "
                         f"None, got {name!r}")
