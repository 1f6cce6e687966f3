"""``finetune --trainable-token-indices`` / ``--ensure-weight-tying``: the adapter config's ``trainable_token_indices``
and ``ensure_weight_tying`` from first-class flags, checked end to end on a tiny tied Llama classifying by label words.

Checked: the flag's syntax (``5,7``, ``embed_tokens=5,7;lm_head=5``, JSON) and its errors, stopping before anything
is written; ``--set`` of the same field beside its flag refused; ``full`` refusing them and ``compare`` passing them
to the adapter methods only; a run trains the listed rows (every other row exactly the base's), its adapter loads
back with ``rankwise.load``, and its ``rankwise export`` loads in HF PEFT with the same logits; the tie trains one
set of factors for the embedding and its head, and a method that cannot tie refuses before anything trains;
``--resume`` after a crash ends bitwise where the uninterrupted run ends; ``--keep-best`` keeps the best
evaluation's rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rankwise
from rankwise_harness import cli
from rankwise_harness.config import ConfigError, RunConfig, parse_token_indices
from rankwise_harness.sources import for_method, shared_method
from rankwise_harness.train import finetune
from test_label_words import sst2, tiny_lm  # noqa: F401  (module fixtures: a tiny tied Llama, 48/16 SST-2 rows)

QUIET = {"show_progress": False, "log": lambda _m: None}


def _ids(path: str) -> list[int]:
    """Rows to train: the label words' tokens (the tied head reads them at every step), a prompt token, and the last
    row of the table (which no text shows)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" negative", " positive", "Review")]
    return [*words, len(tok) - 1]


def _flags(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--task", "sst2", "--method", "lora", "--model", model, "--data", data, "--output", str(out),
            "--targets", "q_proj,v_proj", "--r", "4", "--alpha", "8", "--max-steps", "4", "--batch-size", "4",
            "--lr", "5e-2", "--max-length", "48", "--max-eval", "8", "--no-progress", *extra]


def _base(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1) % 300 + 3
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------- the flags
def test_the_flag_reads_rows_of_the_input_embedding_per_module_or_json() -> None:
    assert parse_token_indices("5,7,9") == (5, 7, 9) == parse_token_indices(" 5, 7 ,9 ") == parse_token_indices("[5,7,9]")
    per_module = {"embed_tokens": (5, 7), "lm_head": (5,)}
    assert parse_token_indices("embed_tokens=5,7;lm_head=5") == per_module
    assert parse_token_indices("embed_tokens=5,7; lm_head=5;") == per_module
    assert parse_token_indices('{"embed_tokens": [5, 7], "lm_head": [5]}') == per_module
    assert parse_token_indices([5, 7]) == (5, 7) and parse_token_indices({"lm_head": [5]}) == {"lm_head": (5,)}


@pytest.mark.parametrize("raw, says", [
    ("", "is empty"), ("5,x", "'x' is not a token id"), ("5,,7", "an empty entry is not a token id"),
    ("-1", "'-1' is not a token id"), ("5.0", "'5.0' is not a token id"), ("5,5", "more than once"),
    ("embed_tokens=", "an empty entry"), ("=5", "not module=ids"), ("embed_tokens=5;lm_head", "not module=ids"),
    ("embed_tokens=5;embed_tokens=6", "twice"), ("[5,", "not valid JSON"), ("{}", "at least one module"),
    ("[]", "is empty"), ('["a"]', "integers >= 0"), ("a b=5", "not module=ids"),
])
def test_bad_rows_are_refused_naming_the_flag_and_its_syntax(raw: str, says: str) -> None:
    with pytest.raises(ConfigError, match="--trainable-token-indices") as err:
        parse_token_indices(raw)
    assert says in str(err.value)


