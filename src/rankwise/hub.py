"""Adapters on the Hugging Face Hub: a repo id where an adapter folder is expected.

``rankwise.load(model, "owner/name")`` and ``rankwise.import_peft(model, "owner/name")`` read an adapter from the Hub
as ``peft.PeftModel.from_pretrained(model, "owner/name")`` does:

* a path that exists here is used as it is (a ``pathlib.Path`` is always a local path);
* otherwise a string that reads as a repo id (``name`` or ``owner/name``: letters, digits, ``-``, ``_``, ``.``) is
  fetched with ``huggingface_hub.snapshot_download`` (only the adapter's files, at ``revision``, under
  ``subfolder``), into the Hub's cache, honouring ``HF_TOKEN`` / ``huggingface-cli login`` and
  ``HF_HUB_OFFLINE=1`` (then the cache alone), and that snapshot folder is read like a local one: every check
  of a local file applies to it.

``huggingface_hub`` comes with transformers; a bare ``pip install rankwise`` lacks it, and a repo id then says to
install it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ._version import __version__

__all__ = ["adapter_folder", "looks_like_repo_id"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def looks_like_repo_id(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` could name a Hub repo: a ``str`` of the form ``name`` or ``owner/name`` (not a ``Path``, not
    absolute, no ``..``, not a file name ending in ``.safetensors`` / ``.json`` / ``.bin``)."""
    return (isinstance(path, str) and _REPO_ID.fullmatch(path) is not None and ".." not in path
            and not path.endswith((".safetensors", ".json", ".bin")))


def adapter_folder(path: str | os.PathLike[str], files: Sequence[str], *, revision: str | None = None,
                   subfolder: str | None = None, what: str = "adapter", hint: Callable[[Path], str] | None = None) -> Path:
    """The local folder to read an adapter from: ``path`` (``/ subfolder``) when it exists here or cannot be a repo
    id (the caller then says what is missing), else the Hub snapshot of repo ``path`` holding ``files`` (the first
    of them must be there: a repo without it is refused naming the repo, not the cache folder, with ``hint(snapshot)``
    where that says what the files fetched are instead, e.g. another format's adapter; else the subfolder hint).

    Raises ``ValueError`` for ``revision`` with a local path or a ``subfolder`` that climbs out, and
    ``FileNotFoundError`` naming the Hub's reason (not found, offline and not cached, gated, no such revision)
    or the missing ``huggingface_hub``."""
    if subfolder is not None and (not subfolder or Path(subfolder).is_absolute() or ".." in Path(subfolder).parts):
        raise ValueError(f"subfolder must be a relative folder inside the adapter's repo or folder, got {subfolder!r}")
    if Path(path).exists() or not looks_like_repo_id(path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} names a version of a Hugging Face Hub repo; {os.fspath(path)!r} "
                             "is a local path")
        return Path(path) / subfolder if subfolder else Path(path)
    repo = os.fspath(path)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise FileNotFoundError(f"no {what} at {repo}: no such folder here, and reading it as a Hugging Face Hub repo "
                                "id needs huggingface_hub (pip install huggingface_hub)") from exc
    patterns = [f"{subfolder}/{f}" if subfolder else f for f in files]
    try:
        snapshot = snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns, library_name="rankwise",
                                     library_version=__version__)
    except Exception as exc:  # noqa: BLE001 (not found, offline, gated, bad revision: huggingface_hub has many types)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FileNotFoundError(f"no {what} at {repo}: no such folder here, and the Hugging Face Hub gave none "
                                f"({type(exc).__name__}: {reason})") from exc
    folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    if not (folder / files[0]).is_file():
        where = f"{repo}" + (f" at revision {revision}" if revision else "") + (f" in {subfolder}/" if subfolder else "")
        other = hint(folder) if hint is not None else ""
        raise FileNotFoundError(f"no {what} at {where} on the Hugging Face Hub: the repo has no {files[0]} there"
                                + (other or ("" if subfolder else " (an adapter in a subfolder of the repo: pass subfolder=)")))
    return folder
