"""fp16's loss scaler in the harness's loop: a skipped update moves neither the schedule nor ``rankwise.step``, and
the scaler's state is in every checkpoint (docs/reliability.md, review round 9).

No GPU here, and Accelerate makes no ``GradScaler`` on a CPU (the harness refuses ``--precision fp16`` there, on
purpose), so these runs give the Accelerator a real ``torch.amp.GradScaler("cpu")``: Accelerate's own code then
scales the loss (``accelerator.backward``), unscales and skips (``AcceleratedOptimizer.step``: ``scaler.step`` /
``scaler.update``) and reports ``optimizer_step_was_skipped``, as on a GPU. An fp16 overflow reaches the scaler as
inf/NaN gradients; the chosen steps' losses pass through an identity whose backward makes exactly that.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PoisonGradient
from safetensors.torch import load_file
from test_harness_train import Crash, _cfg, crash_at, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

import rankwise
from rankwise_harness.checkpoint import RunError
from rankwise_harness.data import get_task
from rankwise_harness.tasktypes import task_type_for
from rankwise_harness.train import finetune

QUIET: dict[str, Any] = dict(show_progress=False, log=lambda _m: None)


def _scaled_cpu(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every Accelerator the harness makes gets a real CPU ``GradScaler`` (scale 2^10, doubled after 2 updates in a
    row, halved on a skip); returns the list of those made, to read their scalers."""
    import accelerate

    made: list[Any] = []

    class ScaledCPU(accelerate.Accelerator):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
            made.append(self)

    monkeypatch.setattr(accelerate, "Accelerator", ScaledCPU)
    return made


def _scale_after(steps: int, skipped: set[int]) -> float:
    """GradScaler's rule for ``_scaled_cpu``'s settings: halve on a skip, double after 2 updates in a row."""
    scale, run = 2.0**10, 0
    for step in range(1, steps + 1):
        scale, run = (scale / 2, 0) if step in skipped else (scale * 2, 0) if run + 1 == 2 else (scale, run + 1)
    return scale


def _overflow_at(monkeypatch: pytest.MonkeyPatch, cfg: Any, steps: set[int]) -> list[int]:
    """The losses of optimizer steps ``steps`` (1-based; ``--grad-accum 1``, so one loss per step) overflow in
    the backward; returns the step counter (set it to the steps done before a run that resumes)."""
    task_type = type(task_type_for(get_task("sst2"), cfg.model, cfg))
    real_loss = task_type.loss
    calls = [0]

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        calls[0] += 1
        value = real_loss(self, model, batch)
        return PoisonGradient.apply(value, float("inf")) if calls[0] in steps else value

    monkeypatch.setattr(task_type, "loss", loss)
    return calls


