"""DeepSpeed: what rankwise refuses, and why (docs/reliability.md, "stop 25").

Under ZeRO-3 a parameter outside a gather is an empty placeholder (DeepSpeed marks it with ``ds_id``; its whole shape
is ``ds_shape``). Measured with DeepSpeed 0.19.8 on two CPU processes before these checks: ``export_peft`` wrote
0-element tensors and returned, ``save`` raised a bare ``IndexError``, ``attach`` a bare unpacking error. Under
ZeRO-1/2 DeepSpeed keeps fp32 copies of the trained factors, which a RAC-LoRA link end cannot reach.

The fast tests build DeepSpeed's representation by hand (the attributes DeepSpeed sets, checked against the real
thing by the slow test, which runs DeepSpeed itself on two processes when it is installed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise
from rankwise.methods.raclora import end_link


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _partition(p: nn.Parameter) -> torch.Tensor:
    """Make ``p`` what ZeRO-3 leaves on a rank outside a gather: an empty placeholder with ``ds_id`` and ``ds_shape``;
    returns the whole value, for :func:`_gather`."""
    whole = p.data.clone()
    p.ds_id, p.ds_shape = 7, whole.shape  # type: ignore[attr-defined]
    p.data = torch.empty(0, dtype=whole.dtype)
    return whole


def _gather(p: nn.Parameter, whole: torch.Tensor) -> None:
    """What ``deepspeed.zero.GatheredParameters`` does on entry: the whole value back in the parameter."""
    p.data = whole


def test_attach_on_partitioned_base_weights_is_refused_naming_the_weight_and_changes_nothing() -> None:
    model = _model()
    _partition(model[0].weight)
    with pytest.raises(ValueError, match=r"cannot attach: DeepSpeed ZeRO-3 has partitioned 0\.weight \(this rank holds "
                                         r"\(0,\) of \(8, 8\)\).*outside `deepspeed\.zero\.Init`"):
        rankwise.attach(model, rankwise.DoraConfig(r=2, alpha=4, target_modules=["0"]))
    assert not rankwise.adapter_layers(model) and all(p.requires_grad for p in model.parameters())


def test_a_partitioned_fully_trained_module_is_refused_at_attach() -> None:
    model = _model()
    _partition(model[2].weight)
    with pytest.raises(ValueError, match=r"cannot attach: DeepSpeed ZeRO-3 has partitioned 2\.weight"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))


@pytest.mark.parametrize("which", ["base", "factor", "head"])
def test_save_export_and_merge_of_partitioned_tensors_are_refused_and_keep_the_previous_files(
        tmp_path: Path, which: str) -> None:
    """After ``deepspeed.initialize`` (ZeRO-3) partitions an attached model: save, export and merge are refused
    naming the tensor and the gather that fixes it; the adapter saved before is untouched, no export folder is
    made, the model is not marked merged. Inside the gather (whole tensors) they work and save what was trained."""
    model = _model()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["0"], modules_to_save=["2"]))
    with torch.no_grad():
        model[0].lora_b.normal_()
    rankwise.save(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    p = {"base": model[0].weight, "factor": model[0].lora_b, "head": dict(model.named_parameters())[
        next(n for n, _ in model.named_parameters() if n.startswith("2.") and n.endswith("weight"))]}[which]
    whole = _partition(p)
    for what, call, fix in [("save an adapter", lambda: rankwise.save(model, tmp_path / "a"), "GatheredParameters"),
                            ("export an adapter", lambda: rankwise.export_peft(model, tmp_path / "peft"), "GatheredParameters"),
                            ("merge", lambda: rankwise.merge(model), "modifier_rank=0")]:
        if which == "head" and what == "merge":
            continue  # merge touches adapted layers only
        with pytest.raises(ValueError, match=rf"cannot {what}: DeepSpeed ZeRO-3 has partitioned .*{fix}"):
            call()
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == before
    assert not (tmp_path / "peft").exists() and not any(layer.merged for layer in rankwise.adapter_layers(model).values())
    _gather(p, whole)
    rankwise.save(model, tmp_path / "b")
    assert (tmp_path / "b" / "adapter.safetensors").read_bytes() == before


def test_a_zero3_parameter_kept_whole_is_not_refused(tmp_path: Path) -> None:
    """ZeRO-3 keeps small parameters whole (``stage3_param_persistence_threshold``): ``ds_id`` alone is no refusal."""
    model = _model()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"]))
    model[0].weight.ds_id, model[0].weight.ds_shape = 3, model[0].weight.shape  # type: ignore[attr-defined]
    rankwise.save(model, tmp_path / "a")
    rankwise.merge(model)


def test_the_trainer_callback_skips_the_checkpoint_adapter_of_a_partitioned_model_with_a_warning(tmp_path: Path) -> None:
    """``RankwiseCallback.on_save`` under ZeRO-3 (the HF Trainer's DeepSpeed path): a warning naming the gather, the
    checkpoint left as the Trainer wrote it; training is not stopped by an error at the first checkpoint."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from rankwise.integrations.hf import RankwiseCallback

    model = _model()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"]))
    _partition(model[0].weight)
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.warns(UserWarning, match="DeepSpeed ZeRO-3 partitions the model, so .*checkpoint-2 .*GatheredParameters"):
        RankwiseCallback(model).on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=True),
                                        SimpleNamespace(global_step=2, epoch=None), None)
    assert list((tmp_path / "checkpoint-2").iterdir()) == []


