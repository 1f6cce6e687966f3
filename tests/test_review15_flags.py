"""Review round 15 (2026-12-05), flags a run silently ignored (docs/reliability.md, that section): a flag the run
cannot use is refused before anything is written, naming the flag, as ``--method full`` refuses the adapter's
flags; ``compare`` (whose flags every method shares) passes it only to the methods that use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rankwise
from rankwise_harness import cli
from test_harness_train import sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT / GPT-2, 64 SST-2 rows)
from test_label_words import tiny_lm  # noqa: F401  (module fixture: a tiny Llama with label words)

COMMON = ["--task", "sst2", "--max-steps", "1", "--batch-size", "8", "--max-length", "32", "--no-progress"]


def _refused(argv: list[str], out: Path, flag: str, capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert flag in err
    assert not out.exists(), "nothing may be written for a refused run"
    return err


def test_head_lr_on_a_run_without_a_head_is_refused(tmp_path: Path, tiny_lm: str, sst2: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A causal LM answering by label words has no task head: ``--head-lr`` changed nothing, while config.json
    recorded it as the run's head learning rate."""
    out = tmp_path / "run"
    _refused(["finetune", "--method", "lora", "--data", sst2, "--model", tiny_lm, "--output", str(out),
              "--head-lr", "1e-2", *COMMON], out, "--head-lr", capsys)


def test_head_lr_on_a_run_with_a_head_still_sets_its_group(tmp_path: Path, tiny_models: dict[str, str],
                                                           sst2: str) -> None:
    out = tmp_path / "run"
    assert cli.main(["finetune", "--method", "lora", "--data", sst2, "--model", tiny_models["bert"], "--output",
                     str(out), "--head-lr", "1e-2", *COMMON]) == 0
    assert json.loads((out / "config.json").read_text())["run"]["head_lr"] == 1e-2


@pytest.mark.parametrize("method", [m for m, spec in rankwise.all_methods().items() if not spec.uses_calibration])
def test_calibration_batches_for_a_method_that_does_not_calibrate_is_refused(
        method: str, tmp_path: Path, tiny_models: dict[str, str], sst2: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--calibration-batches 4`` with LoRA read nothing and changed nothing, yet config.json recorded it."""
    out = tmp_path / "run"
    _refused(["finetune", "--method", method, "--data", sst2, "--model", tiny_models["bert"], "--output", str(out),
              "--calibration-batches", "4", *COMMON], out, "--calibration-batches", capsys)


def test_calibration_batches_for_full_fine_tuning_is_refused(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _refused(["finetune", "--method", "full", "--data", sst2, "--model", tiny_models["bert"], "--output", str(out),
              "--calibration-batches", "4", *COMMON], out, "--calibration-batches", capsys)


def test_compare_gives_calibration_batches_to_the_calibrating_method_only(tmp_path: Path, tiny_models: dict[str, str],
                                                                          sst2: str) -> None:
    """``compare --methods lora,gora --calibration-batches 2``: GoRA calibrates on 2 batches; LoRA's config.json
    records none (the run it made); a compare none of whose methods calibrates refuses the flag."""
    out = tmp_path / "cmp"
    common = ["--data", sst2, "--model", tiny_models["bert"], "--r", "4", *COMMON]
    assert cli.main(["compare", "--methods", "lora,gora", "--seeds", "0", "--calibration-batches", "2",
                     "--output", str(out), *common]) == 0
    run = {m: json.loads((out / f"{m}-seed0" / "config.json").read_text())["run"] for m in ("lora", "gora")}
    assert run["gora"]["calibration_batches"] == 2
    assert run["lora"]["calibration_batches"] is None
    assert cli.main(["compare", "--methods", "lora,dora", "--seeds", "0", "--calibration-batches", "2",
                     "--output", str(tmp_path / "c2"), *common]) == 2


def test_subset_prefix_without_a_row_limit_is_refused(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``--subset prefix`` says how ``--max-train`` / ``--max-eval`` draw rows; with neither, every row is used
    and the flag did nothing (config.json recorded it)."""
    out = tmp_path / "run"
    _refused(["finetune", "--method", "lora", "--data", sst2, "--model", tiny_models["bert"], "--output", str(out),
              "--subset", "prefix", *COMMON], out, "--subset", capsys)


def test_subset_prefix_with_a_row_limit_takes_the_first_rows(tmp_path: Path, tiny_models: dict[str, str],
                                                             sst2: str) -> None:
    out = tmp_path / "run"
    assert cli.main(["finetune", "--method", "lora", "--data", sst2, "--model", tiny_models["bert"], "--output",
                     str(out), "--subset", "prefix", "--max-train", "16", *COMMON]) == 0


# ---------------------------------------------------------------------------- adapter names
def _tiny() -> "torch.nn.Module":
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))


@pytest.mark.parametrize("name", [" ", "a ", " a", "a\tb", "a\nb", "a\\b", "\x00"])
def test_an_adapter_name_a_folder_cannot_hold_plainly_is_refused(name: str) -> None:
    """A blank name, one with spaces at its ends, a control character or a backslash was accepted: it became the
    folder of a several-adapter export (`` /`` for ``" "``) and a part of every tensor key. Nothing is attached."""
    model = _tiny()
    with pytest.raises(ValueError, match="adapter name"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=("0",)), name=name)
    assert not any(True for _ in rankwise.adapter_layers(model))


def test_an_adapter_name_with_inner_spaces_or_dashes_is_kept() -> None:
    model = _tiny()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=("0",)), name="my task-1")
    assert rankwise.active_adapters(model) == ("my task-1",)
