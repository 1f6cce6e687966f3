"""Review round 66 (2026-12-07): do the tests catch a lost or wrong adapter? Mutants of the paths that keep a user's
work: the atomic save, the checks on load, PEFT export / import, merge / unmerge, the harness's resume, ``--keep-best``
and run lock (docs/reliability.md, round 66). Each test here fails on the mutant named in it, which the nearest CI
tests let through, and passes on main.

Oracles: the order of the file-system calls a durable save needs (the renames, then an fsync of the folder holding
them); a complete file loading to the saved model's outputs bit for bit and an incomplete one refused with the model
untouched; the base weight's own bits after merge / unmerge; an uninterrupted run's learning rates, losses, metrics
and adapter bytes against a resumed one's.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_model_case
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bad_input import _assert_unchanged, _snapshot
from test_grad_accum_epochs import QUIET, _spy_setup
from test_harness_train import Crash, _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, SST-2)

import rankwise
from rankwise.adapter_file import metadata_digest, tensors_digest
from rankwise_harness.train import finetune

CASE = make_model_case("mlp")  # TinyMLP: fc1 12 -> 16, fc2 16 -> 16, head 16 -> 3


def _trained(config: rankwise.AdapterConfig) -> torch.nn.Module:
    """``CASE``'s model with adapter ``config``, its factors moved off their init (B = 0, m = ‖W0‖) so a tensor left at
    its init changes the outputs."""
    model = CASE.make()
    rankwise.attach(model, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------------- S5: the save's renames made durable
def test_save_syncs_the_folder_after_renaming_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename is durable only once the folder holding it is fsynced: a power cut after ``save`` returned must not
    bring back the previous adapter (or none). Every rename into the adapter's folder comes before an fsync of that
    folder. Mutant S5 (the folder fsync dropped from ``atomic_write_files``) survived the save tests."""
    model = _trained(rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]))
    folder = tmp_path / "adapter"
    rankwise.save(model, folder)  # a previous adapter: the next save replaces its two files
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode) and os.path.samestat(info, os.stat(folder)):
            events.append("folder synced")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        if Path(dst).parent == folder:
            events.append(f"renamed to {Path(dst).name}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rankwise.save(model, folder)
    monkeypatch.undo()
    renames = [i for i, e in enumerate(events) if e.startswith("renamed")]
    assert sorted(events[i] for i in renames) == ["renamed to adapter.safetensors", "renamed to adapter_config.json"]
    assert "folder synced" in events[renames[-1]:], events


# ---------------------------------------------------------------------------- L4: a tensor the file lacks
def _drop_tensor(folder: Path, key: str) -> None:
    """Rewrite ``folder``'s adapter without tensor ``key``, its checksums made to match (as a file written by another
    tool or version would be): only the check of the tensors against the method's layers can see the gap."""
    file = folder / "adapter.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["rankwise"])
        assert key in f.keys()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != key}
    meta["tensors_sha256"] = tensors_digest(tensors)
    meta["metadata_sha256"] = metadata_digest(meta)
    save_file(tensors, str(file), metadata={"rankwise": json.dumps(meta)})


@pytest.mark.parametrize("config, key", [
    (rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]), "fc2.lora_b"),
    (rankwise.DoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]), "fc1.magnitude"),
], ids=["lora-b", "dora-magnitude"])
def test_load_refuses_a_file_lacking_a_tensor_and_changes_nothing(config: rankwise.AdapterConfig, key: str,
                                                                 tmp_path: Path) -> None:
    """A file without one of the method's tensors is refused naming it, the model left as it was. Mutant L4 (``_fill``
    skipping a tensor the file lacks) survived the load tests: the layer kept its fresh init (``B = 0``; DoRA's
    ``m = ‖W0 + s·B A‖``), a model that loads and runs but is not the saved one."""
    model = _trained(config)
    folder = rankwise.save(model, tmp_path / "adapter")
    batch = CASE.batch(0)
    with torch.no_grad():  # the complete file loads to the saved model's outputs, bit for bit
        assert torch.equal(rankwise.load(CASE.make(), folder)(**batch).logits, model(**batch).logits)
    _drop_tensor(folder, key)
    fresh = CASE.make()
    snap = _snapshot(fresh)
    with pytest.raises(rankwise.AdapterFileError, match=f"lacks tensor '{key}'"):
        rankwise.load(fresh, folder)
    _assert_unchanged(fresh, snap)


