"""Review round 14: an argument accepted without error whose value was silently read as something else
(docs/reliability.md, "Review round 14")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import rankwise
from conftest import TinyMLP
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)


def _adapted(seed: int = 0) -> nn.Module:
    """A TinyMLP with a LoRA adapter whose update is not zero (so a merge changes the weights)."""
    torch.manual_seed(seed)
    model = TinyMLP()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1", "fc2"], seed=0))
    with torch.no_grad():
        for layer in rankwise.adapter_layers(model).values():
            layer.lora_b.normal_()
    return model


def _base() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- true/false keyword arguments
# (call, the keyword): each is given the string "False", which is truthy, so it was read as True
BOOL_ARGS: dict[str, tuple[Callable[[nn.Module, Path, Any], Any], str]] = {
    "detach-merge": (lambda m, d, v: rankwise.detach(m, merge=v), "merge"),
    "step-check_finite": (lambda m, d, v: rankwise.step(m, check_finite=v), "check_finite"),
    "save-overwrite": (lambda m, d, v: rankwise.save(m, d / "other", overwrite=v), "overwrite"),
    "load-check_base": (lambda m, d, v: rankwise.load(_base(), d / "saved", check_base=v), "check_base"),
    "load-trainable": (lambda m, d, v: rankwise.load(_base(), d / "saved", trainable=v), "trainable"),
    "export_peft-vllm": (lambda m, d, v: rankwise.export_peft(m, d / "peft_new", vllm=v), "vllm"),
    "export_peft-overwrite": (lambda m, d, v: rankwise.export_peft(m, d / "other", overwrite=v), "overwrite"),
    "import_peft-trainable": (lambda m, d, v: rankwise.import_peft(_base(), d / "peft", trainable=v), "trainable"),
}


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    model = _adapted()
    rankwise.save(model, tmp_path / "saved")
    rankwise.export_peft(model, tmp_path / "peft")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine\n")
    return tmp_path


@pytest.mark.parametrize("value", ["False", "no", 0, None, 1.0])
@pytest.mark.parametrize("case", sorted(BOOL_ARGS))
def test_a_true_false_argument_refuses_anything_but_a_bool(case: str, value: Any, folders: Path) -> None:
    """``detach(model, merge="False")`` merged the adapter in (a non-empty string is true); ``export_peft(...,
    vllm="no")`` wrote the vLLM form; ``load(..., trainable="False")`` left the adapter trainable."""
    call, arg = BOOL_ARGS[case]
    model = _adapted()
    x = torch.randn(3, 12)
    before, files = model(x).logits, _files(folders)
    with pytest.raises(ValueError, match=rf"{arg} must be true or false, got {value!r}"):
        call(model, folders, value)
    assert torch.equal(model(x).logits, before) and rankwise.adapter_layers(model)
    assert _files(folders) == files


@pytest.mark.parametrize("case", sorted(BOOL_ARGS))
def test_a_true_false_argument_keeps_its_bools(case: str, folders: Path) -> None:
    call, arg = BOOL_ARGS[case]
    call(_adapted(), folders, True)
    if arg == "overwrite":  # False is read as False: the folder holding other files is refused
        with pytest.raises(FileExistsError, match="pass overwrite=True"):
            call(_adapted(), folders, False)
    else:
        call(_adapted(), folders, False)


# ---------------------------------------------------------------------------- LoRA+ groups
@pytest.mark.parametrize("kwargs", [
    {"lr": -1e-3}, {"lr": 0.0}, {"lr": float("nan")}, {"lr": True},
    {"lr": 1e-3, "ratio": 0}, {"lr": 1e-3, "ratio": -16.0}, {"lr": 1e-3, "ratio": float("inf")},
    {"lr": 1e-3, "weight_decay": -0.01}, {"lr": 1e-3, "weight_decay": float("nan")},
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_lora_plus_groups_refuse_rates_out_of_range(kwargs: dict[str, Any]) -> None:
    """``ratio=0`` gave B a learning rate of 0 (B never trained), a negative one gradient ascent on B, ``lr=True`` a
    rate of 1: AdamW takes a group's rate without checking it."""
    bad = next(k for k, v in kwargs.items() if k != "lr" or len(kwargs) == 1)
    with pytest.raises(ValueError, match=rf"^{bad} must be"):
        rankwise.lora_plus_param_groups(_adapted(), **kwargs)


def test_lora_plus_groups_keep_their_rates() -> None:
    groups = rankwise.lora_plus_param_groups(_adapted(), lr=1e-3, ratio=4, weight_decay=0.0)
    assert [g["lr"] for g in groups] == [1e-3, 4e-3]


# ---------------------------------------------------------------------------- the order of active adapters
@pytest.mark.parametrize("call", ["set_active", "merge"])
def test_an_unordered_set_of_adapter_names_is_refused(call: str) -> None:
    """The active adapters apply in the order given (a DoRA adapter rescales those before it); a ``set``'s order is
    its strings' hash order, which changes from one Python process to the next (``PYTHONHASHSEED``)."""
    model = _adapted()
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["fc1"], seed=1), name="b")
    x = torch.randn(3, 12)
    before, active = model(x).logits, rankwise.active_adapters(model)
    fn = rankwise.set_active if call == "set_active" else rankwise.merge
    with pytest.raises(TypeError, match=r"a set has no order.*got set"):
        fn(model, {"b", "default"})
    assert rankwise.active_adapters(model) == active and torch.equal(model(x).logits, before)
    fn(model, ["b", "default"])  # a list (or tuple, or one name) as before
    assert rankwise.active_adapters(model) == ("b", "default")


