"""Adversarial review, round 6: the training fast paths, the optimiser groups and the harness's training loop,
hunting silently wrong results (docs/reliability.md, "Adversarial review, round 6").

Every test here was first shown to fail on the code before its fix. References are independent of the code
under test: a plain PyTorch loop written here, autograd, or HF transformers' own conventions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

from rankwise_harness.checkpoint import RunError
from rankwise_harness.config import RunConfig
from rankwise_harness.data import get_task
from rankwise_harness.tasktypes import task_type_for
from rankwise_harness.train import finetune

QUIET = dict(show_progress=False, log=lambda _m: None)


def poison_third_loss(monkeypatch: pytest.MonkeyPatch, cfg: RunConfig, model: str,
                      poison: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The run's third micro-batch loss goes through ``poison`` (the task type's ``loss``, patched)."""
    task_type = type(task_type_for(get_task("sst2"), model, cfg))
    real_loss = task_type.loss
    calls = [0]

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        calls[0] += 1
        value = real_loss(self, model, batch)
        return poison(value) if calls[0] == 3 else value

    monkeypatch.setattr(task_type, "loss", loss)


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
    poison_third_loss(monkeypatch, cfg, tiny_models["bert"], lambda value: value * float("nan"))
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


# ---------------------------------------------------------------------------- weight decay groups
def _hf_decayed(model: torch.nn.Module) -> set[str]:
    """The trainable parameters HF ``Trainer`` decays (its own rule: not biases, not normalisation layers)."""
    from transformers import Trainer

    names = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]  (self is unused)
    return {n for n, p in model.named_parameters() if p.requires_grad and n in names}


def _training_of(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``cfg``; the run's optimizer side (``train._Training``: the optimizer, the unwrapped model)."""
    import rankwise_harness.train as train

    seen: list[Any] = []
    real = train._set_up_training
    monkeypatch.setattr(train, "_set_up_training", lambda *args: seen.append(real(*args)) or seen[-1])
    finetune(cfg, **QUIET)
    return seen[0]


def _decay_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    name = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert name[id(p)] not in out, f"{name[id(p)]} is in two parameter groups"
            out[name[id(p)]] = group["weight_decay"]
    return out


@pytest.mark.parametrize("method,extra", [("full", {}), ("lora", {}), ("dora", {"lora_plus_ratio": 4.0})],
                         ids=["full", "lora", "dora-lora-plus"])
def test_weight_decay_skips_biases_and_layernorms_as_hf_trainer_does(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, method: str, extra: dict,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--weight-decay 0.1``: before, every trained tensor was decayed, biases and LayerNorm weights too (full
    fine-tuning pulled every LayerNorm gain toward 0; the head's bias was decayed in every run). Now the decayed
    set is exactly HF ``Trainer``'s (``get_decay_parameter_names``), each tensor in one group, every trained
    tensor in the optimizer, the learning rates untouched (LoRA+'s ``B`` keeps ratio x lr)."""
    training = _training_of(_cfg(tmp_path, tiny_models, sst2, method=method, max_steps=1, weight_decay=0.1, **extra),
                            monkeypatch)
    model = training.raw_model
    decay = _decay_of(training.optimizer.optimizer, model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == trained
    assert {n for n, wd in decay.items() if wd > 0} == _hf_decayed(model)
    assert {wd for wd in decay.values()} == {0.0, 0.1}
    if extra:
        lrs = {n: g["lr"] for g in training.optimizer.optimizer.param_groups for n in
               [k for k, p in model.named_parameters() if any(p is q for q in g["params"])]}
        assert all(lr == pytest.approx(4 * 5e-3) for n, lr in lrs.items() if n.endswith("lora_b"))
        assert all(lr == pytest.approx(5e-3) for n, lr in lrs.items() if not n.endswith("lora_b"))


def test_without_weight_decay_the_groups_are_as_before(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``--weight-decay 0`` (the default) adds no group: a checkpoint written before keeps fitting the optimizer."""
    training = _training_of(_cfg(tmp_path, tiny_models, sst2, method="lora", max_steps=1, lora_plus_ratio=4.0),
                            monkeypatch)
    groups = training.optimizer.optimizer.param_groups
    assert [g.get("name") for g in groups] == ["base_lr", "lora_plus_b", "head"]


def test_lora_plus_groups_decay_what_hf_trainer_decays() -> None:
    """The library's ``lora_plus_param_groups(weight_decay=...)`` on DoRA with a fully trained LayerNorm and head
    (``modules_to_save``): the biases and the LayerNorm were decayed; now exactly HF ``Trainer``'s set is (the
    magnitudes too, as there), and the ``lr`` of each tensor is unchanged (``B``: ratio x lr)."""
    import rankwise

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    rankwise.attach(model, rankwise.DoraConfig(r=2, alpha=4, target_modules=("0",), modules_to_save=("1", "2")))
    groups = rankwise.lora_plus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.05)
    optimizer = torch.optim.AdamW(groups)
    decay = _decay_of(optimizer, model)
    assert set(decay) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, wd in decay.items() if wd > 0} == _hf_decayed(model)
    assert any(n.endswith("magnitude") for n in _hf_decayed(model))
    lr = {n: g["lr"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert {n for n, v in lr.items() if v == pytest.approx(16e-3)} == {n for n in lr if n.endswith("lora_b")}


# ---------------------------------------------------------------------------- --precision fp16 without a GPU
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU fp16 autocast runs")
def test_fp16_on_a_machine_without_a_gpu_is_refused_not_run_in_fp32(tmp_path: Path, tiny_models: dict[str, str],
                                                                     sst2: str) -> None:
    """Accelerate runs no fp16 autocast on a CPU (``native_amp`` is off there): a ``--precision fp16`` run trained
    and evaluated in fp32 (autocast off, fp32 logits) while ``config.json`` and ``metrics.json`` said
    ``mixed_precision: fp16``. Now it is a ``ConfigError`` naming the flag, before anything is written."""
    from rankwise_harness.config import ConfigError

    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=1, precision="fp16")
    with pytest.raises(ConfigError, match=r"--precision fp16 needs a GPU.*fp32.*--precision bf16"):
        finetune(cfg, **QUIET)
    assert not Path(cfg.output).exists()