# ---------------------------------------------------------------------------- G1: merge twice
@pytest.mark.parametrize("config", [
    rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]),
    rankwise.DoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]),
], ids=["lora", "dora"])
def test_merging_a_merged_layer_again_keeps_the_base_weight_unmerge_restores(config: rankwise.AdapterConfig) -> None:
    """``AdapterLayer.merge`` is documented idempotent: a second merge of a merged layer (a user's call on the layer,
    as on any ``rankwise.adapter_layers`` entry) changes nothing, and ``unmerge`` then gives back ``W0`` bit for bit.
    Mutant G1 (the guard ``if self.merged: return`` dropped) survived the merge tests (``rankwise.merge`` skips merged
    layers itself) and was caught only through ``detach``'s rollback (test_review23_detach.py): the second merge kept
    the merged bits as the "original", so the next unmerge lost the base weight for good."""
    model = _trained(config)
    layers = rankwise.adapter_layers(model)
    w0 = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    batch = CASE.batch(2)
    with torch.no_grad():
        unmerged_out = model(**batch).logits
        base_out = CASE.make()(**batch).logits
    rankwise.merge(model)
    merged = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    assert any(not torch.equal(merged[n], w0[n]) for n in layers)  # the merge wrote something (the test can fail)
    for layer in layers.values():
        layer.merge()
    assert all(torch.equal(layer.weight, merged[n]) for n, layer in layers.items())
    rankwise.unmerge(model)
    assert all(torch.equal(layer.weight, w0[n]) for n, layer in layers.items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, unmerged_out)
        with rankwise.disabled(model):
            assert torch.equal(model(**batch).logits, base_out)


# ---------------------------------------------------------------------------- H1: the schedule's state on resume
def test_a_resumed_run_on_a_decaying_schedule_ends_where_the_uninterrupted_one_ends(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm-up then a linear decay, stopped after step 3 of 6 and resumed from the step-2 checkpoint: the learning
    rate after every step, the losses, the metrics and the adapter's bytes are the uninterrupted run's. Mutant H1 (the
    scheduler's state not restored) survived every resume test: all ran the default constant schedule, on which a
    schedule restarted from step 0 gives the same rates."""
    kw: dict[str, Any] = dict(max_steps=6, save_every=2, schedule="linear", warmup_ratio=0.34, dropout=0.1)
    seen = _spy_setup(monkeypatch)

    def rates_into(rates: list[float], stop_at: int = 0) -> Callable[[int, float], None]:
        def hook(step: int, _loss: float) -> None:
            rates.append(seen["training"].optimizer.param_groups[0]["lr"])  # type: ignore[attr-defined]
            if step == stop_at:
                raise Crash
        return hook

    whole_rates: list[float] = []
    whole = finetune(_cfg(tmp_path / "a", tiny_models, sst2, **kw), hook=rates_into(whole_rates), **QUIET)
    cfg = _cfg(tmp_path / "b", tiny_models, sst2, **kw)
    with pytest.raises(Crash):
        finetune(cfg, hook=rates_into([], stop_at=3), **QUIET)
    resumed_rates: list[float] = []
    resumed = finetune(cfg, resume=True, hook=rates_into(resumed_rates), **QUIET)
    assert resumed["steps_this_session"] == 4
    assert len(set(whole_rates)) >= 4, whole_rates  # the rate really changes from step to step (the test can fail)
    assert resumed_rates == whole_rates[2:], (resumed_rates, whole_rates)
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]
    a = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter.safetensors"))
    b = load_file(str(Path(cfg.output) / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
