"""A newcomer's first hour, round 2 (issue 32): every run folder exports, a new head left frozen is warned
about, ``compare`` shows the majority-class baseline, short runs summarise their loss honestly, phases show
progress, ``trainable_parameters`` prints a summary."""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import pytest
import torch

import rankwise
from conftest import minilm_path, write_sst2_slice
from rankwise_harness import cli

HEADS = [("linear", "cls"), ("linear", "mean"), ("roberta", "cls"), ("roberta", "mean")]


@pytest.fixture(scope="module")
def bare_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny BERT saved as ``BertModel`` (no task head, as the packaged MiniLM's checkpoint), with a tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_path())
    folder = tmp_path_factory.mktemp("bare") / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertModel"]
    return str(folder)


@pytest.fixture(scope="module")
def sst2_small(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_sst2_slice(tmp_path_factory.mktemp("sst2"), 32, 16)


def _finetune(run: Path, base: str, data: str, *flags: str) -> None:
    argv = ["finetune", "--task", "sst2", "--data", data, "--model", base, "--max-steps", "2", "--batch-size", "8",
            "--max-length", "32", "--r", "4", "--lr", "1e-2", "--output", str(run), "--no-progress", *flags]
    assert cli.main(argv) == 0


def _batch(base: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return dict(tok(["a fine film", "dull , flat and far too long"], padding=True, return_tensors="pt"))


def _trained(base: str, run: Path, head: str, pooling: str) -> torch.nn.Module:
    """The run's model rebuilt by hand (the class the run recorded, the head, the adapter): the reference."""
    import transformers

    from rankwise_harness.heads import install_head
    from rankwise_harness.models import head_modules

    record = json.loads((run / "config.json").read_text())
    assert (record["model_class"], record["head"], record["pooling"]) == ("BertForSequenceClassification", head, pooling)
    model = transformers.BertForSequenceClassification.from_pretrained(base, num_labels=2)
    install_head(model, head, pooling, head_modules(model))
    return rankwise.load(model, run / "adapter", trainable=False).eval()


@pytest.mark.parametrize("head,pooling", HEADS)
def test_every_run_folder_exports(head: str, pooling: str, bare_base: str, sst2_small: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    from rankwise_harness.heads import load_merged

    run = tmp_path / "run"
    _finetune(run, bare_base, sst2_small, "--head", head, "--pooling", pooling)
    batch = _batch(bare_base)
    with torch.no_grad():
        want = _trained(bare_base, run, head, pooling)(**batch).logits
    capsys.readouterr()
    rc = cli.main(["export", str(run / "adapter"), "--out", str(tmp_path / "peft")])  # no --base, no --model-class
    err = capsys.readouterr().err
    if (head, pooling) == ("linear", "cls"):  # transformers' own head: PEFT loads it onto the class the run used
        assert rc == 0, err
        fresh = BertForSequenceClassification.from_pretrained(bare_base, num_labels=2)
        with torch.no_grad():
            got = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()(**batch).logits
    else:  # no transformers class computes this head: one line saying so and what works
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "--format merged" in err, err
        assert not (tmp_path / "peft").exists()
        assert cli.main(["export", str(run / "adapter"), "--out", str(tmp_path / "merged"), "--format", "merged"]) == 0
        assert "load_merged" in capsys.readouterr().out
        with torch.no_grad():
            got = load_merged(tmp_path / "merged")(**batch).logits
    assert not torch.allclose(want, torch.zeros_like(want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_export_outside_a_run_still_needs_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "adapter").mkdir()
    assert cli.main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "o")]) == 2
    assert "pass --base" in capsys.readouterr().err


def test_the_harness_hides_the_head_only_load_report(bare_base: str, caplog: pytest.LogCaptureFixture) -> None:
    """transformers reports the new classifier as MISSING; the harness trains that head, so it says nothing."""
    from transformers import BertForSequenceClassification

    from rankwise_harness.data import get_task
    from rankwise_harness.models import load_model

    BertForSequenceClassification.from_pretrained(bare_base, num_labels=2)
    assert "classifier" in caplog.text and "MISSING" in caplog.text  # what transformers itself says
    caplog.clear()
    load_model(bare_base, get_task("sst2"))
    assert "LOAD REPORT" not in caplog.text


def test_attach_warns_when_a_new_head_stays_frozen(bare_base: str) -> None:
    from transformers import BertForSequenceClassification

    def fresh() -> torch.nn.Module:
        return BertForSequenceClassification.from_pretrained(bare_base, num_labels=2)

    with pytest.warns(UserWarning, match=r"classifier was newly initialised.*modules_to_save=\['classifier'\]"):
        rankwise.attach(fresh(), rankwise.LoraConfig(r=4, target_modules="all-linear"))
    with warnings.catch_warnings():  # listed: it trains and is saved, so nothing to say
        warnings.simplefilter("error")
        rankwise.attach(fresh(), rankwise.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
        # a model built in code (no checkpoint loaded) says nothing about which weights are new
        rankwise.attach(BertForSequenceClassification(fresh().config), rankwise.LoraConfig(r=4, target_modules="all-linear"))
        # every weight from the checkpoint (the saved classifier now included): nothing new, nothing to say
        trained = fresh()
        trained.save_pretrained(Path(bare_base).parent / "with-head")
        full = BertForSequenceClassification.from_pretrained(Path(bare_base).parent / "with-head")
        rankwise.attach(full, rankwise.LoraConfig(r=4, target_modules="all-linear"))


def test_trainable_parameters_prints_one_summary_line() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    params = rankwise.trainable_parameters(model)
    # still the dict it was: names -> the tensors an optimizer takes
    assert set(params) == {"0.lora_a", "0.lora_b", "2.weight", "2.bias"}
    torch.optim.SGD(params.values(), lr=0.1)
    want = 2 * 6 + 5 * 2 + 5 * 3 + 3  # A (r x in), B (out x r), the fully trained layer
    total = 6 * 5 + 5 + want
    assert (params.trainable, params.total) == (want, total)
    assert repr(params) == str(params) == f"trainable params: {want:,} || all params: {total:,} || trainable%: {100 * want / total:.4f}"
    assert "\n" not in repr(params) and "tensor" not in repr(params)


def _labels(tsv: Path) -> list[int]:
    import csv

    with tsv.open(encoding="utf-8") as fh:
        return [int(row["label"]) for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def test_compare_shows_the_majority_class_and_marks_who_beats_it(bare_base: str, sst2_small: str, tmp_path: Path) -> None:
    import csv

    out = tmp_path / "cmp"
    assert cli.main(["compare", "--methods", "lora,dora", "--task", "sst2", "--data", sst2_small, "--model", bare_base,
                     "--seeds", "0", "--max-steps", "2", "--batch-size", "8", "--max-length", "32", "--r", "2",
                     "--eval-before", "--pooling", "cls", "--output", str(out), "--no-progress"]) == 0
    train, dev = _labels(Path(sst2_small) / "train.tsv"), _labels(Path(sst2_small) / "dev.tsv")
    majority = max(set(train), key=lambda c: (train.count(c), -c))
    share = sum(label == majority for label in dev) / len(dev)  # accuracy of always answering that class
    table = (out / "compare.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| *majority class*"))
    assert f"| {share:.4f} |" in row
    assert "| *before training* |" in table
    assert "±" not in table.split("\n\n")[0]  # one seed: no spread to show
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["kind"], r["method"]) for r in rows] == [("method", "lora"), ("method", "dora"),
                                                       ("baseline", "majority class"), ("baseline", "before training")]
    assert float(rows[2]["accuracy_mean"]) == pytest.approx(share) and rows[0]["accuracy_std"] == ""
    for r in rows[:2]:  # the table's verdict follows the numbers
        beats = float(r["accuracy_mean"]) > share
        line = next(line for line in table.splitlines() if line.startswith(f"| {r['method']} |"))
        assert ("| yes |" in line) == beats and ("| **no** |" in line) == (not beats)
    assert (out / "compare.png").stat().st_size > 10_000


@pytest.mark.parametrize("n", [1, 2, 7, 10, 19, 20, 45])
def test_the_loss_summary_compares_disjoint_windows(n: int) -> None:
    from rankwise_harness.train import loss_window, summary

    losses = [float(i) for i in range(n)]  # distinct losses: equal means would mean a shared window
    k = loss_window(n)
    assert 1 <= k <= 10 and (n == 1 or 2 * k <= n) and (n < 20 or k == 10)
    result = {"method": "lora", "task": "sst2", "seed": 0, "metrics": {"accuracy": 0.5}, "losses": losses,
              "trainable_params": 1, "total_params": 2, "train_seconds": 1.0, "steps": n, "step_seconds": 0.1,
              "init_seconds": 0.0, "peak_memory_mb": 1.0, "peak_memory_kind": "x"}
    line = next(l for l in summary(result, Path("out")).splitlines() if l.startswith("loss:"))
    if n == 1:
        assert "one step" in line
    else:
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        assert f"{first:.4f} (mean of the first {k} steps) -> {last:.4f} (last {k})" in line and first != last


def test_long_phases_show_progress_off_a_terminal() -> None:
    from rankwise_harness.progress import PhaseProgress, TrackedBatches

    out = io.StringIO()  # not a TTY: plain lines
    batches = TrackedBatches([{"x": i} for i in range(4)], "gora calibration batches", out=out, every_seconds=0.0)
    assert len(batches) == 4 and batches[2] == {"x": 2}  # still the list GoRA checks the length of
    assert [b["x"] for b in batches] == [0, 1, 2, 3]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("gora calibration batches: 1/4, ") and "elapsed, ETA" in lines[0]
    assert lines[-1].startswith("gora calibration batches: 4/4, ") and lines[-1].endswith("ETA 00:00")
    quiet = io.StringIO()  # a phase shorter than every_seconds prints nothing
    bar = PhaseProgress(3, "evaluating", out=quiet, every_seconds=60.0)
    for _ in range(3):
        bar.advance()
    bar.close()
    assert quiet.getvalue() == ""


def test_gora_calibrates_through_tracked_batches() -> None:
    from rankwise_harness.progress import TrackedBatches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    data = [torch.randn(4, 8) for _ in range(4)]
    cfg = rankwise.GoraConfig(r_ref=2, r_min=1, r_max=4, n_steps=4, target_modules=["0"], seed=0)
    loss = lambda m, x: m(x).pow(2).mean()  # noqa: E731
    plain, tracked = copy.deepcopy(model), copy.deepcopy(model)
    rankwise.attach(plain, cfg, calibration=list(data), loss_fn=loss)
    rankwise.attach(tracked, cfg, calibration=TrackedBatches(data, "gora", enabled=False), loss_fn=loss)
    for a, b in zip(plain.state_dict().values(), tracked.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attach_warns_when_an_adapted_layer_s_base_was_newly_initialised(tmp_path: Path) -> None:
    """DistilBERT's sequence classifier adds a random ``pre_classifier`` beside the ``classifier`` (HF PEFT 0.22 trains
    it as a head for that reason). ``all-linear`` adapts it: a low-rank update of a random weight nothing saves, so
    the adapter's file fits only that model object (``load`` onto a freshly loaded model refuses it). ``attach`` says
    so, naming it and ``modules_to_save``; listed there it is trained in full, saved, and loads onto a fresh model."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=48,
                                        max_position_embeddings=40)
    transformers.DistilBertModel(cfg).save_pretrained(tmp_path / "base")

    def fresh() -> torch.nn.Module:
        return transformers.DistilBertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)

    model = fresh()
    with pytest.warns(UserWarning, match=r"pre_classifier was newly initialised.*is adapted.*"
                                         r"modules_to_save=\['pre_classifier'\]"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"]))
    assert "pre_classifier" in rankwise.adapter_layers(model)
    rankwise.save(model, tmp_path / "adapted")
    with pytest.raises(rankwise.AdapterFileError, match="pre_classifier"):  # why the warning: another random weight
        rankwise.load(fresh(), tmp_path / "adapted")
    model = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules="all-linear",
                                                   modules_to_save=["classifier", "pre_classifier"]))
    assert "pre_classifier" not in rankwise.adapter_layers(model)
    rankwise.save(model, tmp_path / "listed")
    back = rankwise.load(fresh(), tmp_path / "listed")
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