def _record_updates(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Per update AdamW really makes (the scaler calls ``step`` only for those): every group's lr and the smallest
    Adam step count after it (a RAC-LoRA factor's, whose state a link end drops: its position in the link)."""
    updates: list[dict[str, Any]] = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        lrs = [(g["lr"], g["initial_lr"]) for g in self.param_groups]
        out = real_step(self, *args, **kwargs)
        updates.append({"lrs": lrs, "adam_step": min(int(s["step"]) for s in self.state.values())})
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return updates


def test_a_skipped_update_does_not_advance_the_schedule(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps 1, 4 and 5 of 10 overflow. The scaler skips those updates; the lr of the k-th update made (k = 0..6) is
    the linear schedule's k-th value, lr (1 - k/10), as HF Trainer steps its scheduler only ``if not
    accelerator.optimizer_step_was_skipped``. Before: the scheduler advanced on every step, so the first update
    already ran at lr (1 - 1/10). The run still takes its 10 steps (the batches were used) and records the skips."""
    made = _scaled_cpu(monkeypatch)
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=10, schedule="linear", warmup_ratio=0.0)
    _overflow_at(monkeypatch, cfg, {1, 4, 5})
    updates = _record_updates(monkeypatch)
    result = finetune(cfg, **QUIET)
    assert made[0].scaler.get_scale() == _scale_after(10, {1, 4, 5})  # the scaler saw those overflows, no other
    assert len(updates) == 7
    for k, update in enumerate(updates):
        for lr, base in update["lrs"]:
            assert math.isclose(lr, base * (1 - k / 10), rel_tol=1e-12), (k, lr, base)
    assert result["steps"] == 10 and len(result["losses"]) == 10
    assert result["skipped_steps"] == [1, 4, 5]
    assert json.loads((Path(cfg.output) / "metrics.json").read_text())["skipped_steps"] == [1, 4, 5]


def test_a_raclora_link_is_link_steps_updates_made(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """RAC-LoRA, ``link_steps`` 3, steps 2, 3 and 7 of 10 overflow: 7 updates are made, and every link is 3 of them
    (Adam's step count of the trained factor, whose state each link end drops, runs 1, 2, 3, 1, 2, 3, 1); the
    adapter saved counts 7 steps, 2 links and 1 step into the third. Before: ``rankwise.step`` counted the skipped
    steps, so the first link ended after one update and the chain had 3 links, one of them a single update."""
    _scaled_cpu(monkeypatch)
    cfg = _cfg(tmp_path, tiny_models, sst2, method="raclora", max_steps=10, overrides={"link_steps": "3"})
    _overflow_at(monkeypatch, cfg, {2, 3, 7})
    updates = _record_updates(monkeypatch)
    result = finetune(cfg, **QUIET)
    assert [u["adam_step"] for u in updates] == [1, 2, 3, 1, 2, 3, 1]
    meta = json.loads((Path(cfg.output) / "adapter" / "adapter_config.json").read_text())
    assert meta["step"] == 7
    assert meta["method_state"] == {"link_step": 1, "links": 2}
    assert result["skipped_steps"] == [2, 3, 7]


def test_the_loss_scalers_state_is_checkpointed_and_a_resumed_run_continues_it(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """RAC-LoRA (links of 3), steps 2, 3 and 7 of 10 overflow, a checkpoint every 2 steps; the run crashes after
    step 5 and resumes from step 4. The checkpoint holds the scaler's state after step 4 (scale and growth tracker
    equal the uninterrupted run's then), and the resumed run's scaler is, after every step, the uninterrupted
    run's: the same updates are skipped, and the losses, metrics, skipped steps, chain and adapter tensors end
    bit for bit the same. Before: no scaler state was saved, so the resumed scaler restarted at 2^10."""
    made = _scaled_cpu(monkeypatch)
    kw: dict[str, Any] = dict(method="raclora", max_steps=10, save_every=2, overrides={"link_steps": "3"})
    scalers: dict[str, list[dict[str, Any]]] = {"whole": [], "resumed": []}

    def record(into: str) -> Any:
        return lambda _step, _loss: scalers[into].append(made[-1].scaler.state_dict())

    whole_cfg = _cfg(tmp_path / "a", tiny_models, sst2, **kw)
    calls = _overflow_at(monkeypatch, whole_cfg, {2, 3, 7})
    whole = finetune(whole_cfg, hook=record("whole"), **QUIET)

    crash = crash_at(5)

    cfg = _cfg(tmp_path / "b", tiny_models, sst2, **kw)
    calls[0] = 0
    with pytest.raises(Crash):
        finetune(cfg, hook=crash, **QUIET)
    ckpt = Path(cfg.output) / "checkpoints" / "step-0000004"
    saved = json.loads((ckpt / "trainer.json").read_text())["state"]
    assert saved.get("scaler") == scalers["whole"][3]  # after step 4: scale 2^10 / 4 (two skips), tracker 1
    assert saved["scaler"]["scale"] == 2.0**8 and saved["scaler"]["_growth_tracker"] == 1
    assert saved["skipped"] == [2, 3]
    calls[0] = 4  # resumed after step 4
    resumed = finetune(cfg, resume=True, hook=record("resumed"), **QUIET)
    assert scalers["resumed"] == scalers["whole"][4:]
    assert [s["scale"] for s in scalers["whole"]] == [_scale_after(n, {2, 3, 7}) for n in range(1, 11)]
    assert resumed["skipped_steps"] == whole["skipped_steps"] == [2, 3, 7]
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]
    a = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter.safetensors"))
    b = load_file(str(Path(cfg.output) / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((Path(cfg.output) / "adapter" / "adapter_config.json").read_text())
    assert meta["step"] == 7 and meta["method_state"] == {"link_step": 1, "links": 2}


def test_a_damaged_scaler_state_or_skipped_list_is_refused(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose scaler scale is not a finite number > 0, or whose skipped steps are not increasing step
    numbers within the run, is refused naming the file; the checkpoint is left as it is. One written before the
    scaler's state was saved resumes with a note that the scale starts again from its initial value."""
    _scaled_cpu(monkeypatch)
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=4, save_every=2)
    calls = _overflow_at(monkeypatch, cfg, {1})

    def crash(step: int, _loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(RunError, match="interrupted"):
        finetune(cfg, hook=crash, **QUIET)
    file = Path(cfg.output) / "checkpoints" / "step-0000002" / "trainer.json"
    good = file.read_text()
    for key, bad, message in (("scaler", {"scale": float("nan")}, "scale"), ("scaler", [1], "loss-scaler state"),
                              ("skipped", [2, 1], "skipped"), ("skipped", [3], "skipped")):
        doc = json.loads(good)
        doc["state"][key] = {**doc["state"]["scaler"], **bad} if isinstance(bad, dict) else bad
        file.write_text(json.dumps(doc))
        with pytest.raises(RunError, match=message):
            finetune(cfg, resume=True, **QUIET)
    doc = json.loads(good)
    del doc["state"]["scaler"]
    file.write_text(json.dumps(doc))
    calls[0], said = 2, []
    assert finetune(cfg, resume=True, show_progress=False, log=said.append)["skipped_steps"] == [1]
    assert any("holds no loss-scaler state" in line and "starts again from 1024" in line for line in said), said


def test_rankwise_callback_does_not_count_a_step_the_scaler_skipped() -> None:
    """HF Trainer calls ``on_step_end`` after every optimizer step, skipped or not (it only holds back its lr
    scheduler): ``RankwiseCallback`` calls ``rankwise.step`` only when the (Accelerate) optimizer made the update."""
    from rankwise.integrations.hf import RankwiseCallback

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=("0",)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    class Accelerated:  # what Trainer passes after ``accelerator.prepare``: the optimizer and its skip flag
        def __init__(self, skipped: bool) -> None:
            self.optimizer, self.step_was_skipped = optimizer, skipped

    callback = RankwiseCallback(model)
    for skipped in (False, True, True, False):
        callback.on_step_end(None, type("S", (), {"epoch": None})(), None, optimizer=Accelerated(skipped))
    assert rankwise.step_count(model) == 2
