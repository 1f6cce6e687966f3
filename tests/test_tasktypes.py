"""The harness's registries: task types (src/rankwise_harness/tasktypes/) and adapter sources (sources.py).

Checked: a new task type is one file (tests/toy_tasktype.py) plus one registry line, and ``finetune`` trains
it end to end with its own model, batches, loss and metric; the built-in types are chosen by task kind and
model; a kind no type trains stops before anything is written; ``full``, the library's methods and an
external adapter are sources of one registry; a run config builds its method config once; the library's
public calls for an adapter's config and step count.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TinyMLP, minilm_path, write_sst2_slice
from torch import nn
from toy_tasktype import WordCount

import rankwise
from rankwise_harness import data
from rankwise_harness.batches import micro_batch_indices
from rankwise_harness.config import ConfigError, RunConfig, build_method_config
from rankwise_harness.data import Task, get_task
from rankwise_harness.sources import (
    ExternalAdapter,
    FullFineTuning,
    RankwiseAdapter,
    adapter_source,
    method_names,
    with_heads,
)
from rankwise_harness.tasktypes import (
    EncoderHead,
    Generation,
    LabelWordsType,
    register_task_type,
    task_type_class,
    task_type_for,
    unregister_task_type,
)
from rankwise_harness.train import finetune

QUIET = dict(show_progress=False, log=lambda _m: None)
COUNT_TASK = Task("wordcount", "count", labels=tuple(str(i) for i in range(40)), metrics=("mae",))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny BERT without dropout (so a training step's loss is a pure function of the batch) and a tiny GPT-2."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    tok = AutoTokenizer.from_pretrained(minilm_path())
    root = tmp_path_factory.mktemp("tasktype-models")
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    for name, model in (("bert", bert), ("gpt2", gpt2)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"bert": str(root / "bert"), "gpt2": str(root / "gpt2")}


@pytest.fixture()
def word_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # -> the toy task's data folder
    """The toy task registered (a task of kind ``count`` and, the one registry line, its task type)."""
    monkeypatch.setitem(data.TASKS, COUNT_TASK.name, COUNT_TASK)
    register_task_type(WordCount)
    words = "the cat sat on a mat while dogs ran far away".split()
    for split, n in (("train", 24), ("dev", 8)):
        rows = [" ".join(words[: 1 + (i * 5 + len(split)) % len(words)]) for i in range(n)]
        (tmp_path / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\t{len(r.split())}\n" for r in rows))
    yield str(tmp_path)
    unregister_task_type(WordCount.name)


def test_a_toy_task_type_in_one_file_trains_end_to_end(tmp_path: Path, models: dict[str, str], word_count: str) -> None:
    """The toy type's loss drives training (the first step's loss is its absolute error, not the model's own MSE, on
    the first batch of the untrained model, the adapter starting at zero), its metric is what ``metrics.json`` reports, consistent with its
    ``predictions.jsonl``, and its head trains fully next to the adapter."""
    from accelerate.utils import set_seed

    out = tmp_path / "run"
    cfg = RunConfig(task="wordcount", method="lora", data=word_count, model=models["bert"], output=str(out),
                    max_steps=30, batch_size=8, lr=1e-2, seed=3)
    assert task_type_class(COUNT_TASK, models["bert"]) is WordCount
    result = finetune(cfg, **QUIET)

    toy = WordCount(COUNT_TASK, models["bert"], cfg)
    set_seed(cfg.seed)  # as the run seeded its model
    base = toy.load(torch.device("cpu"), print)
    train = data.load_task_data(COUNT_TASK, word_count).train
    first = toy.train_batch([train[i] for i in micro_batch_indices(len(train), 8, cfg.seed, 0)])
    with torch.no_grad():
        assert result["losses"][0] == pytest.approx(float(toy.loss(base.train(), first)), rel=1e-5)
    assert result["loss_last10_mean"] < 0.8 * result["loss_first10_mean"]  # it learns (measured: 5.8 -> 3.3)

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(8))
    mae = sum(abs(r["prediction"] - r["count"]) for r in rows) / len(rows)
    assert set(result["metrics"]) == {"mae"} and result["metrics"]["mae"] == pytest.approx(mae)
    assert result["majority_baseline"] is None and result["label_words"] is None and result["pooling"] is None
    description, _ = rankwise.read_adapter(out / "adapter")
    assert description["config"]["modules_to_save"] == ["classifier"]


def test_a_kind_no_task_type_trains_stops_before_anything_is_written(tmp_path: Path, models: dict[str, str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(data.TASKS, "nokind", Task("nokind", "ranking", labels=("0", "1")))
    cfg = RunConfig(task="nokind", method="lora", data=str(tmp_path), model=models["bert"],
                    output=str(tmp_path / "run"), max_steps=1)
    with pytest.raises(ConfigError, match="no task type trains nokind \\(a ranking task\\)"):
        finetune(cfg, **QUIET)
    assert not (tmp_path / "run").exists()


def test_the_built_in_task_types_follow_the_task_kind_and_the_model(models: dict[str, str]) -> None:
    assert task_type_class(get_task("sst2"), models["bert"]) is EncoderHead
    assert task_type_class(get_task("stsb"), models["bert"]) is EncoderHead
    assert task_type_class(get_task("sst2"), models["gpt2"]) is LabelWordsType
    assert task_type_class(get_task("gsm8k"), models["gpt2"]) is Generation
    with pytest.raises(ConfigError, match="stsb is a regression task"):  # a causal LM cannot score a regression
        task_type_for(get_task("stsb"), models["gpt2"], RunConfig(task="stsb"))
    with pytest.raises(ConfigError, match="is not a causal LM"):
        task_type_for(get_task("sst2"), models["bert"], RunConfig(task="sst2", label_words=(" no", " yes")))


def test_the_deprecated_encoder_makes_the_task_types_batches(models: dict[str, str], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from rankwise_harness.batches import Encoder

    rows = data.load_task_data(get_task("sst2"), write_sst2_slice(tmp_path, 4, 4)).dev
    tok = AutoTokenizer.from_pretrained(models["bert"])
    with pytest.warns(DeprecationWarning, match="Encoder is deprecated"):
        old = Encoder(get_task("sst2"), tok, 32).train_batch(rows)
    new = task_type_for(get_task("sst2"), models["bert"], RunConfig(task="sst2", max_length=32))
    new.tokenizer = tok
    assert {k: v.tolist() for k, v in old.items()} == {k: v.tolist() for k, v in new.train_batch(rows).items()}


# ---------------------------------------------------------------------------- adapter sources
def test_full_fine_tuning_and_the_library_methods_are_sources_of_one_registry() -> None:
    assert method_names() == sorted(rankwise.all_methods()) + ["full"]
    assert isinstance(adapter_source("full"), FullFineTuning) and RunConfig(task="sst2", method="full").method_config() is None
    for name, method in rankwise.all_methods().items():
        assert isinstance(adapter_source(name), RankwiseAdapter)
        assert RunConfig(task="sst2", method=name).lr == method.config_cls.default_lr
    with pytest.raises(ConfigError, match="unknown method 'nola'; known: .*full"):
        adapter_source("nola")
    with pytest.raises(ConfigError, match="needs an adapter method's config"):
        ExternalAdapter(lambda m, c, calibration=None: None).check(RunConfig(task="sst2", method="full"))
    with pytest.raises(ConfigError, match="--quantize"):
        RunConfig(task="sst2", method="full", quantize="nf4")


def test_a_run_config_builds_its_method_config_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--r`` and the rest become one method config, kept: validating the flags, the run's identity and the
    attach all read it; changing a field builds it anew."""
    built: list[int | None] = []
    real = RankwiseAdapter.config

    def counting(self: RankwiseAdapter, cfg: RunConfig) -> rankwise.AdapterConfig | None:
        built.append(cfg.r)
        return real(self, cfg)

    monkeypatch.setattr(RankwiseAdapter, "config", counting)
    cfg = RunConfig(task="sst2", method="gora", r=4, overrides={"r_min": "2"})
    assert cfg.identity()["method_config"] == cfg.method_config().to_dict() and cfg.method_config().r_ref == 4
    assert built == [4]
    cfg.r = 6
    assert cfg.method_config().r_ref == 6 and built == [4, 6]


