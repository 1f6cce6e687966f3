"""GLUE and GSM8K metrics in plain numpy (no scikit-learn or scipy at run time)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import numpy as np

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def accuracy(pred: Sequence[float], gold: Sequence[float]) -> float:
    p, g = np.asarray(pred), np.asarray(gold)
    return float((p == g).mean()) if len(g) else 0.0


def f1(pred: Sequence[float], gold: Sequence[float], positive: int = 1) -> float:
    """Binary F1 of class ``positive``: ``2·TP / (2·TP + FP + FN)`` (0 when undefined)."""
    p, g = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp = float(np.sum(p & g))
    denom = 2 * tp + float(np.sum(p & ~g)) + float(np.sum(~p & g))
    return 2 * tp / denom if denom else 0.0


def matthews(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Matthews correlation, multiclass form (Gorodkin 2004); equals the binary ``(TP·TN − FP·FN)/√(...)``.

    ``MCC = (c·s − Σ_k p_k t_k) / √((s² − Σ p_k²)(s² − Σ t_k²))`` with ``c`` correct, ``s`` total,
    ``p_k``/``t_k`` predicted/true counts of class ``k``; 0 when a denominator term is 0.
    """
    p, g = np.asarray(pred), np.asarray(gold)
    classes = np.union1d(p, g)
    pk = np.array([np.sum(p == k) for k in classes], dtype=np.float64)
    tk = np.array([np.sum(g == k) for k in classes], dtype=np.float64)
    c, s = float(np.sum(p == g)), float(len(g))
    denom = np.sqrt((s * s - pk @ pk) * (s * s - tk @ tk))
    return float((c * s - pk @ tk) / denom) if denom else 0.0


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom else 0.0


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as ``scipy.stats.rankdata``)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(a))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the (tie-averaged) ranks."""
    return pearson(rankdata(x), rankdata(y))


def extract_final_number(text: str) -> Decimal | None:
    """The final answer in a GSM8K-style text: the first number after its **first** ``####`` when it has one (a
    worked answer has exactly one, closing it: whatever a model writes after that line is no longer its answer),
    else the last number in the text. Commas, ``$`` and a trailing ``.`` are ignored; ``None`` if there is none."""
    _, mark, tail = text.partition("####")
    found = _NUMBER.findall(tail if mark else text)
    if not found:
        return None
    raw = (found[0] if mark else found[-1]).replace(",", "").replace("$", "")
    try:
        return Decimal(raw).normalize()
    except InvalidOperation:
        return None


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions whose final number equals the reference's (``#### <number>``)."""
    hits = [
        (p := extract_final_number(pred)) is not None and p == extract_final_number(ref)
        for pred, ref in zip(predictions, references)
    ]
    return float(np.mean(hits)) if hits else 0.0


def compute(names: Sequence[str], pred: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """The named metrics for classification / regression predictions."""
    fns = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}
    return {name: fns[name](pred, gold) for name in names}


def majority_class(names: Sequence[str], train_labels: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """The named metrics of always predicting the most frequent training label (the lowest index on a tie):
    the score a classifier must beat to have learnt anything (accuracy = that class's share, Matthews 0)."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64))
    return compute(names, [int(counts.argmax())] * len(gold), gold)
