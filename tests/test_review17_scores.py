"""Review round 17 (docs/reliability.md, "from outputs to reported numbers"): model outputs to reported numbers.

GSM8K: a generation is scored on its answer to the question asked, and it is generated under torchrun too. The
references here are parsed independently of the code under test (the GSM8K format: a worked answer ends with one
``#### <number>``), from the real test file when ``../shared/data`` is present, else from rows written in its
format. ``compare``'s spread is checked against a hand-computed sample standard deviation.
"""

from __future__ import annotations

import contextlib
import json
import os
from decimal import Decimal
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from rankwise_harness.config import RunConfig
from rankwise_harness.data import Example, get_task
from rankwise_harness.metrics import extract_final_number
from rankwise_harness.tasktypes import task_type_for
from test_label_words import tiny_lm  # noqa: F401, F811  (module fixture: a tiny Llama and its tokenizer)

GSM8K = Path(os.environ.get("RANKWISE_SHARED_DATA", SHARED_DATA)) / "gsm8k"
BUILT = [  # rows in the GSM8K format, used when the real file is absent
    {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all: 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "Weng earns $12 an hour. Yesterday she did 50 minutes of babysitting. How much did she earn?",
     "answer": "She earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n50 minutes: 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty needs $100 and has half of it. Her parents give $15, her grandparents twice that. "
                 "How much more does she need?",
     "answer": "She has 100 / 2 = $<<100/2=50>>50.\nGrandparents: 15 * 2 = $<<15*2=30>>30.\n"
               "She needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"},
]


