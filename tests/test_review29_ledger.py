"""Review round 29, the machinery issue 27's verdict rests on: the ledger and the EDoRA report built from it.

The report is built (``bench/edora_regime.py --report-only``, the protocol's flags) from a copy of the committed
ledger of ``edora-decided-r8`` (docs/bench/runs/, read only) in a temporary folder, changed as a machine, a smoke
run, a hand or a merge could change it. The Welch interval and the verdict rule are checked against closed forms.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
import ledger  # noqa: E402  (bench/ is not a package)
import regime  # noqa: E402
from test_bench_gora_regime import _args, gr  # noqa: E402  (the GoRA driver and its arguments)
from test_bench_regime import _edora, _finished, _write_entry, tmp_ledger  # noqa: E402,F401  (one home: the fixture)

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "bench" / "runs" / "edora-decided-r8"
# the protocol's command for r 8 (docs/protocols/edora-decided.md), MRPC only, as the committed report was built
PROTOCOL = ["--tasks", "mrpc", "--targets", "query,value,output.dense", "--epochs", "20", "--patience", "3",
            "--seeds", "0,1,2,3,4", "--few-seeds", "3", "--r", "8"]


@pytest.fixture()
def r8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the committed r 8 ledger as this machine's ledger; the report is written under ``tmp_path``."""
    if not (COMMITTED / "mrpc" / "dora" / "lr0.001-seed0.json").is_file():
        pytest.skip("the committed edora-decided-r8 ledger is not in this checkout")
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    shutil.copytree(COMMITTED, tmp_path / "ledger" / "edora-decided-r8")
    monkeypatch.setattr(regime, "majority_rate", lambda task: 0.684)  # the dev file need not be on this machine
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # main() sets them: restored after the test
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "ledger" / "edora-decided-r8" / "mrpc"


def _report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str) -> str:
    """``edora_regime.py --report-only`` with ``flags`` on the temporary ledger; returns the report written."""
    er = _edora()
    monkeypatch.setattr(er, "ROOT", tmp_path)  # the report and curves go to tmp_path/docs/bench
    (tmp_path / "docs" / "bench").mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(sys, "argv", ["edora_regime.py", *flags, "--runs", str(tmp_path / "runs" / "edora-decided-r8"),
                                      "--name", "r8", "--report-only"])
    er.main()
    return (tmp_path / "docs" / "bench" / "r8.md").read_text()


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1) + "\n")


def _other_fingerprint(e: dict) -> None:
    e["config"]["data_fingerprint"]["dev"]["sha256"] = "0" * 64


def _smoke(e: dict) -> None:
    e["config"]["run"]["max_train"] = 320


