"""Integrations with training frameworks (each imports its framework lazily).

``rankwise.integrations.hf`` is imported on first attribute access, so the dotted path works after ``import rankwise``.
"""

from typing import Any

_MODULES = ("hf",)


def __getattr__(name: str) -> Any:
    """PEP 562: the integration modules in ``_MODULES`` on first attribute access."""
    if name in _MODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """PEP 562: the module's names and the integration modules it imports on first use."""
    return sorted({*globals(), *_MODULES})
