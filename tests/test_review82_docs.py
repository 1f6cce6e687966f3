"""Review round 82 (2026-12-07), the documentation after rounds 56–80 read as a user reads it
(docs/reliability.md, that section): what the pages say is what the code and the command line do.

Each test reads the real pages and the real code (signatures, the argument parser, the refusals themselves)."""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import rankwise
from rankwise_harness import cli

ROOT = Path(__file__).resolve().parents[1]
CLI_PAGES = ("docs/howto/cli.md", "docs/howto/export.md", "docs/howto/resume.md", "docs/distributed.md")


def _surface_rows() -> dict[str, str]:
    """``name -> call as written`` for every call the API overview's "whole surface" tables spell ``name(...)``."""
    text = (ROOT / "docs/api/index.md").read_text()
    surface = text[text.index("## The whole surface"):text.index("## Targets")]
    rows = {}
    for cell in re.findall(r"^\| (.*?) \|", surface, re.M):
        for call in re.findall(r"`(?:with )?(\w+)\(([^`]*)\)", cell):
            rows.setdefault(call[0], call[1])
    return rows


def _public_calls() -> dict[str, Callable[..., Any]]:
    """The functions of ``rankwise.__all__`` (classes left out: their fields are the Configs page's)."""
    return {n: getattr(rankwise, n) for n in rankwise.__all__
            if not n.startswith("__") and callable(getattr(rankwise, n)) and not isinstance(getattr(rankwise, n), type)}


def test_the_api_overview_lists_every_public_call() -> None:
    """The overview's table is where a reader looks up a call; ``scaled`` and ``combine`` (in ``__all__`` since
    round 55) were missing from it, though ``lifecycle.md`` renders them."""
    missing = sorted(set(_public_calls()) - set(_surface_rows()) - {"all_methods", "config_from_dict"})
    assert not missing, f"in rankwise.__all__ but not in docs/api/index.md's surface table: {missing}"
    overview = (ROOT / "docs/api/index.md").read_text()
    assert all(f"{n}()" in overview or f"`{n}(" in overview for n in ("all_methods", "config_from_dict"))


@pytest.mark.parametrize("name", sorted(_public_calls()))
def test_the_api_overview_gives_each_call_s_keyword_arguments_and_defaults(name: str) -> None:
    """Every ``k=v`` the table writes is a parameter of the call with that default, and every parameter with a
    default is written (``lora_plus_param_groups``'s ``weight_decay`` was left out)."""
    rows = _surface_rows()
    if name not in rows:
        pytest.skip(f"{name}: named in prose, not as a call")
    written = dict(re.findall(r"(\w+)=([^,]+)", rows[name]))
    params = inspect.signature(_public_calls()[name]).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    assert set(written) == set(defaults), (name, rows[name], sorted(defaults))
    for key, value in written.items():
        assert eval(value) == defaults[key], (name, key, value, defaults[key])  # noqa: S307 (the page's literals)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_line_flag_is_on_a_page() -> None:
    """``rankwise <cmd> --help`` and the pages agree: each flag a subcommand takes is described on the command-line,
    export, resume or distributed page (``--max-new-tokens`` and ``export --no-check-base`` were on none)."""
    pages = "\n".join((ROOT / p).read_text() for p in CLI_PAGES)
    missing = sorted({(cmd, flag) for cmd, parser in _subcommands().items() for action in parser._actions
                      for flag in action.option_strings if flag.startswith("--") and flag != "--help"
                      and not re.search(re.escape(flag) + r"(?![\w-])", pages)})
    assert not missing, f"flags no page describes: {missing}"


def test_the_command_line_page_names_every_subcommand() -> None:
    first = (ROOT / "docs/howto/cli.md").read_text().split("\n\n")[1]
    assert [c for c in _subcommands() if f"`{c}`" not in first] == []


REFUSALS = {  # block -> the sentence of docs/howto/adapters.md that lists what the block refuses
    "disabled": r"Calls that change or write the adapters are refused inside the block[^:]*:(.*?);",
    "scaled": r"Inside the block (`?merge.*?) raise \(",
    "per_example": r"Inside the block, calls that change the adapters or write them \((.*?)\) are refused",
}


def _refusal_list(block: str) -> set[str]:
    """The calls the adapters how-to says ``rankwise.<block>`` refuses inside it."""
    text = " ".join((ROOT / "docs/howto/adapters.md").read_text().split())
    sentence = re.search(REFUSALS[block], text)
    assert sentence is not None, f"the sentence listing what rankwise.{block} refuses is gone"
    return set(re.findall(r"`(\w+)(?:\(\))?`", sentence.group(1)))


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


def _block(block: str, model: nn.Module) -> Any:
    if block == "disabled":
        return rankwise.disabled(model)
    if block == "scaled":
        return rankwise.scaled(model, 0.5)
    return rankwise.per_example(model, ["default", None])


@pytest.mark.parametrize("block", sorted(REFUSALS))
def test_what_a_block_refuses_is_what_the_page_lists(block: str, tmp_path: Path) -> None:
    """Inside ``with rankwise.disabled(model):`` the page listed merge, unmerge, attach, delete and detach as
    refused; save, export_peft, load, import_peft, set_active, combine and load_state_dict are refused too (a user
    saving inside the block got a ``RuntimeError`` the page did not announce). ``scaled``'s list lacked load,
    import_peft and detach, ``per_example``'s load, import_peft, detach, combine, export_peft, scaled and a nested
    block. Each call is tried inside the block: every one refused must be listed, and none that works."""
    torch.manual_seed(0)
    model = _Two()
    cfg = rankwise.LoraConfig(r=2, target_modules=["fc"])
    rankwise.attach(model, cfg)
    rankwise.save(model, tmp_path / "a")
    rankwise.export_peft(model, tmp_path / "p")
    calls: dict[str, Callable[[], object]] = {
        "merge": lambda: rankwise.merge(model), "unmerge": lambda: rankwise.unmerge(model),
        "attach": lambda: rankwise.attach(model, cfg, name="x"),
        "load": lambda: rankwise.load(model, tmp_path / "a", name="y"),
        "import_peft": lambda: rankwise.import_peft(model, tmp_path / "p", name="z"),
        "delete": lambda: rankwise.delete(model, "default"), "detach": lambda: rankwise.detach(model),
        "set_active": lambda: rankwise.set_active(model, "default"),
        "combine": lambda: rankwise.combine(model, {"default": 0.5}, "half"),
        "save": lambda: rankwise.save(model, tmp_path / "s"),
        "export_peft": lambda: rankwise.export_peft(model, tmp_path / "e"),
        "load_state_dict": lambda: model.load_state_dict(model.state_dict()),
        "step": lambda: rankwise.step(model), "scaled": lambda: rankwise.scaled(model, 0.5).__enter__(),
    }
    if block != "disabled":  # per_example refuses to start inside disabled(), which its own section says
        calls["disabled"] = lambda: rankwise.disabled(model).__enter__()
        calls["per_example"] = lambda: rankwise.per_example(model, ["default"]).__enter__()
    refused, works = set(), set()
    for name, call in calls.items():
        with _block(block, model):
            try:
                call()
                works.add(name)
            except RuntimeError as err:
                assert f"rankwise.{block}" in str(err), (name, err)
                refused.add(name)
    listed = _refusal_list(block)
    assert refused <= listed, f"refused inside rankwise.{block} but not listed: {sorted(refused - listed)}"
    assert not works & listed, f"listed as refused inside rankwise.{block} but work: {sorted(works & listed)}"
    assert {"step"} <= works and rankwise.active_adapters(model) == ("default",)
