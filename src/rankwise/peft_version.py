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
``peft_version`` is no version too, one from a PEFT newer than :data:`NEWEST` by that PEFT's rules, and one from a
build between releases (a dev build of PEFT's main branch, a release candidate: :func:`between_releases`) by the rules
of the release before it, each of the last three with a warning (:func:`unknown_reason`). An export is read
by the PEFT where it is loaded, which rankwise cannot know: it follows the installed PEFT's rules
(:func:`installed`: the imported ``peft``'s, else the installed distribution's, read as a file's ``peft_version`` is,
with the same warning, :func:`installed_reason`), and where no PEFT is installed it writes only what every supported
PEFT reads alike.
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
# the first version a build between releases may carry 0.22's changes under: PEFT's main branch after 0.21.0 is
# 0.21.1.devN and took 0.22's changes under it (its MultiheadAttention fix: PEFT 0.22's own rule, tuners/lora/model.py)
FIRST_UNSURE: tuple[int, int, int] = (0, 21, 1)
# PEP 440's segments after the release numbers: a pre-release (aN, bN, rcN), a post-release, a dev release; then a
# local version (+...) and PEFT's own "@<commit>" of a dev build (its PeftConfigMixin._get_peft_version)
_TAIL = re.compile(r"(?:[-_.]?(?P<pre>a|b|c|rc|alpha|beta|pre|preview)[-_.]?\d*)?"
                   r"(?P<post>-\d+|[-_.]?(?:post|rev|r)[-_.]?\d*)?(?:[-_.]?(?P<dev>dev)[-_.]?\d*)?(?:\+[a-z0-9._]*)?(?:@.*)?",
                   re.IGNORECASE)


def parse(text: Any) -> Version | None:
    """``"0.22.0"`` / ``"0.21.2.dev0"`` / ``"v0.22.0"`` / ``"1"`` as ``(major, minor)``, as PEFT's own reading of the
    field (``packaging.version.Version``) orders them; ``None`` for anything that is not a version (``"abc"``, ``""``,
    a JSON number)."""
    match = re.fullmatch(r"\s*v?(\d+)(?:\.(\d+))?(?:[.+\-@a-z].*)?\s*", text, re.IGNORECASE) if isinstance(text, str) else None
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def _release(text: str) -> tuple[tuple[int, int, int], bool, bool]:
    """``(major, minor, patch), between releases, after the release`` of a version string :func:`parse` reads:
    ``"0.22.0rc1"`` is ``((0, 22, 0), True, False)``, ``"0.21.2"`` ``((0, 21, 2), False, False)``,
    ``"0.22.0.post1.dev0"`` ``((0, 22, 0), True, True)``; a tail that is no PEP 440 segment counts as a release."""
    match = re.fullmatch(r"\s*v?(\d+(?:\.\d+)*)(.*?)\s*", text, re.IGNORECASE)
    assert match is not None  # parse read it
    numbers = [int(n) for n in match.group(1).split(".")] + [0, 0]
    tail = _TAIL.fullmatch(match.group(2))
    between = tail is not None and bool(tail.group("pre") or tail.group("dev"))
    return (numbers[0], numbers[1], numbers[2]), between, tail is not None and bool(tail.group("post"))


def between_releases(text: Any) -> bool:
    """Whether ``text`` is a version of a PEFT build between releases that may carry changes of a release after
    0.21 (``"0.21.1.dev0"``, ``"0.22.0.dev0@<commit>"``, ``"0.22.0rc1"``, ``"0.22.1.dev0"``): a dev build of PEFT's main
    branch or a release candidate from :data:`FIRST_UNSURE` on. Which of the next release's changes it has is not
    in the string; rankwise reads it by :func:`rules`."""
    if parse(text) is None:
        return False
    numbers, between, _ = _release(text)
    return between and numbers >= FIRST_UNSURE


def rules(text: Any) -> Version | None:
    """The ``(major, minor)`` whose rules a PEFT version string is read by: a release's own; a build between releases
    (:func:`between_releases`) the release's before it (``"0.22.0rc1"`` and ``"0.21.1.dev0"``: 0.21; ``"0.22.1.dev0"``:
    0.22), since the changes of the next one it may lack (an ``X.0.0`` pre-release, whose release before it the string
    does not give, its own); ``None`` for what is no version."""
    version = parse(text)
    if version is None or not between_releases(text):
        return version
    (_, _, patch), _, post = _release(text)
    return version if patch > 0 or post or version[1] == 0 else (version[0], version[1] - 1)


def rules_named(version: Version | None) -> str:
    """The PEFT release whose rules ``version`` (:func:`rules`; ``None``: a file that does not say) is read by, as
    ``"0.21"``: at most :data:`NEWEST`, whose rules a newer PEFT's are read by, and at least 0.21, whose rules every
    older PEFT's are."""
    major, minor = min(max(version or PEFT_021, PEFT_021), NEWEST)
    return f"{major}.{minor}"


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
    """The ``(major, minor)`` whose rules an export is written by: the installed PEFT's (:func:`rules`: a build between
    releases the release's before it); ``None`` when PEFT is absent."""
    return rules(installed_text())


def installed_said() -> str:
    """The installed PEFT, as a message's phrase: "the installed PEFT is 0.21.2", "no PEFT is installed", and for a
    build between releases the rules it is read by."""
    text = installed_text()
    if text is None:
        return "no PEFT is installed"
    said = f"the installed PEFT is {text}"
    return said + (f", a build between releases read as PEFT {rules_named(installed())}'s" if between_releases(text) else "")


def installed_reason() -> str | None:
    """Why the rules an export is written by may not be the installed PEFT's own (:func:`installed_text`): a PEFT
    newer than :data:`NEWEST` (written by that PEFT's rules) or a build between releases (by the rules of the release
    before it, :func:`rules`); ``None`` for a release rankwise was checked against, or no PEFT."""
    text = installed_text()
    version = installed()
    if text is None or version is None:
        return None
    if between_releases(text):
        return (f"the installed PEFT {text} is a build between releases (a dev build of PEFT's main branch or a release "
                "candidate), which may carry some of the next release's changes, so the file is written by PEFT "
                f"{rules_named(version)}'s rules, those of the release before it; check that PEFT {text} loads it with "
                "rankwise's outputs, or export with a PEFT release installed")
    if version > NEWEST:
        return (f"the installed PEFT {text} is newer than any PEFT rankwise was checked against (up to "
                f"{rules_named(NEWEST)}), so the file is written by PEFT {rules_named(NEWEST)}'s rules; if PEFT {text} "
                "changed what an adapter computes, it loads something else: check its outputs against rankwise's")
    return None


def of_file(cfg: dict[str, Any]) -> Version | None:
    """The ``(major, minor)`` whose rules a PEFT config is read by (:func:`rules` of its ``peft_version`` field: the
    PEFT that wrote it, or the release before a build between releases); ``None`` when it does not say."""
    return rules(cfg.get("peft_version"))


def said_by(cfg: dict[str, Any]) -> str:
    """What a PEFT config says of the PEFT that wrote it, as a message's phrase ("says PEFT 0.21 wrote it", "does not
    say ...", "gives peft_version 'abc', which is not a version ..."), naming the rules it is read by."""
    raw = cfg.get("peft_version")
    version = parse(raw)
    if version is not None and between_releases(raw):
        return f"says PEFT {raw} wrote it, a build between releases, so it is read as PEFT {rules_named(rules(raw))}'s"
    if version is not None:
        return f"says PEFT {version[0]}.{version[1]} wrote it"
    if raw is None:
        return "does not say which PEFT wrote it (no peft_version), so it is read as PEFT 0.21's"
    return f"gives peft_version {raw!r}, which is not a PEFT version, so it is read as PEFT 0.21's"


def unknown_reason(cfg: dict[str, Any]) -> str | None:
    """Why a PEFT config's ``peft_version`` cannot be taken at its word: present but not a version (read as PEFT
    0.21's, as a file without it), a build between releases (read by the release's before it, :func:`rules`), or newer
    than :data:`NEWEST` (read by that PEFT's rules, which a newer PEFT may have changed, as 0.22 changed 0.21's);
    ``None`` for a release rankwise was checked against or none given."""
    raw = cfg.get("peft_version")
    version = parse(raw)
    if raw is not None and version is None:
        return (f"its peft_version {raw!r} is not a PEFT version (such as '0.22.0'), so it is read by PEFT 0.21's rules, "
                "as a file that does not say which PEFT wrote it; if PEFT 0.22 or newer wrote it, set peft_version to "
                "that version")
    if between_releases(raw):
        return (f"it says PEFT {raw} wrote it, a build between releases (a dev build of PEFT's main branch or a release "
                "candidate), which may carry some of the next release's changes, so it is read by PEFT "
                f"{rules_named(rules(raw))}'s rules, those of the release before it; if that build computes as a later "
                "release does, set peft_version to that release")
    if version is not None and version > NEWEST:
        return (f"it says PEFT {raw} wrote it, newer than any PEFT rankwise was checked against (up to "
                f"{rules_named(NEWEST)}), so it is read by PEFT {rules_named(NEWEST)}'s rules; if that PEFT changed "
                "what an adapter computes, the import computes something else: check its outputs against that PEFT")
    return None


def at_least(version: Version | None, minimum: Version = PEFT_022) -> bool:
    """Whether ``version`` is known and at least ``minimum`` (an unknown version is taken as the older rules)."""
    return version is not None and version >= minimum
