"""Review round 12, part B: Accelerate's process-wide state across runs, and the merged export's tokenizer.

1. ``finetune`` made an ``Accelerator`` and left Accelerate's ``AcceleratorState`` singleton set up when it ended.
   Its mixed precision cannot change once set, so a second ``finetune`` in the same process with another
   ``--precision`` died in Accelerate ("AcceleratorState has already been initialized ... restart your runtime").
2. ``rankwise export RUN --format merged`` wrote the model without a tokenizer, which serving the folder (a
   transformers pipeline, vLLM) needs beside it: the base's tokenizer is written there now, in the same atomic write.
3. Several named adapters of a sequence classifier exported at once (PEFT's multi-adapter layout, each with the
   ``SEQ_CLS`` head PEFT's load needs): an adapter that trains no head of its own computes with the model's
   original head, but its file held whatever head sat in the model at export time (another adapter's trained copy
   while that one was active), so PEFT served it with the other adapter's head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ModelCase
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

import rankwise
from rankwise_harness import cli
from rankwise_harness.config import ConfigError
from rankwise_harness.train import finetune

QUIET: dict[str, Any] = dict(show_progress=False, log=lambda _m: None)


def _run(tmp_path: Path, models: dict[str, str], data: str, name: str, precision: str) -> dict[str, Any]:
    cfg = _cfg(tmp_path, models, data, output=str(tmp_path / name), precision=precision, max_steps=3)
    result = finetune(cfg, **QUIET)
    recorded = json.loads((Path(cfg.output) / "config.json").read_text())
    assert recorded["mixed_precision"] == precision
    return result


def test_finetune_twice_in_one_process_with_another_precision(tmp_path: Path, tiny_models: dict[str, str],
                                                              sst2: str) -> None:
    """bf16, then none, then bf16 again in one process: every run starts, and the third computes exactly what the
    first did (no state of an earlier run leaks into a later one); Accelerate's state is released after each."""
    from accelerate.state import is_initialized

    first = _run(tmp_path, tiny_models, sst2, "bf16-a", "bf16")
    assert not is_initialized()
    plain = _run(tmp_path, tiny_models, sst2, "no", "no")
    again = _run(tmp_path, tiny_models, sst2, "bf16-b", "bf16")
    assert not is_initialized()
    assert again["losses"] == first["losses"] and again["metrics"] == first["metrics"]
    assert plain["losses"] != first["losses"]  # bf16 autocast really ran in the bf16 runs


