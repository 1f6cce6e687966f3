"""A multi-process run that one process leaves alone (a Ctrl-C, a SIGINT sent to it, in a training step).

Such a process does not reach the others' next collective: they wait in it until its connections close (its
process ends) or the collective times out (30 min for gloo by default). So the command line, once such a process
has cleaned up (lock released, nothing half-written), :func:`leave_alone`: it notes why in the process group's
store and ends the process, and every other process's collective fails at once (gloo: "Connection closed by
peer"). ``finetune`` turns that failure into :class:`~.checkpoint.RunInterrupted` with :func:`who_left`'s text,
naming the process and why (read back from the store), and the checkpoint kept.

Only the failure path touches the store: a run that nobody leaves makes no extra collective or store call.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Any

from rankwise.distributed import process_group

NOTE = "rankwise/left/"  # + the process index: why that process left the run alone
STORE_WAIT = datetime.timedelta(seconds=5)  # at most, per store call on the failure path
# what gloo says when a peer's connection closes, or the peer never comes (its process lives on)
LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting")


def _store(dist: Any) -> Any:
    """The default process group's key-value store, waiting :data:`STORE_WAIT` at most (``None`` if unreachable)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(STORE_WAIT)
        return store
    except Exception:  # noqa: BLE001 (the note is a courtesy: the run's own message does not depend on it)
        return None


def leave_alone(why: str, code: int) -> None:
    """This process stops a multi-process run alone (its own Ctrl-C, not told to the others): note ``why`` in the
    store under its index, flush stdout and stderr, and end the process now with exit status ``code``, so the
    others' collectives fail at once (their connections to it close) rather than after this process's interpreter
    teardown or, if it lingers, at the collective's timeout. Ending its process group is not enough: under DDP the
    group lives on (its connections open) until the process ends. Call it on the way out only, once everything is
    cleaned up (lock released, files whole). Returns (doing nothing) without a process group of several processes."""
    dist = process_group()
    if dist is None or dist.get_world_size() < 2:
        return
    store = _store(dist)
    if store is not None:
        with contextlib.suppress(Exception):  # as in _store
            store.set(f"{NOTE}{dist.get_rank()}", why)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def who_left(exc: BaseException) -> str | None:
    """When ``exc`` is a collective broken by another process's leaving (``torch.distributed.DistError``, or gloo's
    closed connection / timeout), which process left and why, as the notes in the store say (else: the collective's
    error); ``None`` for any other error or without a process group of several processes."""
    dist = process_group()
    if dist is None or dist.get_world_size() < 2:
        return None
    if not (isinstance(exc, dist.DistError) or any(s in str(exc) for s in LOST)):
        return None
    notes = _notes(dist)
    if notes:
        return "; ".join(f"process {i} {text}" for i, text in notes.items())
    said = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return f"a collective with the other processes failed ({said}): one of them left the run or stopped answering"


def _notes(dist: Any) -> dict[int, str]:
    """The other processes' :func:`leave_alone` notes, by process index (none if the store cannot be read)."""
    store = _store(dist)
    out: dict[int, str] = {}
    with contextlib.suppress(Exception):  # as in _store
        for i in range(dist.get_world_size() if store is not None else 0):
            key = f"{NOTE}{i}"
            if i != dist.get_rank() and store.check([key]):
                out[i] = store.get(key).decode(errors="replace")[:300]
    return out