def test_a_bad_flag_stops_the_command_before_anything_is_written(tiny_lm: str, sst2: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(_flags(tiny_lm, sst2, out, "--trainable-token-indices", "5,x")) == 2
    err = capsys.readouterr().err
    assert "rankwise: error: --trainable-token-indices" in err and "embed_tokens=5,7;lm_head=5" in err
    assert not out.exists()


def test_the_flags_and_set_of_the_same_field_are_refused_together() -> None:
    base = dict(task="sst2", method="lora")
    with pytest.raises(ConfigError, match=r"--set trainable_token_indices=\[5\] and --trainable-token-indices 7 both"):
        RunConfig(**base, trainable_token_indices="7", overrides={"trainable_token_indices": "[5]"})
    with pytest.raises(ConfigError, match="--set ensure_weight_tying=true and --ensure-weight-tying both"):
        RunConfig(**base, ensure_weight_tying=True, overrides={"ensure_weight_tying": "true"})
    with pytest.raises(ConfigError, match="--ensure-weight-tying is a switch"):
        RunConfig(**base, ensure_weight_tying="yes")  # type: ignore[arg-type]
    # --set alone still works, and builds the same adapter config (so the same run identity, for --resume)
    by_set = RunConfig(**base, overrides={"trainable_token_indices": "[5,7]", "ensure_weight_tying": "true"})
    by_flag = RunConfig(**base, trainable_token_indices="5,7", ensure_weight_tying=True)
    assert by_set.method_config() == by_flag.method_config()
    assert by_set.identity() == by_flag.identity()
    recorded = RunConfig.from_dict(json.loads(json.dumps(by_flag.to_dict())))
    assert recorded.trainable_token_indices == (5, 7) and recorded.identity() == by_flag.identity()


def test_full_fine_tuning_refuses_them_and_compare_gives_them_to_the_adapter_methods_only() -> None:
    with pytest.raises(ConfigError, match="--trainable-token-indices: --method full has no use for it"):
        RunConfig(task="sst2", method="full", trainable_token_indices="5")
    with pytest.raises(ConfigError, match="--ensure-weight-tying: --method full has no use for it"):
        RunConfig(task="sst2", method="full", ensure_weight_tying=True)
    args = cli.build_parser().parse_args(["compare", "--task", "sst2", "--methods", "lora,full",
                                          "--trainable-token-indices", "embed_tokens=5", "--ensure-weight-tying"])
    cli._compare_args(args)
    base = cli._run_config(args, shared_method(args.methods), "out")
    full = for_method(base, "full", seed=0)
    assert full.trainable_token_indices is None and full.ensure_weight_tying is False and full.method_config() is None
    dora = for_method(base, "dora", seed=0).method_config()
    assert dora is not None and dora.trainable_token_indices == {"embed_tokens": (5,)} and dora.ensure_weight_tying


# ---------------------------------------------------------------------------- end to end
def test_a_run_trains_the_rows_loads_back_and_exports_to_peft(tiny_lm: str, sst2: str, tmp_path: Path) -> None:
    rows = _ids(tiny_lm)
    out = tmp_path / "run"
    assert cli.main(_flags(tiny_lm, sst2, out, "--trainable-token-indices", ",".join(map(str, rows)))) == 0
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["run"]["trainable_token_indices"] == rows
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())["config"]
    assert saved["trainable_token_indices"] == {"model.embed_tokens": rows}  # a list: the input embedding's rows

    base, model = _base(tiny_lm), _base(tiny_lm)
    rankwise.load(model, out / "adapter")
    vocab, dim = base.get_input_embeddings().weight.shape
    with torch.no_grad():  # the tables the adapted modules compute with: input rows, and the tied head's rows
        for m, m0 in ((model.get_input_embeddings(), base.get_input_embeddings()), (model.lm_head, base.lm_head)):
            probe = torch.arange(vocab) if isinstance(m0, torch.nn.Embedding) else torch.eye(dim)
            table, table0 = (t(probe) if isinstance(m0, torch.nn.Embedding) else t(probe).T for t in (m, m0))
            moved = (table != table0).any(-1)
            assert moved[rows].all() and int(moved.sum()) == len(rows), "exactly the listed rows trained"
    loaded = _logits(model)
    assert not torch.allclose(loaded, _logits(base))

    peft_dir = tmp_path / "peft"
    assert cli.main(["export", str(out / "adapter"), "--out", str(peft_dir), "--format", "peft"]) == 0
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(_base(tiny_lm), str(peft_dir)).eval()
    torch.testing.assert_close(_logits(peft_model), loaded, rtol=1e-5, atol=1e-5)


