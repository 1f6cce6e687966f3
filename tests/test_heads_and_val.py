"""Harness heads and held-out data: ``--head roberta``, ``--pooling mean``, ``--head-lr``, ``--val-split``,
per-epoch evaluation with the best (chosen on held-out training rows) and the last reported, bad values."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

import rankwise
from rankwise_harness import cli
from rankwise_harness import train as train_mod
from rankwise_harness.config import ConfigError, RunConfig
from rankwise_harness.data import get_task, load_task_data
from rankwise_harness.heads import ClassifierHead, install_head, pool, resolve_pooling
from rankwise_harness.models import head_modules
from rankwise_harness.selection import best_and_last, evals_since_best, sample_rows, split_validation
from rankwise_harness.train import finetune
from conftest import minilm_path
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

QUIET = {"show_progress": False, "log": lambda _m: None}


def _bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- heads and pooling
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_roberta_head_is_dense_tanh_out_proj_on_the_pooled_vector(pooling: str) -> None:
    model = _bert()
    assert install_head(model, "roberta", pooling, head_modules(model)) == "classifier"
    head = model.classifier
    assert isinstance(head, ClassifierHead)
    assert head.dense.weight.shape == (32, 32) and head.out_proj.weight.shape == (2, 32)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    labels = torch.tensor([0, 1, 1])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():  # the reference, written out: encoder states -> pooled -> dense -> tanh -> out_proj
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # 3 x 7 x 32
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)])
        want = torch.tanh(pooled @ head.dense.weight.T + head.dense.bias) @ head.out_proj.weight.T + head.out_proj.bias
    assert out.logits.shape == (3, 2)
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(want, labels), rtol=1e-5, atol=1e-6)


def test_regression_head_has_one_output_and_mse_loss() -> None:
    model = _bert(num_labels=1)
    install_head(model, "roberta", "mean", head_modules(model))
    ids, target = _ids(2), torch.tensor([0.5, -1.0, 2.0])
    out = model(input_ids=ids, labels=target)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(out.loss, ((out.logits.squeeze(-1) - target) ** 2).mean())


def test_mean_pooling_ignores_padding() -> None:
    model = _bert()
    install_head(model, "linear", "mean", head_modules(model))
    ids = _ids(1)
    padded = torch.cat([ids, torch.zeros(3, 5, dtype=ids.dtype)], dim=1)  # 5 extra pad tokens
    mask = torch.cat([torch.ones_like(ids), torch.zeros(3, 5, dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        short = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        long = model(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-6)
    # the pooling itself: whatever sits at padded positions never reaches the pooled vector
    hidden = torch.randn(3, 12, 32)
    noisy = hidden.clone()
    noisy[:, 7:] = 1e6
    torch.testing.assert_close(pool(noisy, mask, "mean"), hidden[:, :7].mean(1))


@pytest.mark.parametrize("head, pooling", [("linear", "mean"), ("roberta", "cls")])
def test_an_installed_head_removes_the_unread_bert_pooler(head: str, pooling: str) -> None:
    """Nothing reads BERT's pooler once the head pools the last hidden states: it goes, so all-linear puts no
    dead adapter on it (an adapter there would get no gradient yet count as trained parameters)."""
    model = _bert()
    assert any(n.startswith("bert.pooler") for n, _ in model.named_modules())
    install_head(model, head, pooling, head_modules(model))
    assert not any("pooler" in n for n, _ in model.named_modules())
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules="all-linear", modules_to_save=("classifier",)))
    names = set(rankwise.adapter_layers(model))
    assert names and not any("pooler" in n for n in names)
    model(input_ids=_ids(), labels=torch.tensor([0, 1, 1])).loss.backward()
    assert all(p.grad is not None for p in rankwise.trainable_parameters(model).values())  # nothing dead


def test_default_head_leaves_the_model_as_built() -> None:
    model, fresh = _bert(), _bert()
    assert install_head(model, "linear", "cls", head_modules(model)) is None
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=0, atol=0)


def test_pooling_defaults_to_mean_only_for_mean_pooled_sentence_transformers(tmp_path: Path,
                                                                            tiny_models: dict[str, str]) -> None:
    assert resolve_pooling(None, minilm_path()) == "mean"  # the packaged MiniLM: modules.json + 1_Pooling (mean)
    assert resolve_pooling("cls", minilm_path()) == "cls"  # an explicit choice wins
    assert resolve_pooling(None, tiny_models["bert"]) == "cls"  # a plain transformers checkpoint
    assert resolve_pooling(None, "org/some-hub-name") == "cls"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text("[]")
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                     "pooling_mode_mean_tokens": False}))
    assert resolve_pooling(None, str(tmp_path)) == "cls"  # a sentence-transformers model pretrained with [CLS]


def test_roberta_head_trains_at_head_lr_and_is_counted_apart(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[torch.optim.Optimizer] = []
    real = torch.optim.AdamW

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(train_mod.torch.optim, "AdamW", spy)
    cfg = _cfg(tmp_path, tiny_models, sst2, head="roberta", pooling="mean", lr=1e-3, head_lr=3e-2, weight_decay=0.01,
               targets=("query", "value"))
    result = finetune(cfg, **QUIET)
    (opt,) = made
    groups = {g.get("name"): g for g in opt.param_groups}
    h = 32  # the tiny BERT's width
    head = ("head", "head_no_decay")  # the head's biases are not decayed (HF Trainer's rule)
    assert sorted(tuple(p.shape) for name in head for p in groups[name]["params"]) == [(2,), (2, h), (h,), (h, h)]
    assert all(groups[name]["initial_lr"] == 3e-2 for name in head)
    assert all(g["initial_lr"] == 1e-3 for name, g in groups.items() if name not in head)
    assert [g["weight_decay"] for g in opt.param_groups if g.get("name") != "head_no_decay"] == [0.01] * (len(groups) - 1)
    assert groups["head_no_decay"]["weight_decay"] == 0.0
    head_ids = {id(p) for name in head for p in groups[name]["params"]}
    assert not any(id(p) in head_ids for name, g in groups.items() if name not in head for p in g["params"])
    # h x h + h + 2h + 2 head parameters; LoRA r=4 on query and value of 2 layers: 4 x 4 x (h + h)
    assert result["head_params"] == h * h + h + 2 * h + 2
    assert result["adapter_params"] == 4 * 4 * (h + h)
    assert result["trainable_params"] == result["head_params"] + result["adapter_params"]
    assert (result["head"], result["pooling"]) == ("roberta", "mean")
    assert json.loads((Path(cfg.output) / "metrics.json").read_text())["head_params"] == result["head_params"]


# ---------------------------------------------------------------------------- held-out training rows
def test_split_validation_is_disjoint_complete_and_seed_independent() -> None:
    rows = list(range(50))
    torch.manual_seed(1)
    train, val, held = split_validation(rows, 0.2)
    torch.manual_seed(2)
    assert split_validation(rows, 0.2) == (train, val, held)
    assert len(val) == 10 and sorted(train + val) == rows and not set(train) & set(val)
    assert val == sorted(val) and train == sorted(train) and held == val
    assert val != list(range(40, 50)) and val != list(range(10)), "a shuffle, not a slice"
    assert split_validation(rows, 0.2, data_seed=1)[1] != val, "--data-seed chooses another split"
    for bad in (0.001, 0.999):  # leaves no held-out row, or no training row
        with pytest.raises(ValueError, match="at least one"):
            split_validation(rows, bad)


def _key(ex) -> tuple:
    return (ex.text, ex.text_pair, ex.label)


def _recorded_run(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple], list[tuple], dict]:
    """Run ``cfg``; returns the rows training batches drew, the rows every held-out evaluation saw, and metrics."""
    trained: list[tuple] = []
    inside = [False]
    from rankwise_harness.tasktypes import EncoderHead

    real_eval, real_batch = train_mod.evaluate, EncoderHead.train_batch

    def evaluate(model, enc, rows, *args, **kwargs):
        inside[0] = True
        try:
            return real_eval(model, enc, rows, *args, **kwargs)
        finally:
            inside[0] = False

    def train_batch(self, rows):
        if not inside[0]:
            trained.extend(_key(r) for r in rows)
        return real_batch(self, rows)

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    monkeypatch.setattr(EncoderHead, "train_batch", train_batch)
    seen: list[list[tuple]] = []

    def spy_split(rows, fraction, data_seed=0):
        out = split_validation(rows, fraction, data_seed)
        seen.append([_key(r) for r in out[1]])
        return out

    monkeypatch.setattr(train_mod, "split_validation", spy_split)
    result = finetune(cfg, **QUIET)
    return trained, seen[0], result


def test_val_split_never_overlaps_training_or_dev_and_is_the_same_for_every_seed(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = load_task_data(get_task("sst2"), sst2)
    first48 = [_key(r) for r in sample_rows(splits.train, 48, 0)]  # --max-train's sample (data seed 0)
    dev = {_key(r) for r in splits.dev}
    vals = []
    for seed in (0, 1):
        cfg = _cfg(tmp_path, tiny_models, sst2, output=str(tmp_path / f"s{seed}"), seed=seed, max_train=48,
                   val_split=0.25, max_steps=None, epochs=3, eval_each_epoch=True)
        trained, val, result = _recorded_run(cfg, monkeypatch)
        assert len(val) == 12 and result["val_examples"] == 12 and result["train_examples"] == 36
        assert set(val) <= set(first48), "--max-train applies first"
        assert not set(val) & set(trained), "a held-out row was trained on"
        assert not set(val) & dev
        assert set(trained) == set(first48) - set(val)
        # evaluated at every epoch end (4 steps of 8 rows from 36), dev and held-out both recorded
        evals = result["eval_history"]
        assert [e["step"] for e in evals] == [4, 8, 12] and [e["epoch"] for e in evals] == [1.0, 2.0, 3.0]
        assert all(set(e["val"]) == {"accuracy"} for e in evals)
        best = max(evals, key=lambda e: e["val"]["accuracy"])  # first maximum
        assert result["best"]["step"] == best["step"] and result["best"]["dev"]["accuracy"] == best["accuracy"]
        assert result["last"]["step"] == 12 and result["last"]["dev"] == result["metrics"]
        vals.append(val)
    assert vals[0] == vals[1]


def test_best_is_never_chosen_on_dev() -> None:
    evals = [{"step": 1, "accuracy": 0.9}, {"step": 2, "accuracy": 0.5}]
    assert best_and_last(evals, "accuracy") == (None, {"step": 2, "epoch": None, "val": None,
                                                       "dev": {"accuracy": 0.5}, "headline_metric": "accuracy"})
    evals = [{"step": 1, "accuracy": 0.9, "val": {"accuracy": 0.6}}, {"step": 2, "accuracy": 0.5, "val": {"accuracy": 0.7}},
             {"step": 3, "accuracy": 0.8, "val": {"accuracy": 0.7}}]
    best, _ = best_and_last(evals, "accuracy")
    assert best["step"] == 2 and best["dev"] == {"accuracy": 0.5}  # highest held-out score, earliest on ties


def test_evals_since_best_counts_held_out_evaluations_after_the_earliest_best() -> None:
    def ev(*vals):
        return [{"step": i, "accuracy": 0.0, "val": {"accuracy": v}} for i, v in enumerate(vals)]

    assert evals_since_best([], "accuracy") == 0
    assert evals_since_best([{"step": 1, "accuracy": 0.9}], "accuracy") == 0  # no held-out metrics: never stops
    assert evals_since_best(ev(0.5, 0.7), "accuracy") == 0
    assert evals_since_best(ev(0.5, 0.7, 0.6), "accuracy") == 1
    assert evals_since_best(ev(0.5, 0.7, 0.6, 0.7), "accuracy") == 2  # a tie is not a new best


def test_patience_stops_after_n_held_out_evaluations_without_a_new_best(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # every evaluation is dev then held-out; the held-out scores are scripted: best at epoch 2, then none better
    val_scores = itertools.chain([0.5, 0.7, 0.6, 0.7, 0.65], itertools.repeat(0.1))
    calls = {"n": 0}

    def evaluate(*_args, **_kwargs):
        calls["n"] += 1
        return {"accuracy": next(val_scores) if calls["n"] % 2 == 0 else 0.0}

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    cfg = _cfg(tmp_path, tiny_models, sst2, max_train=48, val_split=0.25, max_steps=None, epochs=8,
               eval_each_epoch=True, patience=3)
    result = finetune(cfg, **QUIET)
    # 36 training rows, batch 8: 4 steps an epoch; epochs 3, 4, 5 bring no new best, so it stops at step 20 of 32
    assert result["steps"] == 20 and result["stopped_early"]
    assert [e["step"] for e in result["eval_history"]] == [4, 8, 12, 16, 20, 20]
    assert result["best"]["step"] == 8
    unlimited = finetune(dataclasses.replace(cfg, patience=None, output=str(tmp_path / "all")), **QUIET)
    assert unlimited["steps"] == 32 and not unlimited["stopped_early"]


class _Crash(Exception):
    pass


def test_val_split_and_roberta_head_resume_to_the_uninterrupted_result(tmp_path: Path, tiny_models: dict[str, str],
                                                                        sst2: str) -> None:
    kw = dict(max_train=48, val_split=0.25, max_steps=None, epochs=2, eval_each_epoch=True, head="roberta",
              pooling="mean", head_lr=1e-2, save_every=3, dropout=0.1)
    whole = finetune(_cfg(tmp_path, tiny_models, sst2, output=str(tmp_path / "a"), **kw), **QUIET)

    def crash(step: int, _loss: float) -> None:
        if step == 5:
            raise _Crash

    cfg = _cfg(tmp_path, tiny_models, sst2, output=str(tmp_path / "b"), **kw)
    with pytest.raises(_Crash):
        finetune(cfg, hook=crash, **QUIET)
    resumed = finetune(cfg, resume=True, **QUIET)
    for key in ("losses", "eval_history", "best", "last", "metrics", "head_params"):
        assert resumed[key] == whole[key], key


# ---------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("field, value, says", [
    ("head", "mlp", "--head must be one of linear, roberta"),
    ("pooling", "max", "--pooling must be one of cls, mean"),
    ("val_split", 0.0, "--val-split must be a fraction strictly between 0 and 1"),
    ("val_split", 1.0, "--val-split"),
    ("val_split", -0.2, "--val-split"),
    ("val_split", float("nan"), "--val-split"),
    ("head_lr", -1e-3, "--head-lr must be positive"),
    ("head_lr", 0.0, "--head-lr must be positive"),
    ("patience", 2, "--patience stops on the held-out metric: it needs --val-split"),
])
def test_bad_head_pooling_split_values_are_named(field: str, value, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        RunConfig(task="sst2", **{field: value})


def test_patience_needs_a_positive_count_and_an_evaluation_schedule() -> None:
    with pytest.raises(ConfigError, match="--patience must be at least 1"):
        RunConfig(task="sst2", val_split=0.1, eval_each_epoch=True, patience=0)
    with pytest.raises(ConfigError, match="--eval-each-epoch or --eval-every"):
        RunConfig(task="sst2", val_split=0.1, patience=2)
    assert RunConfig(task="sst2", val_split=0.1, eval_every=5, patience=2).patience == 2


def test_bad_flags_on_the_command_line_stop_before_any_work(tmp_path: Path, sst2: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    base = ["finetune", "--task", "sst2", "--data", sst2, "--output", str(tmp_path / "x")]
    for extra, says in ((["--pooling", "max"], "--pooling"), (["--head", "mlp"], "--head"),
                        (["--val-split", "1.5"], "--val-split"), (["--head-lr=-1e-3"], "--head-lr"),
                        (["--method", "raclora", "--set", "keep_optimizer_state=maybe"], "keep_optimizer_state")):
        assert cli.main(base + extra) == 2
        assert says in capsys.readouterr().err
    assert cli.main(["finetune", "--task", "gsm8k", "--head", "roberta", "--output", str(tmp_path / "g")]) == 2
    assert "generates text" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "g").exists()


def test_a_split_leaving_no_rows_is_refused(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    cfg = _cfg(tmp_path, tiny_models, sst2, max_train=2, val_split=0.1)
    with pytest.raises(ConfigError, match="--val-split 0.1 of 2 training rows"):
        finetune(cfg, **QUIET)


def test_raclora_keep_optimizer_state_reaches_the_method(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    cfg = _cfg(tmp_path, tiny_models, sst2, method="raclora", overrides={"keep_optimizer_state": "true", "link_steps": "2"})
    finetune(cfg, **QUIET)
    saved = json.loads((Path(cfg.output) / "config.json").read_text())
    assert saved["method_config"]["keep_optimizer_state"] is True
    assert rankwise.RacLoraConfig.__dataclass_fields__["keep_optimizer_state"].default is False
