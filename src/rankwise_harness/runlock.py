"""One live run per folder: a lock file naming its owner, held with the kernel's ``flock``.

``finetune`` and ``compare`` take the lock of their ``--output`` before they delete or write anything
there, and drop it when they end (however they end). The lock file, ``<output>/.rankwise-run.lock``,
holds the owner's PID, host, start time and command line, so a refusal names who owns the folder.

The kernel releases a ``flock`` when its process dies, so a second run can tell a live owner (the lock
is held: refused at once) from a stale file left by a killed one (the lock is free: on this host that
owner is gone, the lock is taken over and the stale owner named). A file written on another host cannot
be checked from here (``flock`` is not shared by every network filesystem): the run is refused with the
command that removes the file once the user knows that run has ended.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import RunError

LOCK_NAME = ".rankwise-run.lock"


@dataclass
class RunLock:
    """A held lock; :meth:`release` removes the file (and the folder, if taking the lock created it and nothing
    else was written there: a run stopped by bad input leaves no trace) and drops the lock (idempotent)."""

    path: Path
    fd: int | None
    created_folder: bool = False

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()
            if self.created_folder:
                self.path.parent.rmdir()  # only if empty
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _owner(fd: int) -> dict[str, Any] | None:
    """The owner recorded in the lock file behind ``fd`` (``None`` when the file is empty or unreadable)."""
    try:
        raw = os.pread(fd, 65536, 0)
        data = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _alive_here(owner: dict[str, Any]) -> bool:
    """Whether ``owner`` could be the process holding the lock: on another host (not checkable), or a live PID here."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except PermissionError:
        return True
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    return True


def _live_owner(fd: int, wait_s: float = 5.0) -> dict[str, Any] | None:
    """The record of the live run holding the lock behind ``fd``. A run writes its record just after it takes the
    lock, so a refusal in that moment reads an empty file or the record of the killed run it is taking over; wait
    (up to ``wait_s``) for the holder's own record rather than name nobody, or a dead PID."""
    deadline = time.monotonic() + wait_s
    while True:
        owner = _owner(fd)
        if owner is not None and _alive_here(owner):
            return owner
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def describe_owner(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "its owner has not written its PID yet"
    return (f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}: "
            f"{str(owner.get('command', ''))[:200]}")


def acquire(folder: Path, say: Callable[[str], None] = print) -> RunLock:
    """Take ``folder``'s lock (creating the folder), or raise :class:`RunError`: at once when a live run holds
    it, naming that run; for a stale file from another host, with the command that removes it. A stale file
    from a dead process on this host is taken over, and its owner named through ``say``."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _live_owner(fd)
            os.close(fd)
            raise RunError(f"--output {folder} is in use by another rankwise run ({describe_owner(owner)}); wait "
                           "for it to end or choose another --output") from None
        if _same_file(fd, path):  # not a file its previous owner removed while we opened it
            break
        os.close(fd)
    lock = RunLock(path, fd, created)
    stale = _owner(fd)
    host = socket.gethostname()
    if stale is not None and stale.get("host") != host:
        lock.fd = None  # leave the other host's file in place
        os.close(fd)
        raise RunError(f"--output {folder} is locked by a run on another host ({describe_owner(stale)}), which "
                       f"cannot be checked from {host}; if that run has ended, remove the lock (rm {path}) and "
                       "run this command again")
    if stale is not None:
        say(f"note: {path} was left by pid {stale.get('pid')} on this host (started {stale.get('started')}), which "
            "no longer holds it (it was killed or crashed); taking the folder over")
    record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return lock


__all__ = ["LOCK_NAME", "RunLock", "acquire", "describe_owner"]