def test_the_tie_trains_one_set_of_factors_and_exports_to_peft(tiny_lm: str, sst2: str, tmp_path: Path) -> None:
    out = tmp_path / "tied"
    flags = _flags(tiny_lm, sst2, out, "--ensure-weight-tying")
    flags[flags.index("q_proj,v_proj")] = "q_proj,v_proj,embed_tokens"
    assert cli.main(flags) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())["config"]
    assert config["ensure_weight_tying"] is True
    model = _base(tiny_lm)
    rankwise.load(model, out / "adapter")
    tied = rankwise.state.tied_layers(model)
    assert set(tied) == {"lm_head"}
    loaded = _logits(model)
    peft_dir = tmp_path / "peft"
    assert cli.main(["export", str(out / "adapter"), "--out", str(peft_dir)]) == 0
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(_base(tiny_lm), str(peft_dir)).eval()
    torch.testing.assert_close(_logits(peft_model), loaded, rtol=1e-5, atol=1e-5)


def test_a_method_that_cannot_tie_refuses_before_anything_trains(tiny_lm: str, sst2: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dora"
    flags = _flags(tiny_lm, sst2, out, "--ensure-weight-tying")
    flags[flags.index("lora")] = "dora"
    flags[flags.index("q_proj,v_proj")] = "q_proj,v_proj,embed_tokens"
    assert cli.main(flags) == 2
    err = capsys.readouterr().err
    assert "rankwise: error: cannot attach dora" in err and "ensure_weight_tying" in err and "Traceback" not in err
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists()
    # the same folder takes the run without the flag, no --overwrite needed: nothing of the refused run is left
    assert cli.main([f for f in flags if f != "--ensure-weight-tying"]) == 0


@pytest.fixture(scope="module")
def untied_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama with its own lm_head (tie_word_embeddings=False)."""
    from test_label_words import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("untied-llama"), tied=False)


@pytest.mark.parametrize("case", ["tied head, no adapter on it", "no tied head"])
def test_a_tie_flag_that_ties_nothing_is_refused_before_training(tiny_lm: str, untied_lm: str, sst2: str,
                                                                 tmp_path: Path, case: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the run trained and reported nothing, the flag silently ignored (HF PEFT warns: "You have requested
    `ensure_weight_tying`, but no tied modules ..."). Now the run stops before training, saying why."""
    model = tiny_lm if case.startswith("tied") else untied_lm
    flags = _flags(model, sst2, tmp_path / "run", "--ensure-weight-tying")
    if case == "no tied head":
        flags[flags.index("q_proj,v_proj")] = "q_proj,v_proj,embed_tokens"
    assert cli.main(flags) == 2
    err = capsys.readouterr().err
    assert "--ensure-weight-tying ties nothing" in err and "Traceback" not in err
    assert ("no head shares" in err) if case == "no tied head" else ("add embed_tokens to --targets" in err)
    assert not (tmp_path / "run" / "config.json").exists()
    # where it ties something it runs: the tied head's rows follow the embedding's
    assert cli.main(_flags(tiny_lm, sst2, tmp_path / "rows", "--ensure-weight-tying", "--trainable-token-indices",
                           "5")) == 0


class _Crash(Exception):
    pass


@pytest.mark.parametrize("tie", ["rows", "rows and tie", "tie"])
def test_resume_after_a_crash_ends_where_the_uninterrupted_run_ends(tiny_lm: str, sst2: str, tmp_path: Path,
                                                                     tie: str) -> None:
    rows = ",".join(map(str, _ids(tiny_lm)))
    extra: tuple[str, ...] = ("--max-steps", "6", "--save-every", "2", "--dropout", "0.1")
    if "rows" in tie:
        extra += ("--trainable-token-indices", rows)
    if "tie" in tie:  # the tied head follows the embedding's layer: the token rows', or the embedding's LoRA factors
        extra += ("--ensure-weight-tying",) + (("--targets", "q_proj,v_proj,embed_tokens") if tie == "tie" else ())
    assert cli.main(_flags(tiny_lm, sst2, tmp_path / "whole", *extra)) == 0

    args = cli.build_parser().parse_args(_flags(tiny_lm, sst2, tmp_path / "cut", *extra))
    cfg = cli._run_config(args, "lora", str(tmp_path / "cut"))

    def crash(step: int, _loss: float) -> None:
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        finetune(cfg, hook=crash, **QUIET)
    assert cli.main([*_flags(tiny_lm, sst2, tmp_path / "cut", *extra), "--resume"]) == 0
    whole, cut = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    assert cut["steps_this_session"] == 6 - 2 and cut["losses"] == whole["losses"]
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("whole", "cut"))
    assert a.keys() == b.keys() and any(("token" if "rows" in tie else "embed") in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # other rows than the run's are another run: --resume refuses them
    other = [*_flags(tiny_lm, sst2, tmp_path / "cut", *extra), "--resume", "--trainable-token-indices", "5"]
    assert cli.main([f for f in other if f != "--ensure-weight-tying"]) == 2


def test_compare_trains_the_rows_with_the_adapter_methods_and_reuses_its_runs(tiny_lm: str, sst2: str,
                                                                             tmp_path: Path) -> None:
    flags = _flags(tiny_lm, sst2, tmp_path / "cmp", "--trainable-token-indices", "embed_tokens=5,7", "--seeds", "0")
    flags[0], flags[flags.index("--method")] = "compare", "--methods"
    flags[flags.index("lora")] = "lora,full"
    flags.remove("--r"), flags.remove("4"), flags.remove("--alpha"), flags.remove("8")
    assert cli.main(flags) == 0
    runs = {json.loads(p.read_text())["run"]["method"]: json.loads(p.read_text())["run"]
            for p in (tmp_path / "cmp").glob("*/config.json")}
    assert runs["lora"]["trainable_token_indices"] == {"embed_tokens": [5, 7]}
    assert runs["full"]["trainable_token_indices"] is None
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").glob("*/metrics.json")}
    assert cli.main(flags) == 0  # the same command again: every run is found finished and reused
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").glob("*/metrics.json")} == stamps


def test_keep_best_keeps_the_best_evaluations_rows(tiny_lm: str, sst2: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """After the evaluation at step 4 the rows are pushed far off, so the best held-out evaluation is at or before it;
    the kept adapter, on a fresh base, scores what that evaluation recorded."""
    from rankwise_harness import train as train_mod
    from test_keep_best import _fresh_score, _predictions

    holder: dict = {}
    real = train_mod._train

    def spy(run, training, loop, show_progress):  # type: ignore[no-untyped-def]
        holder["model"] = training.raw_model
        return real(run, training, loop, show_progress)

    monkeypatch.setattr(train_mod, "_train", spy)

    def sabotage(step: int, _loss: float) -> None:
        if step == 4:
            with torch.no_grad():
                for name, p in holder["model"].named_parameters():
                    if "token_delta" in name:
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 50.0)

    rows = _ids(tiny_lm)
    cfg = RunConfig(task="sst2", method="lora", model=tiny_lm, data=sst2, output=str(tmp_path / "best"),
                    targets=("q_proj", "v_proj"), r=4, alpha=8, max_steps=8, batch_size=4, lr=5e-2, max_length=48,
                    val_split=0.25, eval_every=2, keep_best=True, trainable_token_indices=rows)
    result = finetune(cfg, hook=sabotage, **QUIET)
    assert result["kept"]["which"] == "best" and result["kept"]["step"] <= 4 < result["steps"]
    out = Path(cfg.output)
    metrics, records = _fresh_score(out, sst2)
    assert metrics == result["best"]["dev"] and _predictions(out) == records
    saved = load_file(str(out / "adapter" / "adapter.safetensors"))
    delta = next(v for k, v in saved.items() if "token" in k)
    assert delta.shape[0] == len(rows) and delta.abs().max() < 10, "the sabotaged rows are not the ones kept"
    assert dataclasses.asdict(RunConfig.from_dict(json.loads((out / "config.json").read_text())["run"])
                              )["trainable_token_indices"] == tuple(rows)