def test_check_finite_grads_warns_when_no_gradient_is_there_to_check() -> None:
    """Under DeepSpeed ZeRO-2 (measured, 1 process) every adapter tensor's ``.grad`` is ``None`` after
    ``engine.backward`` of a NaN loss: ``check_finite_grads`` passed in silence, as if it had checked. It now warns
    that nothing was checked (as it does when called before ``backward``); with gradients there it stays silent
    and still raises on a NaN."""
    model = _model()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"], seed=0))
    with pytest.warns(UserWarning, match="no adapter tensor has a gradient, so nothing was checked"):
        rankwise.check_finite_grads(model)
    model(torch.randn(3, 8)).sum().backward()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rankwise.check_finite_grads(model)
    model[0].lora_a.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="0.lora_a"):
        rankwise.check_finite_grads(model)


class _ZeroOptimizer:
    """Stands for DeepSpeed's ZeRO-1/2 optimizer: the class lives in ``deepspeed.runtime.zero.stage_1_and_2`` and holds
    flat fp32 partitions, not the model's parameters."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.optimizer = torch.optim.AdamW([torch.cat([p.detach().flatten() for p in params]).clone().requires_grad_()])
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state


_ZeroOptimizer.__module__ = "deepspeed.runtime.zero.stage_1_and_2"
_ZeroOptimizer.__qualname__ = "DeepSpeedZeroOptimizer"


class _AccelerateWrapper:
    """Stands for Accelerate's ``DeepSpeedOptimizerWrapper``: DeepSpeed's optimizer in ``.optimizer``."""

    def __init__(self, inner: object) -> None:
        self.optimizer = inner


@pytest.mark.parametrize("wrapped", [False, True], ids=["deepspeed", "accelerate-wrapper"])
def test_a_raclora_link_end_with_a_deepspeed_optimizer_is_refused_naming_it(wrapped: bool) -> None:
    """Before: "the optimizer ... does not hold adapter parameter 0.lora_b", which sends the user looking for a wrong
    optimizer. Now the refusal names DeepSpeed and why, and the chain is unchanged."""
    model = _model()
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, target_modules=["0"], link_steps=1, seed=0))
    opt: object = _ZeroOptimizer(list(rankwise.trainable_parameters(model).values()))
    if wrapped:
        opt = _AccelerateWrapper(opt)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: rankwise.step(model, opt), lambda: end_link(model, opt)):  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"cannot end links with a DeepSpeed optimizer \(deepspeed\.runtime\.zero\."
                                             r"stage_1_and_2\.DeepSpeedZeroOptimizer\).*fp32 copies"):
            call()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


_REAL = """
import os, torch, deepspeed, rankwise
deepspeed.init_distributed(dist_backend="gloo")
rank = int(os.environ["RANK"])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["0"], modules_to_save=["2"]))
cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg)
x, y = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
for _ in range(3):
    loss = torch.nn.functional.cross_entropy(engine(x), y); engine.backward(loss); engine.step()
out = os.environ["OUT"] + f"/rank{rank}"
for what, call in [("save", lambda: rankwise.save(model, out)), ("export", lambda: rankwise.export_peft(model, out + "-peft"))]:
    try:
        call(); print("NOT REFUSED", what)
    except ValueError as e:
        print("refused", what, "ZeRO-3 has partitioned" in str(e))
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    rankwise.save(model, out)
    whole = {k: v.detach().clone() for k, v in rankwise.trainable_parameters(model).items()}
from safetensors.torch import load_file
got = load_file(out + "/adapter.safetensors")
print("saved whole", all(torch.equal(got[k], whole[k]) for k in ("0.lora_a", "0.lora_b")), bool(whole["0.lora_b"].abs().sum() > 0))
"""


@pytest.mark.slow
def test_real_deepspeed_zero3_on_two_processes(tmp_path: Path) -> None:
    """The fast tests' premise against DeepSpeed itself: after ZeRO-3 training on 2 processes, save and export are
    refused (not 0-element files), and inside ``GatheredParameters`` save writes the whole trained factors."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29653", "WORLD_SIZE": "2", "DS_ACCELERATOR": "cpu",
           "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _REAL], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert "refused save True" in out and "refused export True" in out and "NOT REFUSED" not in out, out
        assert "saved whole True True" in out, out


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP", "MEGATRON_LM"])
def test_the_harness_refuses_a_deepspeed_or_fsdp_launch(kind: str) -> None:
    """``rankwise finetune`` under ``accelerate launch --use_deepspeed`` ended in Accelerate's traceback (measured
    with DeepSpeed 0.19.8); it trains one process or DDP, and now says so, for each of Accelerate's own values."""
    from accelerate.utils import DistributedType

    from rankwise_harness.config import ConfigError
    from rankwise_harness.train import check_launch

    with pytest.raises(ConfigError, match=rf"asks Accelerate for {kind}, which rankwise finetune does not run"):
        check_launch(str(DistributedType[kind]))
    for fine in ("NO", "MULTI_CPU", "MULTI_GPU"):
        check_launch(str(DistributedType[fine]))


@pytest.mark.slow
def test_real_deepspeed_launch_of_the_harness_exits_2_writing_nothing(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2"
    if not data.is_dir():
        pytest.skip("../shared/data absent")
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "DS_ACCELERATOR": "cpu",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29654", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rankwise_harness.cli", "finetune", "--task", "sst2", "--data", str(data),
                           "--method", "lora", "--max-train", "64", "--max-steps", "2", "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "asks Accelerate for DEEPSPEED" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()