def gsm8k_rows(n: int) -> list[dict[str, str]]:
    """The first ``n`` problems of the real GSM8K test file, else the built rows."""
    path = GSM8K / "test.jsonl"
    if not path.is_file():
        return BUILT[:n]
    with path.open(encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def reference_number(answer: str) -> Decimal:
    """A worked answer's final number, by the format alone: the text after its one ``####``, commas dropped."""
    assert answer.count("####") == 1
    return Decimal(answer.split("####")[1].strip().replace(",", ""))


def _generation(tmp_path: Path):
    task = get_task("gsm8k")
    return task_type_for(task, "unused", RunConfig(task="gsm8k", model="unused", output=str(tmp_path / "run")))


def test_a_generation_is_scored_on_its_answer_not_on_a_problem_it_goes_on_to_write(tmp_path: Path) -> None:
    """An output that answers its question, then writes another problem and its worked answer (the prompt's
    ``Question: ...\\nAnswer: `` format: what a model that has not learnt to stop generates): the score and the
    record read the first answer. Before: the last ``####`` (the other problem's answer) was read, so each such
    output scored as wrong, and one that answered wrong and then wrote its own question with the right worked
    answer scored as right."""
    rows = gsm8k_rows(3)
    (a, b, c) = rows
    assert len({reference_number(r["answer"]) for r in rows}) == 3  # three different answers
    gen = _generation(tmp_path)

    def goes_on(first: str, then: dict[str, str]) -> str:
        return f"{first}\n\nQuestion: {then['question']}\nAnswer: {then['answer']}"

    wrong = f"#### {reference_number(a['answer']) + 1}"  # a's answer, off by one
    outputs = [goes_on(a["answer"], b),   # right, then b
               goes_on(b["answer"], c),   # right, then c
               goes_on(wrong, a),         # wrong, then a's own question with its right worked answer
               f"So the answer is {reference_number(c['answer'])}.\nQuestion: {a['question']}"]  # no ####, right
    dev = [Example(r["question"], target=r["answer"]) for r in (a, b, a, c)]
    records: list[dict] = []
    metrics = gen.score(list(enumerate(dev)), outputs, records)
    want = [True, True, False, True]
    assert metrics == {"exact_match": pytest.approx(sum(want) / len(want))}
    assert [r["correct"] for r in records] == want
    assert [Decimal(r["reference"]) for r in records] == [reference_number(e.target or "") for e in dev]
    assert [Decimal(r["answer"]) for r in records] == [
        reference_number(a["answer"]), reference_number(b["answer"]), reference_number(a["answer"]) + 1,
        reference_number(c["answer"])]
    assert [r["output"] for r in records] == outputs  # the record keeps the whole generated text


def test_an_answer_that_stops_is_read_as_before(tmp_path: Path) -> None:
    """Outputs that end after their answer (a trained model's: the end token follows ``#### N``) score as they did:
    the worked reference itself is right, a different final number wrong, a text without ``####`` by its last
    number."""
    rows = gsm8k_rows(2)
    gen = _generation(tmp_path)
    (a, b) = rows
    outputs = [a["answer"], b["answer"].replace("####", "#### 1"), f"It is {reference_number(a['answer'])}."]
    dev = [Example(r["question"], target=r["answer"]) for r in (a, b, a)]
    records: list[dict] = []
    assert gen.score(list(enumerate(dev)), outputs, records) == {"exact_match": pytest.approx(2 / 3)}
    assert [r["correct"] for r in records] == [True, False, True]


def test_every_real_gsm8k_reference_gives_its_final_number() -> None:
    """Every worked answer of the real train and test files (one ``####`` each, no ``Question:``) gives the number
    after its ``####``, as the format defines it."""
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip("../shared/data/gsm8k is absent")
    for name in ("train.jsonl", "test.jsonl"):
        with (GSM8K / name).open(encoding="utf-8") as fh:
            answers = [json.loads(line)["answer"] for line in fh if line.strip()]
        assert answers and all("Question:" not in t for t in answers)
        assert [extract_final_number(t) for t in answers] == [reference_number(t) for t in answers]


def test_gsm8k_generates_under_ddp_as_the_model_alone(tmp_path: Path, tiny_lm: str) -> None:
    """Under torchrun the evaluated model is Accelerate's DDP wrapper, which has no ``generate``: every gsm8k run of
    two processes stopped at its final evaluation (AttributeError). Now the wrapped causal LM generates: the same
    texts as the model alone (a one-process gloo group here; two processes by torchrun: the review's run)."""
    import torch
    import torch.distributed as dist

    gen = task_type_for(get_task("gsm8k"), tiny_lm,
                        RunConfig(task="gsm8k", model=tiny_lm, output=str(tmp_path / "run"), max_new_tokens=6))
    model = gen.load(torch.device("cpu"), lambda _m: None).eval()
    rows = [Example(r["question"], target=r["answer"]) for r in gsm8k_rows(3)]
    alone = gen.predict(model, rows, torch.device("cpu"), contextlib.nullcontext)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = gen.predict(torch.nn.parallel.DistributedDataParallel(model), rows, torch.device("cpu"),
                              contextlib.nullcontext)
    finally:
        dist.destroy_process_group()
    assert wrapped == alone and len(alone) == len(rows)


def test_compare_says_its_spread_is_the_sample_standard_deviation(tmp_path: Path) -> None:
    """``compare.md``'s ± is the sample standard deviation (n − 1), computed here by hand, and the note says so
    (it said "the standard deviation", which a reader may take for the population's)."""
    from rankwise_harness.compare import aggregate, write_tables

    accs = [0.80, 0.84, 0.71]
    runs = [{"method": "lora", "seed": s, "headline_metric": "accuracy", "metrics": {"accuracy": a},
             "trainable_params": 10, "step_seconds": 0.1, "init_seconds": 0.0, "peak_memory_mb": 1.0}
            for s, a in enumerate(accs)]
    write_tables(aggregate(runs), tmp_path)
    mean = sum(accs) / 3
    sample_sd = (sum((a - mean) ** 2 for a in accs) / (3 - 1)) ** 0.5
    text = (tmp_path / "compare.md").read_text()
    assert f"| lora | {mean:.4f} ± {sample_sd:.4f} |" in text
    assert "sample standard deviation over seeds (n − 1" in text
