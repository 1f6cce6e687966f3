"""Which rows a run uses (``--max-train``, ``--max-eval``, ``--val-split``) and choosing the best evaluation.

``--max-train N`` applies first: ``N`` rows drawn at random, label-stratified (each class keeps its share of
the file, by largest remainders), seeded by ``--data-seed`` (default 0), so the same ``N`` and seed give the
same rows on any machine; ``--subset prefix`` takes the file's first ``N`` rows instead (GLUE files are
ordered by source: a prefix is a biased sample, kept only to reproduce older reports). ``--max-eval N`` draws
the dev rows the same way (:func:`sample_rows`, the same seed and ``--subset``). ``--val-split F``
then holds out ``round(F * n)`` of those rows, drawn the same way (stratified, seeded by :data:`VAL_SPLIT_SEED`
plus ``--data-seed``): the split never depends on the run's ``--seed``, so every method, seed and resumed run
sees the same rows. Both parts keep file order. Training never draws a held-out row, and the dev set is never
used to choose anything: the best evaluation is the one with the highest held-out headline metric; dev is
only reported beside it.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

VAL_SPLIT_SEED = 20_261_201  # fixed: the split never depends on the run's seed
SUBSETS = ("stratified", "prefix")

T = TypeVar("T")


def stratum(row: Any) -> Hashable:
    """The class a row is stratified by: its integer label; ``None`` (one stratum) for scores and generation."""
    label = getattr(row, "label", None)
    return label if isinstance(label, int) and not isinstance(label, bool) else None


def stratified_indices(keys: Sequence[Hashable], k: int, seed: int) -> list[int]:
    """``k`` of ``range(len(keys))`` drawn without replacement, each stratum keeping its share, sorted.

    Stratum ``c`` with ``n_c`` of the ``n`` rows gets ``floor(k * n_c / n)`` rows, and the ``k`` left over go
    one each to the strata with the largest remainders (ties: the stratum met first in the file); the rows of
    each stratum are drawn by ``random.Random(seed)``, strata in first-met order: the result depends only on
    ``keys``, ``k`` and ``seed``.
    """
    n = len(keys)
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} of {n} rows")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    quota = {c: k * len(ix) // n for c, ix in groups.items()}
    order = sorted(groups, key=lambda c: -((k * len(groups[c])) % n))  # stable: file order breaks ties
    for c in order[: k - sum(quota.values())]:
        quota[c] += 1
    rng = random.Random(seed)
    return sorted(i for c, ix in groups.items() for i in rng.sample(ix, quota[c]))


def sample_indices(rows: Sequence[Any], n: int | None, seed: int, subset: str = "stratified") -> list[int]:
    """``--max-train`` and ``--max-eval``: the positions of the rows used, in file order: all when ``n`` is
    ``None`` or covers them; else ``n``, stratified and seeded (:func:`stratified_indices`), or the first ``n``
    with ``subset="prefix"``."""
    if subset not in SUBSETS:
        raise ValueError(f"--subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    if n is None or n >= len(rows):
        return list(range(len(rows)))
    if subset == "prefix":
        return list(range(n))
    return stratified_indices([stratum(r) for r in rows], n, seed)


def sample_rows(rows: list[T], n: int | None, seed: int, subset: str = "stratified") -> list[T]:
    """The rows at :func:`sample_indices`, in file order."""
    return [rows[i] for i in sample_indices(rows, n, seed, subset)]


def split_validation(rows: list[T], fraction: float, data_seed: int = 0) -> tuple[list[T], list[T], list[int]]:
    """``(train, val, val_indices)``: ``round(fraction * len(rows))`` rows held out, label-stratified and seeded
    by ``VAL_SPLIT_SEED + data_seed`` (never the run's seed), both parts in file order.

    Raises ``ValueError`` when either part would be empty.
    """
    n = len(rows)
    k = int(round(fraction * n))
    if k < 1 or k >= n:
        raise ValueError(f"--val-split {fraction} of {n} training rows leaves {k} held-out and {n - k} training rows; "
                         "both need at least one")
    held = stratified_indices([stratum(r) for r in rows], k, VAL_SPLIT_SEED + data_seed)
    held_set = set(held)
    return [r for i, r in enumerate(rows) if i not in held_set], [rows[i] for i in held], held


def dev_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """An ``eval_history`` entry's dev metrics (what is not its step, epoch or held-out metrics)."""
    return {k: v for k, v in entry.items() if k not in ("step", "epoch", "val")}


def _summary(entry: dict[str, Any], headline: str) -> dict[str, Any]:
    return {"step": entry.get("step"), "epoch": entry.get("epoch"), "val": entry.get("val"), "dev": dev_metrics(entry),
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
