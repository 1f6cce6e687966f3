"""Review round 10 (2026-12-05), the documentation read as a new user reads it (docs/reliability.md, that
section): what a page or a command's own output tells a reader is what the code does."""

from __future__ import annotations

import re

import pytest

import rankwise
from rankwise_harness import cli


def test_rankwise_methods_prints_the_defaults_a_config_gets(capsys: pytest.CaptureFixture[str]) -> None:
    """``rankwise methods`` lists each config's fields "with their defaults": the value a field takes when it is
    left out (GoRA's ``r``/``r_ref`` default to 8 through ``__post_init__``; the listing said ``r=0, r_ref=0``)."""
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, method in rankwise.all_methods().items():
        listing = re.search(rf"^    {method.config_cls.__name__}: (.*)$", out, re.M)
        assert listing is not None, f"{name} not listed"
        default = method.config_cls()
        for field in re.findall(r"(\w+)=", listing.group(1)):
            assert f"{field}={getattr(default, field)!r}" in listing.group(1), (name, field, listing.group(1))
