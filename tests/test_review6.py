"""Adversarial review, round 6: the training fast paths, the optimiser groups and the harness's training loop,
hunting silently wrong results (docs/reliability.md, "Adversarial review, round 6").

Every test here was first shown to fail on the code before its fix. References are independent of the code
under test: a plain PyTorch loop written here, autograd, or HF transformers' own conventions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rankwise_harness.checkpoint import RunError
from rankwise_harness.config import RunConfig
from rankwise_harness.tasktypes import task_type_for
from rankwise_harness.data import get_task
from rankwise_harness.train import finetune
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

QUIET = dict(show_progress=False, log=lambda _m: None)


# ---------------------------------------------------------------------------- a NaN loss in the harness's loop
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_non_finite_training_loss_stops_the_run_before_the_optimizer_steps(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The third micro-batch's loss is NaN. Before: ``full`` (and an external adapter, the benchmarks' PEFT
    controls: neither calls ``rankwise.step``, whose finiteness check caught it for library methods only after
    the optimizer had written NaN into the adapter) trained on, wrote NaN losses and reported the NaN model's
    dev accuracy (0.5625 on this slice) as the run's result. Now every source stops with a ``RunError`` naming
    the step, before that step's optimizer update, and writes no result."""
    cfg = _cfg(tmp_path, tiny_models, sst2, method=method, max_steps=5, save_every=2)
    task_type = type(task_type_for(get_task("sst2"), tiny_models["bert"], cfg))
    real_loss = task_type.loss
    calls = [0]

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        calls[0] += 1
        value = real_loss(self, model, batch)
        if calls[0] == 3:
            value = value * float("nan")
        return value

    monkeypatch.setattr(task_type, "loss", loss)
    steps: list[int] = []
    hooked: list[int] = []

    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(RunError, match=r"non-finite training loss \(nan\) at step 3 of 5") as info:
        finetune(cfg, hook=lambda s, _l: hooked.append(s), **QUIET)
    assert len(steps) == 2, "the step whose loss is NaN must not reach the optimizer"
    assert hooked == [1, 2]
    assert "checkpoint" in str(info.value)
    out = Path(cfg.output)
    assert not (out / "metrics.json").exists() and (out / "checkpoints" / "LATEST").read_text() == "step-0000002"