@pytest.mark.parametrize("name", sorted(rankwise.all_methods()))
def test_the_kept_config_with_the_heads_is_the_one_built_with_them(name: str) -> None:
    heads = ("classifier", "pre_classifier")
    cfg = RunConfig(task="sst2", method=name, r=4, alpha=8.0, targets=("query", "value"))
    fresh = build_method_config(name, r=4, alpha=8.0, targets=("query", "value"), modules_to_save=heads, seed=0)
    assert with_heads(cfg.method_config(), heads).to_dict() == fresh.to_dict()
    assert with_heads(cfg.method_config(), None) is cfg.method_config()


# ---------------------------------------------------------------------------- the library's public calls
def test_an_adapters_config_and_step_count_are_public(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyMLP()
    cfg = rankwise.LoraConfig(r=2, target_modules=("fc1", "fc2"))
    rankwise.attach(model, cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        nn.functional.mse_loss(model(torch.randn(4, 12)).logits, torch.zeros(4, 3)).backward()
        opt.step()
        rankwise.step(model, opt)
    assert rankwise.adapter_config(model) == cfg and rankwise.step_count(model) == 3
    rankwise.save(model, tmp_path / "a")
    fresh = TinyMLP()
    rankwise.load(fresh, tmp_path / "a", check_base=False)
    assert rankwise.step_count(fresh) == 3  # saved with the adapter
    rankwise.set_step_count(fresh, 7)
    assert rankwise.step_count(fresh) == 7
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="step must be an integer"):
            rankwise.set_step_count(fresh, bad)  # type: ignore[arg-type]
    assert dataclasses.asdict(rankwise.adapter_config(fresh)) == dataclasses.asdict(cfg)
