"""MkDocs hook (mkdocs.yml ``hooks:``): the docstrings' reST conventions, which ``help()`` readers know, render in
the site as they read in a terminal instead of as stray markup:

- a Sphinx role (``:class:`X```, ``:func:`f```) becomes plain code, and ``:func:`~a.b.f``` shows ``f``, as Sphinx
  shows it (before: a stray ``~a.b.f`` in the code span);
- a literal-block marker becomes what reST shows: ``text::`` before an indented block ends in one colon, and a
  ``::`` alone on its line disappears (before: both ``::`` in the page, above the block).
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(?:~(?:\w+\.)*)?")
CODE_BLOCK = r'(?=\s*<div class="highlight">)'  # what an indented block (a reST literal block) becomes
LONE_MARKER = re.compile(r"<p>::</p>" + CODE_BLOCK)
END_MARKER = re.compile(r"::</p>" + CODE_BLOCK)


def on_page_content(html: str, **_: Any) -> str:
    html = ROLE.sub("<code>", html)  # a tilde only after a role: ``~/.cache`` in a page keeps its own
    html = LONE_MARKER.sub("", html)
    return END_MARKER.sub(":</p>", html)
