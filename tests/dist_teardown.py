"""How the multi-process test workers (torchrun scripts and ``torch.multiprocessing.spawn`` targets) start and end
their gloo process group, one home for all of them.

Not a test module (no ``test_`` prefix). CI once saw a rank SIGABRT at exit ("terminate called without an active
exception") after its work was done and written. The risks, each closed here: a rank destroying the group while a
peer is still inside a collective (:func:`leave` waits for every rank first), a model whose hooks or DDP reducer
hold the group freed by a garbage collection after the group is gone (collected before), a collective timing out on
a loaded 2-core CI machine (:data:`TIMEOUT`), and the interpreter's finalisation of gloo's C++ threads, which is
torch's and not what the tests check (left out: ``os._exit`` once everything is written and flushed).
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import sys

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=180)  # one collective's wait: under the launching tests' 240-600 s


def join(rank: int | None = None, world: int | None = None, init_file: str | None = None,
         timeout_s: float | None = None) -> None:
    """Start the gloo group: from torchrun's environment, or (a spawned process) ``rank`` of ``world`` through
    ``init_file``; one CPU thread, and every thread's Python stack printed if the process aborts in C++.
    ``timeout_s``: one collective's wait (default :data:`TIMEOUT`; shorter where a test checks that none waits)."""
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    timeout = TIMEOUT if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    if init_file is None:
        dist.init_process_group("gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)


def leave() -> None:
    """End a worker that did all its work: free what holds the group, wait for every rank, destroy the group,
    flush, and exit 0 without the interpreter's finalisation. Call it last, on every rank, on the success path only
    (an exception must still reach the launcher)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
