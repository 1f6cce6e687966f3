"""Which HF PEFT a PEFT-format file is for: the rules that changed between PEFT 0.21 and 0.22.

A PEFT adapter means different things to different PEFT versions in a few places, and rankwise reads and writes
for both:

* **convolutions** — PEFT 0.21 builds a conv layer's ``lora_A`` without the base's ``dilation`` and
  ``padding_mode``, so there its forward is not its own merge; PEFT 0.22 keeps both (``W0 + ΔW``, as rankwise).
* **modules_to_save** — PEFT 0.21 wraps every module whose name *ends with* an entry as a plain string
  (``"classifier"`` also wraps DistilBERT's ``pre_classifier``); PEFT 0.22 wraps only the module of that name or
  dotted suffix, and its sequence-classification task adds ``pre_classifier`` to the heads it trains.

A file PEFT wrote says which PEFT wrote it (``peft_version`` in ``adapter_config.json``, since PEFT 0.18): import
follows that version's rules (:func:`of_file`); a file without it is read as PEFT 0.21 read it. An export is read
by the PEFT where it is loaded, which rankwise cannot know: it follows the installed PEFT's rules
(:func:`installed`), and where no PEFT is installed it writes only what every supported PEFT reads alike.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

Version = tuple[int, int]
# the first PEFT whose rules are 0.22's (conv lora_A with the base's dilation / padding_mode; modules_to_save by
# full name or dotted suffix; pre_classifier among the SEQ_CLS heads)
PEFT_022: Version = (0, 22)
PEFT_021: Version = (0, 21)  # the rules of a file that does not say which PEFT wrote it (and of every PEFT before 0.22)


def parse(text: Any) -> Version | None:
    """``"0.22.0"`` / ``"0.21.2.dev0"`` as ``(major, minor)``; ``None`` for anything that is not a version."""
    match = re.match(r"\s*(\d+)\.(\d+)", text) if isinstance(text, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def installed_text() -> str | None:
    """The installed PEFT's version string (from its metadata, without importing it); ``None`` when PEFT is absent.
    An export writes it as ``peft_version``, as PEFT's own save does, so that an import reads it by that PEFT's rules."""
    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return None


def installed() -> Version | None:
    """The installed PEFT's ``(major, minor)``; ``None`` when PEFT is absent."""
    return parse(installed_text())


def of_file(cfg: dict[str, Any]) -> Version | None:
    """The PEFT version that wrote a PEFT config (its ``peft_version`` field); ``None`` when it does not say."""
    return parse(cfg.get("peft_version"))


def at_least(version: Version | None, minimum: Version = PEFT_022) -> bool:
    """Whether ``version`` is known and at least ``minimum`` (an unknown version is taken as the older rules)."""
    return version is not None and version >= minimum
