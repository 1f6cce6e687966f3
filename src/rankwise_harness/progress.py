"""Progress: a tqdm bar on a terminal, plain periodic lines anywhere else (CI, ``nohup``, ``> log``), for
training (:class:`Progress`) and for the other phases that take more than a few seconds (:class:`PhaseProgress`:
calibration batches, dev evaluation).

Off a terminal a bar would write one ``\\r``-separated frame per step, so a log becomes one very long line.
:class:`Progress` prints instead one line every ``every_steps`` steps or ``every_seconds`` seconds
(whichever comes first), and at the last step: step, loss, mean of the last 10 losses, examples/s, ETA.

``sparse`` (``--no-progress``: the benchmark drivers' runs, whose output goes to a log) draws no bar and prints a
plain line only once :data:`SPARSE_SECONDS` have passed since the last, and a closing one if any was printed: a
phase of minutes or hours (GoRA's calibration, a long run) still shows it is working, a short one stays silent.
``enabled=False`` prints nothing at all (the other processes of a distributed run).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


SPARSE_SECONDS = 300.0  # with sparse progress (--no-progress), a line at most this often


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``update(loss, avg10, ex_per_s)`` once per optimizer step; ``write(msg)`` for other lines; ``close()``.

    Args:
        total: the run's optimizer steps; initial: steps already done (a resumed run).
        desc: a label such as ``lora/sst2``; enabled: ``False`` prints nothing at all.
        stream: the bar's stream (default ``sys.stderr``); a bar only if it is a TTY.
        out: where plain lines and :meth:`write` go without a bar (default ``sys.stdout``).
        every_steps: off a TTY, a line every this many steps (default: a twentieth of the run, at least 1).
        every_seconds: off a TTY, also a line when this long has passed since the last one.
        sparse: no bar and no per-step cadence: a line every :data:`SPARSE_SECONDS`, and at the last step if any
            was printed (``--no-progress``).
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True,
                 stream: TextIO | None = None, out: TextIO | None = None, every_steps: int | None = None,
                 every_seconds: float = 60.0, sparse: bool = False) -> None:
        self.total, self.step, self.desc, self.enabled, self.sparse = total, initial, desc, enabled, sparse
        self.stream = stream if stream is not None else sys.stderr
        self.out = out
        self.every_steps = total + 1 if sparse else every_steps or max(1, total // 20)
        self.every_seconds = max(every_seconds, SPARSE_SECONDS) if sparse else every_seconds
        self._initial = initial
        self._t0 = self._last = time.perf_counter()
        self._printed = False
        self._bar: Any = None
        isatty = getattr(self.stream, "isatty", None)
        if enabled and not sparse and callable(isatty) and isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=self.stream, dynamic_ncols=True)

    def update(self, loss: float, avg10: float, ex_per_s: float) -> None:
        """One optimizer step done, with its loss, the mean of the last 10 and the throughput so far."""
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", avg10=f"{avg10:.4f}", ex_per_s=f"{ex_per_s:.1f}")
            return
        if not self.enabled:
            return
        now = time.perf_counter()
        last = self.step == self.total and (self._printed or not self.sparse)
        if not (self.step % self.every_steps == 0 or now - self._last >= self.every_seconds or last):
            return
        self._last, self._printed = now, True
        rate = (now - self._t0) / max(self.step - self._initial, 1)
        eta = _clock(rate * (self.total - self.step))
        self.write(f"{self.desc} step {self.step}/{self.total}  loss {loss:.4f}  avg10 {avg10:.4f}  "
                   f"{ex_per_s:.1f} ex/s  ETA {eta}")

    def write(self, msg: str) -> None:
        """A line of its own, shown even when progress is disabled (through the bar on a terminal, so the
        bar stays intact)."""
        out = self.out if self.out is not None else sys.stdout
        if self._bar is not None:
            self._bar.write(msg, file=out)
        else:
            print(msg, file=out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class PhaseProgress:
    """Progress of a phase other than training (calibration batches, dev evaluation): ``advance()`` per item.

    On a terminal a tqdm bar; off one (CI, ``> log``) a plain line ``desc: k/n, elapsed, ETA`` once
    ``every_seconds`` have passed since the phase began or since the last line, and a closing line if any
    was printed, so a phase of a few seconds stays silent in logs and tests; ``sparse``: no bar, and those lines
    every :data:`SPARSE_SECONDS` (``--no-progress``).
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, stream: TextIO | None = None,
                 out: TextIO | None = None, every_seconds: float = 10.0, sparse: bool = False) -> None:
        self.total, self.desc, self.enabled, self.done = total, desc, enabled, 0
        self.stream = stream if stream is not None else sys.stderr
        self.out, self.every_seconds = out, max(every_seconds, SPARSE_SECONDS) if sparse else every_seconds
        self._t0 = self._last = time.perf_counter()
        self._printed: int | None = None  # the count the last line showed (None: no line yet)
        self._bar: Any = None
        isatty = getattr(self.stream, "isatty", None)
        if enabled and not sparse and callable(isatty) and isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, leave=False)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every_seconds:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self._printed = self.done  # how far the last line said
        elapsed = now - self._t0
        eta = elapsed / max(self.done, 1) * (self.total - self.done)
        print(f"{self.desc}: {self.done}/{self.total}, {_clock(elapsed)} elapsed, ETA {_clock(eta)}",
              file=self.out if self.out is not None else sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._printed is not None and self._printed != self.done:  # a closing line, unless the last said it
            self._line(time.perf_counter())


class TrackedBatches(list):  # type: ignore[type-arg]
    """A list of batches whose every pass shows a :class:`PhaseProgress` (its length and indexing are the list's,
    so a consumer that checks ``len`` first, as GoRA's calibration does, sees no difference)."""

    def __init__(self, items: Iterable[Any], desc: str, enabled: bool = True, **kwargs: Any) -> None:
        super().__init__(items)
        self.desc, self.enabled, self.kwargs = desc, enabled, kwargs

    def __iter__(self) -> Iterator[Any]:
        """Each item counts as done when the next is asked for, or when the consumer stops after it (a consumer that
        takes exactly ``len`` items never asks again: its last item still counts)."""
        bar = PhaseProgress(len(self), self.desc, self.enabled, **self.kwargs)
        handed = 0
        try:
            for item in super().__iter__():
                if handed:
                    bar.advance()
                handed += 1
                yield item
        finally:
            bar.advance(handed - bar.done)
            bar.close()