# ---------------------------------------------------------------------------- the harness's flags
def _refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                             argv: list[str], says: str) -> None:
    """``rankwise argv`` exits 2 naming ``says``, before the data or the model is read and the output folder made."""
    import re

    import rankwise_harness.train as train_mod
    from rankwise_harness import cli

    monkeypatch.setattr(train_mod, "load_task_data", lambda *a: pytest.fail("the data was read"))
    monkeypatch.setattr(train_mod, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    assert cli.main([*argv, "--task", "sst2", "--data", str(tmp_path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(says, err), err
    assert not out.exists()


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_targets_naming_no_module_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], value: str) -> None:
    """``--targets ""`` (an empty shell variable) trained every Linear layer (all-linear, the default)."""
    _refused_before_any_work(tmp_path, monkeypatch, capsys, ["finetune", f"--targets={value}"],
                             r"--targets names no module.*omit --targets")


@pytest.mark.parametrize("flag,value,field", [
    ("--r", "8", "r=4"), ("--alpha", "16.0", "alpha=32"), ("--dropout", "0.1", "dropout=0.0"),
    ("--targets", "key", "target_modules=query"), ("--r", "4", "r=4"),
])
def test_a_set_field_that_has_its_own_flag_given_both_ways_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flag: str, value: str,
        field: str) -> None:
    """``--r 8 --set r=4`` trained at rank 4 (``--set`` won, ``--r`` was dropped unsaid); ``--targets key --set
    target_modules=query`` adapted query only."""
    _refused_before_any_work(tmp_path, monkeypatch, capsys, ["finetune", flag, value, "--set", field],
                             rf"--set {field} and {flag} {value} both set {field.split('=')[0]}: pass one")


def test_a_set_module_list_of_one_name_is_a_name_as_with_several() -> None:
    """``--set exclude_modules=query`` was one regex matched against whole module names, so it excluded nothing
    (``bert.encoder.layer.0.attention.self.query`` is not ``query``), where ``--set exclude_modules=query,key`` excluded
    both as name suffixes (``--targets query`` too)."""
    from rankwise_harness.config import build_method_config

    for field in ("exclude_modules", "target_modules", "modules_to_save"):
        one = build_method_config("lora", overrides={field: "query"})
        assert getattr(one, field) == ("query",), field
        assert getattr(build_method_config("lora", overrides={field: "query,key"}), field) == ("query", "key")
    assert build_method_config("lora", overrides={"exclude_modules": r".*\.0\..*"}).exclude_modules == r".*\.0\..*"
    assert build_method_config("lora", overrides={"target_modules": "all-linear"}).target_modules == "all-linear"


def test_a_set_module_list_of_one_name_excludes_it_on_a_model() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from rankwise_harness.config import build_method_config

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16))
    report = rankwise.attach(model, build_method_config("lora", targets=("query", "value"),
                                                        overrides={"exclude_modules": "query"}))
    assert [row.name.rsplit(".", 1)[1] for row in report.layers] == ["value"]


@pytest.mark.parametrize("argv,says", [
    (["--methods", "lora", "--seed", "3"], r"--seed 3: compare runs each seed of --seeds .*pass --seeds 3"),
    (["--methods", "lora", "--seeds", "0", "--seed", "0"], r"--seed 0: compare runs each seed of --seeds"),
    (["--methods", ""], r"--methods names nothing"),
    (["--methods", "lora", "--seeds", ","], r"--seeds names nothing"),
])
def test_compare_refuses_a_seed_flag_it_would_drop_and_empty_lists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str],
        says: str) -> None:
    """``compare --seed 3`` ran seeds 0, 1, 2 (every run's seed is one of ``--seeds``; ``--seed`` was dropped unsaid);
    an empty ``--methods`` was an ``IndexError``, an empty ``--seeds`` a ``FileNotFoundError`` after writing the folder."""
    _refused_before_any_work(tmp_path, monkeypatch, capsys, ["compare", *argv], says)


def test_compare_still_gives_its_runs_their_seeds() -> None:
    from rankwise_harness.cli import _compare_args, build_parser

    args = build_parser().parse_args(["compare", "--methods", "lora", "--seeds", "1,2", "--task", "sst2"])
    _compare_args(args)
    assert args.seed == 0 and args.seeds == [1, 2]


# ---------------------------------------------------------------------------- --set modules_to_save beside a task head


def test_set_modules_to_save_on_a_classification_run_trains_them_beside_the_head(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """Before: the task head replaced the user's ``modules_to_save``, silently: ``--set modules_to_save=pooler``
    trained the head only. Now both are trained fully and saved."""
    from rankwise_harness.train import finetune

    cfg = _cfg(tmp_path, tiny_models, sst2, targets=("query", "value"), overrides={"modules_to_save": "pooler"})
    finetune(cfg, show_progress=False, log=lambda _m: None)
    description, tensors = rankwise.read_adapter(tmp_path / "run" / "adapter")
    assert description["config"]["modules_to_save"] == ["classifier", "pooler"]
    assert any(k.startswith("modules_to_save.") and ".pooler." in k for k in tensors), sorted(tensors)


def test_export_names_the_base_as_a_string_or_refuses(folders: Path) -> None:
    """Before: ``base_model_name_or_path=5`` was written into adapter_config.json as the number 5 (PEFT reads it as
    the model to load), and a ``Path`` failed inside the JSON writer. Now a path is written as its string and
    anything else but a string is refused, writing nothing."""
    import json

    model = _adapted()
    rankwise.export_peft(model, folders / "by_path", base_model_name_or_path=folders / "base")
    written = json.loads((folders / "by_path" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert written == str(folders / "base")
    with pytest.raises(TypeError, match="base_model_name_or_path must be"):
        rankwise.export_peft(model, folders / "by_number", base_model_name_or_path=5)  # type: ignore[arg-type]
    assert not (folders / "by_number").exists()
