"""rankwise.peft_version: which PEFT rules a file or an export follows."""
from __future__ import annotations

import sys
from importlib import metadata

import pytest

from rankwise import peft_version


@pytest.mark.parametrize("text,expected", [("0.22.0", (0, 22)), ("0.21.2.dev0", (0, 21)), ("1.0", (1, 0)),
                                           ("", None), (None, None), ("unknown", None), (22, None)])
def test_parse_reads_major_and_minor(text: object, expected: tuple[int, int] | None) -> None:
    assert peft_version.parse(text) == expected


def test_a_file_without_peft_version_is_read_by_the_older_rules() -> None:
    assert peft_version.of_file({"peft_version": "0.22.0"}) == (0, 22)
    assert peft_version.of_file({}) is None
    assert not peft_version.at_least(None)
    assert peft_version.at_least((0, 22)) and peft_version.at_least((1, 0)) and not peft_version.at_least((0, 21))


def test_installed_is_the_installed_distribution_s_version() -> None:
    try:
        expected = peft_version.parse(metadata.version("peft"))
    except metadata.PackageNotFoundError:
        expected = None
    assert peft_version.installed() == expected


def test_installed_is_none_without_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(peft_version.metadata, "version", missing)
    monkeypatch.delitem(sys.modules, "peft", raising=False)  # not imported either (an imported PEFT is the one run)
    assert peft_version.installed() is None