CHANGES = {
    # the report built with flags other than the runs' (here: without --patience 3)
    "report-flags": (lambda mrpc: None, "--patience", "patience"),
    # a smoke run (320 training rows) left in the ledger under the experiment's name: the grid run of DoRA's pick
    "smoke-run": (lambda mrpc: _edit(mrpc / "dora" / "lr0.001-seed0.json", _smoke), None, "max_train"),
    # DoRA's seed 0 copied to seed 1's name (by hand, or a script renaming run folders): a fake second seed
    "copied-seed": (lambda mrpc: shutil.copy(mrpc / "dora" / "lr0.001-seed0.json", mrpc / "dora" / "lr0.001-seed1.json"),
                    None, "seed"),
    # a run on another machine whose dev file differs (another GLUE download)
    "other-data": (lambda mrpc: _edit(mrpc / "edora-svd" / "lr0.00095-seed0.json", _other_fingerprint), None, "data"),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_a_report_refuses_entries_made_with_other_settings_or_data(r8: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """The ledger is keyed by task / arm / lr / seed only. Before, each of these was counted silently: the copied
    seed gave DoRA "(n=2)" and a verdict row with two seeds, the smoke run's score stood in DoRA's grid and cell.
    Now the report is not written, and the error names the entry and the setting that differs."""
    change, drop, what = CHANGES[case]
    assert "\n| dora | " in _report(tmp_path, monkeypatch, *PROTOCOL)  # the committed ledger as it is builds
    (tmp_path / "docs" / "bench" / "r8.md").unlink()
    change(r8)
    at = PROTOCOL.index(drop) if drop else len(PROTOCOL)
    flags = PROTOCOL[:at] + PROTOCOL[at + 2:]  # the flag left out, with its value
    with pytest.raises(ledger.LedgerError, match=what) as err:
        _report(tmp_path, monkeypatch, *flags)
    assert "edora-decided-r8/mrpc/" in str(err.value) and "protocol's command" in str(err.value)
    assert not (tmp_path / "docs" / "bench" / "r8.md").exists()


def test_the_gora_report_refuses_an_entry_made_with_another_arm_s_settings(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check in ``bench/gora_regime.py``'s report, on a copy of the committed ``gora-mrpc`` ledger: its report
    builds as committed; rsLoRA + LoRA+ 16's seed 0 under LoRA's seed 2's name (a run folder renamed before its
    entry was recorded) was counted in LoRA's row before; now the report stops, naming the entry and the settings."""
    committed = COMMITTED.parent / "gora-mrpc"
    if not (committed / "mrpc" / "lora" / "lr0.0001-seed2.json").is_file():
        pytest.skip("the committed gora-mrpc ledger is not in this checkout")
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    shutil.copytree(committed, tmp_path / "ledger" / "gora-mrpc")
    monkeypatch.setattr(gr, "ROOT", tmp_path)
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    args = _args(experiment="gora-mrpc", data=str(tmp_path / "no-data"))
    gr.report(args)
    mrpc = tmp_path / "ledger" / "gora-mrpc" / "mrpc"
    shutil.copy(mrpc / "rslora-lp16" / "lr0.0001-seed0.json", mrpc / "lora" / "lr0.0001-seed2.json")
    with pytest.raises(ledger.LedgerError, match="lora/lr0.0001-seed2.json: .*lora_plus_ratio.*seed"):
        gr.report(args)


def test_entries_the_report_does_not_read_are_named(r8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seed run at a grid point that is not the pick (an earlier pick, before an extension moved it) and a merge
    tool's backup copy of an entry (``git mergetool`` leaves ``*_BACKUP_*.json``) are ledger entries no table or
    verdict reads. Before, the report said nothing of them (a finished run out of sight; the provenance line counted
    them as entries). Now a line names each; the verdict cells are those of the committed ledger alone."""
    before = _report(tmp_path, monkeypatch, *PROTOCOL)
    assert "does not read" not in before
    shutil.copy(r8 / "dora" / "lr0.001-seed0.json", r8 / "dora" / "lr0.001-seed0_BACKUP_4242.json")
    shutil.copy(r8 / "dora" / "lr0.0003-seed0.json", r8 / "dora" / "lr0.0003-seed1.json")
    _edit(r8 / "dora" / "lr0.0003-seed1.json", lambda e: e["config"]["run"].update(seed=1))
    after = _report(tmp_path, monkeypatch, *PROTOCOL)
    line = next(x for x in after.splitlines() if "does not read" in x)
    assert "(2:" in line and "`mrpc/dora/lr0.0003-seed1`" in line and "`mrpc/dora/lr0.001-seed0_BACKUP_4242`" in line
    verdicts = lambda md: [x for x in md.splitlines() if x.startswith(("| mrpc |", "| average |"))]  # noqa: E731
    assert verdicts(after) == verdicts(before)


def test_a_run_recorded_twice_keeps_the_first_entry_and_sets_the_second_aside(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Machine A's entry of a run is committed and pulled in while machine B trains the same run (its ``entry`` was
    read before). Before, B's ``record`` replaced A's entry silently: the committed evidence (and every report built
    on it) changed under the same key. Now A's entry stays byte for byte, B's result is beside it (``.second-*``,
    no entry), a warning names both, and ``record`` returns the entry kept."""
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    rid = "mrpc/dora/lr0.001-seed0"
    _finished(tmp_path / "a", score=0.8)
    first = ledger.record("exp", rid, tmp_path / "a", ["finetune"], started=0.0)
    path = ledger.entry_path("exp", rid)
    committed = path.read_text()
    _finished(tmp_path / "b", score=0.6)
    kept = ledger.record("exp", rid, tmp_path / "b", ["finetune"], started=0.0)
    assert path.read_text() == committed and kept == first and list(ledger.entries("exp")) == [rid]
    aside = [p for p in path.parent.iterdir() if p.name.startswith("lr0.001-seed0.json.second-")]
    assert len(aside) == 1 and json.loads(aside[0].read_text())["metrics"]["best"]["val"]["f1"] == 0.6
    assert str(path) in capsys.readouterr().err


# ---------------------------------------------------------------------------- found correct: the interval, the rule
def test_welch_interval_against_closed_forms_with_unequal_n_and_two_seeds() -> None:
    """5 seeds against 3 (the protocol's DoRA against LoRA counts): the standard error and Welch–Satterthwaite
    degrees of freedom worked out by hand. 2 against 2 with no spread on one side: df = 1, whose t quantile is
    tan(π (p − 1/2)) (the Cauchy distribution), so the 90 % half-width is tan(0.45 π) · se exactly."""
    from scipy.stats import t

    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0]  # variances 2.5 and 4
    va, vb = 2.5 / 5, 4.0 / 3
    df = (va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 2)
    d, low, high = regime.welch_interval(a, b, 0.90)
    assert regime.welch(a, b) == pytest.approx((-1.0, math.sqrt(va + vb), df)) and df == pytest.approx(3.5328, abs=1e-4)
    assert (d, high - d) == pytest.approx((-1.0, t.ppf(0.95, df) * math.sqrt(va + vb)))
    d, low, high = regime.welch_interval([1.0, 3.0], [0.0, 0.0], 0.90)
    assert (d, low, high) == pytest.approx((2.0, 2.0 - math.tan(0.45 * math.pi), 2.0 + math.tan(0.45 * math.pi)))


def test_the_verdict_rule_s_boundaries_and_a_single_seed(tmp_ledger: Path) -> None:
    """The protocol: inside [−1, +1] (both ends included) holds; a lower end *above* +1 fails (exactly +1 does not);
    one seed on a side is "not decided yet", never an interval, for the task and for the average."""
    er = _edora()
    assert er.rule(0.0, -1.0, 1.0).startswith("holds")
    assert er.rule(1.5, 1.0, 2.0) == "not decided at this budget"
    assert er.rule(1.5, 1.0 + 1e-9, 2.0).startswith("fails")
    assert er.rule(-1.5, -2.0, -1.0 - 1e-9) == "not decided at this budget"  # EDoRA better by > 1: the rule's letter
    by = {a.label: a for a in er.arms(8, 16.0)}
    for label, lr, scores in (("dora", 1e-3, [80.0, 81.0, 80.5]), ("edora-svd", 1e-2, [79.0])):
        for s, v in enumerate(scores):
            _write_entry(tmp_ledger, "mrpc", by[label], lr, s, {"adapter_params": 1, "last": {"epoch": 5.0},
                                                                "best": {"dev": {"accuracy": v / 100}}})
    lines = er.verdict_lines(tmp_ledger, ["mrpc"], [by["dora"], by["edora-svd"]],
                             {"mrpc:dora": 1e-3, "mrpc:edora-svd": 1e-2}, [0, 1, 2, 3, 4], 20.0)
    for task, n in (("mrpc", "(3, 1)"), ("average", "(1, 1)")):  # the average: seeds both arms finished
        row = next(x for x in lines if x.startswith(f"| {task} | edora-svd"))
        assert f"{n} | not decided yet (< 2 seeds)" in row and "[" not in row, row


def _stated(pattern: str, text: str) -> list[tuple[int, ...]]:
    return [tuple(int(g) for g in m.groups()) for m in re.finditer(pattern, text)]


def test_the_run_counts_the_docs_state_are_the_ledger_s() -> None:
    """The EDoRA run counts are written by hand in three places each time a run is committed (README's Evidence row,
    docs/methods/index.md, docs/evidence/edora.md), and the report's provenance line counts the entries it read:
    each must be the number of entries in the committed ledger, so a run committed without its counts fails here."""
    root = Path(__file__).resolve().parents[1]
    entries = {r: len(list((root / "docs" / "bench" / "runs" / f"edora-decided-r{r}").rglob("*.json"))) for r in (8, 12)}
    if not entries[8]:
        pytest.skip("the committed edora-decided ledgers are not in this checkout")

    def read(*parts: str) -> str:
        return (root.joinpath(*parts)).read_text(encoding="utf-8")

    pair = (entries[8], entries[12])
    assert _stated(r"(\d+) \+ (\d+) runs in", read("README.md")) == [pair]
    assert _stated(r"(\d+) \+ (\d+) runs in", read("docs", "methods", "index.md")) == [pair]
    evidence = read("docs", "evidence", "edora.md")
    assert _stated(r"\*\*r 8, (\d+) runs:\*\*", evidence) == [(entries[8],)]
    assert _stated(r"\*\*r 12, (\d+) runs:\*\*", evidence) == [(entries[12],)]
    for r in (8, 12):  # "All N entries from commit `c` (N)." or "Entries by commit: `c1` (n1), `c2` (n2); ..."
        line = next(x for x in read("docs", "bench", f"edora-decided-r{r}.md").splitlines() if "ntries" in x)
        assert sum(n for (n,) in _stated(r"`[^`]+` \((\d+)\)", line)) == entries[r], f"edora-decided-r{r}.md"
