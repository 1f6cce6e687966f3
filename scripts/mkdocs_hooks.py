"""MkDocs hook (mkdocs.yml ``hooks:``): the docstrings' Sphinx roles (``:class:`X```, ``:func:`f```), which
``help()`` readers know, render in the site as plain code instead of a stray ``:class:`` prefix."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):(?=<code>)")


def on_page_content(html: str, **_: Any) -> str:
    return ROLE.sub("", html)
