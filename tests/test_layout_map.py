"""The code layout map (docs/layout.md, linked from the README) names every module in src/: a new file that is
not on the map fails here instead of drifting silently."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_module_is_on_the_layout_map() -> None:
    layout = (ROOT / "docs" / "layout.md").read_text()
    missing = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        rel = path.relative_to(ROOT / "src")
        if path.name in ("__init__.py", "_version.py"):
            continue
        if rel.parent.name == "methods" and path.name != "gora_gradients.py":
            continue  # one file per method: the map says methods/<method>.py, docs/methods/ has each
        if path.name not in layout:
            missing.append(str(rel))
    assert not missing, f"docs/layout.md does not name {missing}"


def test_the_readme_links_the_layout_map() -> None:
    assert "docs/layout.md" in (ROOT / "README.md").read_text()


def test_every_test_file_is_in_the_topic_table() -> None:
    """docs/layout.md's "Where a behaviour is tested" names every tests/test_*.py (a new file is placed there, so a
    newcomer finds it by topic)."""
    layout = (ROOT / "docs" / "layout.md").read_text()
    table = layout[layout.index("## Where a behaviour is tested"):]
    table = table[: table.index("\n## ")]
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if f"`{p.name}`" not in table]
    assert not missing, f"docs/layout.md's test table does not name {missing}"
