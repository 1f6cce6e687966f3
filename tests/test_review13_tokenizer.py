"""Review round 13: a run on a model folder that holds no tokenizer.

``finetune --model FOLDER`` where FOLDER holds a model but no tokenizer file trained and reported metrics on the
tokenizer transformers' ``AutoTokenizer`` builds from it: the config's tokenizer class with an empty vocabulary,
which reads every word as ``[UNK]``. No warning. Now the run (``finetune``, ``compare``, ``load_model``) is refused
with one line naming the folder and what to do, before anything is written; a hub name (not a folder) is not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MODEL_CASES, save_tiny_tokenizer, write_sst2_slice

from rankwise_harness import cli
from rankwise_harness.data import get_task, load_task_data
from rankwise_harness.models import ModelError, load_model

VOCAB = 64  # conftest's tiny BERT


@pytest.fixture(scope="module")
def sst2(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_sst2_slice(tmp_path_factory.mktemp("sst2"), 16, 8)


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> str:
    """conftest's tiny BERT classifier saved without a tokenizer (as ``model.save_pretrained`` alone leaves it)."""
    folder = tmp_path_factory.mktemp("bare")
    MODEL_CASES["bert"]().make().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same model with conftest's tiny real tokenizer beside it."""
    folder = tmp_path_factory.mktemp("whole")
    MODEL_CASES["bert"]().make().save_pretrained(folder)
    save_tiny_tokenizer(folder, VOCAB)
    return str(folder)


def _finetune(model: str, data: str, out: Path, *flags: str) -> list[str]:
    return ["finetune", "--task", "sst2", "--data", data, "--model", model, "--max-steps", "2", "--batch-size", "8",
            "--max-length", "16", "--r", "2", "--output", str(out), "--no-progress", *flags]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_what_a_run_read_from_a_folder_without_a_tokenizer(bare: str, sst2: str) -> None:
    """The defect's ground: ``AutoTokenizer`` loads from the folder, and reads every word of every training row as
    ``[UNK]`` (what the run trained on)."""
    from transformers import AutoTokenizer

    empty = AutoTokenizer.from_pretrained(bare)
    rows = load_task_data(get_task("sst2"), sst2).train
    ids = {i for r in rows for i in empty(r.text, add_special_tokens=False)["input_ids"]}
    assert ids == {empty.unk_token_id}


def test_finetune_on_a_folder_without_a_tokenizer_is_refused_before_writing(
        bare: str, sst2: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2, one line naming the folder and how to give it a tokenizer; the output folder is not made."""
    out = tmp_path / "run"
    assert cli.main(_finetune(bare, sst2, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rankwise: error: ") and bare in err[-1], err
    assert "no tokenizer" in err[-1] and "save_pretrained" in err[-1], err
    assert not out.exists()


def test_a_refused_run_loses_the_finished_run_it_would_overwrite(with_tokenizer: str, bare: str, sst2: str,
                                                                 tmp_path: Path) -> None:
    """``--overwrite`` of a finished run with a tokenizer-less model: refused, the finished run's files unchanged;
    ``compare`` likewise writes nothing."""
    out = tmp_path / "run"
    assert cli.main(_finetune(with_tokenizer, sst2, out)) == 0
    before = _files(out)
    assert "metrics.json" in before
    assert cli.main(_finetune(bare, sst2, out, "--overwrite")) == 2
    assert _files(out) == before
    cmp = tmp_path / "cmp"
    assert cli.main(["compare", "--methods", "lora", "--task", "sst2", "--data", sst2, "--model", bare,
                     "--output", str(cmp), "--no-progress"]) == 2
    assert not cmp.exists()


def test_load_model_refuses_it_and_a_hub_name_is_not_taken_for_a_folder(bare: str, with_tokenizer: str) -> None:
    """The library loader refuses the folder; a hub name, which is no folder, passes the check (offline here, its
    load then fails as any unreachable name does, not as a folder without a tokenizer)."""
    from rankwise_harness.models import check_tokenizer

    with pytest.raises(ModelError, match="no tokenizer") as info:
        load_model(bare, get_task("sst2"))
    assert bare in str(info.value)
    check_tokenizer("google-bert/bert-base-uncased")
    check_tokenizer(with_tokenizer)
    with pytest.raises(ModelError) as hub:
        load_model("rankwise-tests/no-such-model", get_task("sst2"))
    assert "no tokenizer" not in str(hub.value)


def test_the_tiny_test_tokenizer_reads_the_data_as_words(with_tokenizer: str, sst2: str) -> None:
    """conftest's ``save_tiny_tokenizer``: ``VOCAB`` tokens, every id inside the model's embedding, and no
    lowercase word of the training rows read as ``[UNK]``."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(with_tokenizer)
    assert len(tok) == VOCAB == AutoConfig.from_pretrained(with_tokenizer).vocab_size
    for row in load_task_data(get_task("sst2"), sst2).train:
        words = [w for w in row.text.split() if w.isalpha() and w.islower()]
        ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and max(ids) < VOCAB, row.text
