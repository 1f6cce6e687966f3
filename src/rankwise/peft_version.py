"""Which HF PEFT a PEFT-format file is for: the rules that changed between PEFT 0.21 and 0.22.

A PEFT adapter means different things to different PEFT versions in a few places, and rankwise reads and writes
for both:

* **convolutions** — PEFT 0.21 builds a conv layer's ``lora_A`` without the base's ``dilation`` and
  ``padding_mode``, so there its forward is not its own merge; PEFT 0.22 keeps both (``W0 + ΔW``, as rankwise).
* **modules_to_save** — PEFT 0.21 wraps every module whose name *ends with* an entry as a plain string
  (``"classifier"`` also wraps DistilBERT's ``pre_classifier``); PEFT 0.22 wraps only the module of that name or
  dotted suffix, and its sequence-classification task adds ``pre_classifier`` to the heads it trains.

A file PEFT wrote says which PEFT wrote it (``peft_version`` in ``adapter_config.json``, since PEFT 0.18): import
follows that version's rules (:func:`of_file`); a file without it is read as PEFT 0.21 read it, one whose
``peft_version`` is no version too, and one from a PEFT newer than :data:`NEWEST` by that PEFT's rules, each of the
last two with a warning (:func:`unknown_reason`). An export is read
by the PEFT where it is loaded, which rankwise cannot know: it follows the installed PEFT's rules
(:func:`installed`: the imported ``peft``'s, else the installed distribution's), and where no PEFT is installed it writes only what every supported PEFT reads alike.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from typing import Any

Version = tuple[int, int]
# the first PEFT whose rules are 0.22's (conv lora_A with the base's dilation / padding_mode; modules_to_save by
# full name or dotted suffix; pre_classifier among the SEQ_CLS heads)
PEFT_022: Version = (0, 22)
PEFT_021: Version = (0, 21)  # the rules of a file that does not say which PEFT wrote it (and of every PEFT before 0.22)
NEWEST: Version = PEFT_022  # the newest PEFT whose rules rankwise was checked against; a newer one is read by these


def parse(text: Any) -> Version | None:
    """``"0.22.0"`` / ``"0.21.2.dev0"`` / ``"v0.22.0"`` / ``"1"`` as ``(major, minor)``, as PEFT's own reading of the
    field (``packaging.version.Version``) orders them; ``None`` for anything that is not a version (``"abc"``, ``""``,
    a JSON number)."""
    match = re.fullmatch(r"\s*v?(\d+)(?:\.(\d+))?(?:[.+\-@a-z].*)?\s*", text, re.IGNORECASE) if isinstance(text, str) else None
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def installed_text() -> str | None:
    """The version string of the PEFT this process runs: the imported ``peft`` module's ``__version__`` once it is
    imported (a source checkout on ``sys.path`` may not be the distribution pip installed), else the installed
    distribution's (from its metadata, without importing it); ``None`` when PEFT is absent. An export writes it as
    ``peft_version``, as PEFT's own save does, so that an import reads it by that PEFT's rules."""
    imported = getattr(sys.modules.get("peft"), "__version__", None)
    if isinstance(imported, str):
        return imported
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


def said_by(cfg: dict[str, Any]) -> str:
    """What a PEFT config says of the PEFT that wrote it, as a message's phrase ("says PEFT 0.21 wrote it", "does not
    say ...", "gives peft_version 'abc', which is not a version ..."), naming the rules it is read by."""
    raw = cfg.get("peft_version")
    version = parse(raw)
    if version is not None:
        return f"says PEFT {version[0]}.{version[1]} wrote it"
    if raw is None:
        return "does not say which PEFT wrote it (no peft_version), so it is read as PEFT 0.21's"
    return f"gives peft_version {raw!r}, which is not a PEFT version, so it is read as PEFT 0.21's"


def unknown_reason(cfg: dict[str, Any]) -> str | None:
    """Why a PEFT config's ``peft_version`` cannot be taken at its word: present but not a version (read as PEFT
    0.21's, as a file without it), or newer than :data:`NEWEST` (read by that PEFT's rules, which a newer PEFT may
    have changed, as 0.22 changed 0.21's); ``None`` for a known version or none given."""
    raw = cfg.get("peft_version")
    version = parse(raw)
    if raw is not None and version is None:
        return (f"its peft_version {raw!r} is not a PEFT version (such as '0.22.0'), so it is read by PEFT 0.21's rules, "
                "as a file that does not say which PEFT wrote it; if PEFT 0.22 or newer wrote it, set peft_version to "
                "that version")
    if version is not None and version > NEWEST:
        return (f"it says PEFT {raw} wrote it, newer than any PEFT rankwise was checked against (up to "
                f"{NEWEST[0]}.{NEWEST[1]}), so it is read by PEFT {NEWEST[0]}.{NEWEST[1]}'s rules; if that PEFT changed "
                "what an adapter computes, the import computes something else: check its outputs against that PEFT")
    return None


def at_least(version: Version | None, minimum: Version = PEFT_022) -> bool:
    """Whether ``version`` is known and at least ``minimum`` (an unknown version is taken as the older rules)."""
    return version is not None and version >= minimum