def test_a_callers_accelerator_is_kept_and_another_precision_refused(tmp_path: Path, tiny_models: dict[str, str],
                                                                     sst2: str) -> None:
    """An ``Accelerator`` the caller made owns Accelerate's state: a run in its precision uses it and leaves it
    set up; a run in another precision is refused with a ``ConfigError`` naming both, before any file is written."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mine = Accelerator(mixed_precision="bf16")
    with pytest.raises(ConfigError, match=r"mixed precision bf16.*--precision bf16"):
        finetune(_cfg(tmp_path, tiny_models, sst2, output=str(tmp_path / "no"), precision="no"), **QUIET)
    assert not (tmp_path / "no").exists()
    _run(tmp_path, tiny_models, sst2, "bf16", "bf16")
    assert mine.state.mixed_precision == "bf16" and AcceleratorState().mixed_precision == "bf16"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, str], sst2: str) -> Path:
    """A finished LoRA run of the tiny BERT (saved with the packaged MiniLM's tokenizer) on SST-2."""
    cfg = _cfg(tmp_path_factory.mktemp("run"), tiny_models, sst2, max_steps=6)
    finetune(cfg, **QUIET)
    return Path(cfg.output)


def test_a_merged_export_serves_the_runs_predictions_with_its_own_tokenizer(finished_run: Path, sst2: str,
                                                                            tmp_path: Path) -> None:
    """The merged folder alone (``AutoTokenizer`` and ``AutoModelForSequenceClassification`` from it, as a pipeline
    loads it) predicts what the run's ``predictions.jsonl`` recorded for every dev row."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rankwise_harness.data import get_task, load_task_data

    base = json.loads((finished_run / "config.json").read_text())["model_path"]
    merged = tmp_path / "merged"
    assert cli.main(["export", str(finished_run), "--out", str(merged), "--format", "merged"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    dev = load_task_data(get_task("sst2"), sst2).dev
    recorded = [json.loads(line) for line in (finished_run / "predictions.jsonl").read_text().splitlines()]
    rows = [dev[r["index"]] for r in recorded]
    batch = tokenizer([r.text for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    trained = rankwise.load(AutoModelForSequenceClassification.from_pretrained(base, num_labels=2),
                            finished_run / "adapter", trainable=False).eval()  # the run's model, rebuilt by hand
    reference = AutoTokenizer.from_pretrained(base)(
        [r.text for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits, want = model(**batch).logits, trained(**reference).logits
    assert logits.argmax(-1).tolist() == [r["prediction"] for r in recorded]
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    # exported again into the same folder: the tokenizer's files are a merged model's own, not foreign files
    assert cli.main(["export", str(finished_run), "--out", str(merged), "--format", "merged"]) == 0


def test_a_merged_export_of_a_base_without_a_tokenizer_says_so_and_writes_the_model(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A base folder holding no tokenizer: one line on stderr says none was written; the model is written."""
    from transformers import AutoModelForSequenceClassification

    bare = _without_tokenizer(json.loads((finished_run / "config.json").read_text())["model_path"], tmp_path)
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert cli.main(["export", str(finished_run), "--base", str(bare), "--out", str(merged), "--format", "merged"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "tokenizer" in line]  # (not the load bars)
    assert len(err) == 1 and err[0].startswith("note: no tokenizer") and str(bare) in err[0], err
    assert not list(merged.glob("tokenizer*"))
    AutoModelForSequenceClassification.from_pretrained(merged)


def _without_tokenizer(base: str, tmp_path: Path) -> Path:
    """A copy of model folder ``base`` without its tokenizer's files."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(base) / name, bare / name)
    return bare


@pytest.mark.parametrize("active", [["default", "other"], ["default"], ["other"]], ids=["both", "default", "other"])
def test_named_adapters_of_a_sequence_classifier_load_in_peft_each_with_its_own_head(
        bert_case: ModelCase, active: list[str], tmp_path: Path) -> None:
    """LoRA "default" training the classifier, DoRA "other" on top without a head of its own, exported whichever is
    active: PEFT's ``PeftModel.from_pretrained`` + ``load_adapter(path/other, adapter_name="other")`` compute each
    adapter's outputs alone (``set_adapter``) as rankwise's ``set_active`` does, the trained head and the original one."""
    peft = pytest.importorskip("peft")
    model = bert_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=("query", "value"),
                                               modules_to_save=("classifier",)))
    rankwise.attach(model, rankwise.DoraConfig(r=4, alpha=8, target_modules=("query", "value")), name="other")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in rankwise.trainable_parameters(model).values():
            param.add_(0.2 * torch.randn(param.shape, generator=g))
    rankwise.set_active(model, active)
    rankwise.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(bert_case.make(), tmp_path / "peft")
    theirs.load_adapter(tmp_path / "peft" / "other", adapter_name="other")
    batch = bert_case.batch(11)
    outputs = {}
    for name in ("default", "other"):
        rankwise.set_active(model, name)
        theirs.base_model.set_adapter(name)
        with torch.no_grad():
            outputs[name] = bert_case.output(model.eval(), batch)
            torch.testing.assert_close(bert_case.output(theirs.eval(), batch), outputs[name], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        base = bert_case.output(bert_case.make(), batch)
    assert not torch.allclose(outputs["default"], outputs["other"]) and not torch.allclose(outputs["other"], base)
