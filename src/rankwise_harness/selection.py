"""Held-out training data (``--val-split``) and choosing the best evaluation on it.

``--max-train N`` applies first (the first ``N`` training rows); ``--val-split F`` then holds out
``round(F * N)`` of those rows, picked by a shuffle with a fixed seed (:data:`VAL_SPLIT_SEED`), so
every method, seed and resumed run sees the same split. Training never draws a held-out row, and the
dev set is never used to choose anything: the best evaluation is the one with the highest held-out
headline metric; dev is only reported beside it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

VAL_SPLIT_SEED = 20_261_201  # fixed: the split never depends on the run's seed

T = TypeVar("T")


def split_validation(rows: list[T], fraction: float) -> tuple[list[T], list[T], list[int]]:
    """``(train, val, val_indices)``: ``round(fraction * len(rows))`` rows held out, both parts in file order.

    Raises ``ValueError`` when either part would be empty.
    """
    n = len(rows)
    k = int(round(fraction * n))
    if k < 1 or k >= n:
        raise ValueError(f"--val-split {fraction} of {n} training rows leaves {k} held-out and {n - k} training rows; "
                         "both need at least one")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).tolist()
    held = sorted(perm[:k])
    held_set = set(held)
    return [r for i, r in enumerate(rows) if i not in held_set], [rows[i] for i in held], held


def _summary(entry: dict[str, Any], headline: str) -> dict[str, Any]:
    dev = {k: v for k, v in entry.items() if k not in ("step", "epoch", "val")}
    return {"step": entry.get("step"), "epoch": entry.get("epoch"), "val": entry.get("val"), "dev": dev,
            "headline_metric": headline}


def _held_out(evals: list[dict[str, Any]], headline: str) -> tuple[list[dict[str, Any]], int | None]:
    """The evaluations with a held-out ``headline``, and the index among them of the best (the earliest
    maximum; ``None`` when there is none). One rule for the reported best and for ``--patience``."""
    scored = [e for e in evals if isinstance(e.get("val"), dict) and headline in e["val"]]
    if not scored:
        return scored, None
    return scored, max(range(len(scored)), key=lambda i: (scored[i]["val"][headline], -i))


def best_and_last(evals: list[dict[str, Any]], headline: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The evaluation with the highest held-out ``headline`` (the earliest on ties), and the last one.

    ``best`` is ``None`` without held-out metrics: it is never chosen on dev.
    """
    last = _summary(evals[-1], headline) if evals else None
    scored, best = _held_out(evals, headline)
    return (None if best is None else _summary(scored[best], headline)), last


def evals_since_best(evals: list[dict[str, Any]], headline: str) -> int:
    """How many held-out evaluations came after the best one (0 when the latest is the best or there is none)."""
    scored, best = _held_out(evals, headline)
    return 0 if best is None else len(scored) - 1 - best
