"""Reliability over every method in the matrix: faults during save, wrong method on load, missing
calibration, NaN/inf gradients. Each bad input gets a clear error and loses nothing."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import rankwise
import rankwise.io as rio
from rankwise.state import get_state
from conftest import ModelCase
from method_matrix import METHOD_CASES, MethodCase
from test_bad_input import _assert_unchanged, _snapshot


@pytest.fixture(params=list(METHOD_CASES))
def method_case(request: pytest.FixtureRequest) -> MethodCase:
    return METHOD_CASES[request.param]


def _attached(case: ModelCase, method: MethodCase, seed: int = 1) -> nn.Module:
    model = case.make()
    config, calibration = method.make(case, True)
    rankwise.attach(model, config, calibration=calibration)
    _nudge(model, seed)
    return model


def _nudge(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


class _FailingFile:
    """A file object whose write stores half the bytes and then fails like a full disk."""

    def __init__(self, f, exc: BaseException) -> None:
        self.f, self.exc = f, exc

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, data: bytes) -> None:
        self.f.write(data[: len(data) // 2])
        raise self.exc

    def fileno(self) -> int:
        return self.f.fileno()


def _inject(monkeypatch: pytest.MonkeyPatch, fault: str) -> type[BaseException]:
    """Make the next adapter write fail at ``fault``; returns the exception type the caller sees."""
    real_fdopen = rio.os.fdopen
    if fault == "disk-full-mid-write":
        monkeypatch.setattr(rio.os, "fdopen", lambda fd, mode: _FailingFile(real_fdopen(fd, mode), OSError(errno.ENOSPC, "No space left on device")))
        return OSError
    if fault == "interrupt-mid-write":  # Ctrl-C (or a kill the process survives long enough to unwind)
        monkeypatch.setattr(rio.os, "fdopen", lambda fd, mode: _FailingFile(real_fdopen(fd, mode), KeyboardInterrupt()))
        return KeyboardInterrupt
    if fault == "fsync-fails":

        def fsync(fd: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(rio.os, "fsync", fsync)
        return OSError
    if fault == "rename-fails":

        def replace(src, dst) -> None:
            raise OSError(errno.EXDEV, "rename failed")

        monkeypatch.setattr(rio.os, "replace", replace)
        return OSError
    raise AssertionError(fault)


FAULTS = ["disk-full-mid-write", "interrupt-mid-write", "fsync-fails", "rename-fails"]


@pytest.mark.parametrize("fault", FAULTS)
def test_failed_save_keeps_previous_adapter(mlp_case: ModelCase, method_case: MethodCase, fault: str, tmp_path: Path, monkeypatch) -> None:
    model = _attached(mlp_case, method_case)
    path = rankwise.save(model, tmp_path / "adapter")
    batch = mlp_case.batch(0)
    with torch.no_grad():
        saved_out = model(**batch).logits
    _nudge(model, seed=2)  # more training happened; the next save fails
    exc_type = _inject(monkeypatch, fault)
    with pytest.raises(exc_type):
        rankwise.save(model, path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "adapter_config.json"], "temp files left behind"
    fresh = rankwise.load(mlp_case.make(), path)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, saved_out)  # exactly the previous adapter
    rankwise.save(model, path)  # and once the disk is fine again, the new one saves and loads
    with torch.no_grad():
        assert torch.equal(rankwise.load(mlp_case.make(), path)(**batch).logits, model(**batch).logits)


def test_failed_first_save_leaves_nothing_loadable(mlp_case: ModelCase, tmp_path: Path, monkeypatch) -> None:
    model = _attached(mlp_case, METHOD_CASES["lora"])
    _inject(monkeypatch, "disk-full-mid-write")
    with pytest.raises(OSError, match="No space left"):
        rankwise.save(model, tmp_path / "adapter")
    monkeypatch.undo()
    assert list((tmp_path / "adapter").iterdir()) == []
    fresh = mlp_case.make()
    snap = _snapshot(fresh)
    with pytest.raises(rankwise.AdapterFileError, match="does not exist"):
        rankwise.load(fresh, tmp_path / "adapter")
    _assert_unchanged(fresh, snap)


def test_failure_writing_the_readable_config_keeps_a_consistent_adapter(mlp_case: ModelCase, tmp_path: Path, monkeypatch) -> None:
    """A failure at the JSON copy (the second file) leaves the previous adapter whole: both of its files are written to
    temp files first and renamed only when both are whole (``atomic_write_files``), so it still loads, never a mix."""
    import os

    model = _attached(mlp_case, METHOD_CASES["dora"])
    path = rankwise.save(model, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    batch = mlp_case.batch(1)
    with torch.no_grad():
        old = model(**batch).logits
    _nudge(model, seed=2)
    real_fdopen, opened = os.fdopen, []

    def fail_on_json(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, mode, *args, **kwargs)
        opened.append(f)
        if len(opened) == 2:  # the JSON copy, after the tensors
            def write(_data: bytes) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write  # type: ignore[method-assign]
        return f

    monkeypatch.setattr(os, "fdopen", fail_on_json)
    with pytest.raises(OSError):
        rankwise.save(model, path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    with torch.no_grad():  # the previous, complete adapter loads (never a mix of old and new tensors)
        assert torch.equal(rankwise.load(mlp_case.make(), path)(**batch).logits, old)


# ---------------------------------------------------------------------------- wrong method on load
def test_wrong_method_on_load(mlp_case: ModelCase, method_case: MethodCase, tmp_path: Path) -> None:
    model = _attached(mlp_case, method_case)
    path = rankwise.save(model, tmp_path / "adapter")
    saved_as = get_state(model).config.method
    for other in sorted(set(rankwise.all_methods()) - {saved_as}):
        fresh = mlp_case.make()
        snap = _snapshot(fresh)
        with pytest.raises(rankwise.AdapterFileError, match=f"saved by method '{saved_as}', not '{other}'"):
            rankwise.load(fresh, path, expect_method=other)
        _assert_unchanged(fresh, snap)
    fresh = mlp_case.make()
    with pytest.raises(ValueError, match="unknown adapter method 'lora2'"):
        rankwise.load(fresh, path, expect_method="lora2")
    rankwise.load(fresh, path, expect_method=saved_as)
    assert get_state(fresh).config.method == saved_as


# ---------------------------------------------------------------------------- missing calibration
def test_missing_calibration(mlp_case: ModelCase, monkeypatch) -> None:
    """Every data-initialised method refuses to attach without calibration, naming the argument.

    A stand-in data-initialised method is registered for the test, so the check runs even before
    GoRA joins the matrix; every matrix method that uses calibration is checked too.
    """
    from rankwise.registry import _METHODS, Method, get_method

    lora = get_method("lora")
    monkeypatch.setitem(_METHODS, "lora", Method("lora", lora.config_cls, lora.build, lora.rebuild, uses_calibration=True))
    names = ["lora"] + [n for n, m in METHOD_CASES.items() if get_method(m.make(mlp_case, False)[0].method).uses_calibration]
    for name in names:
        model = mlp_case.make()
        snap = _snapshot(model)
        config, _ = METHOD_CASES[name].make(mlp_case, False)
        with pytest.raises(ValueError, match=f"{config.method} initialises from data: pass calibration="):
            rankwise.attach(model, config)
        _assert_unchanged(model, snap)


# ---------------------------------------------------------------------------- NaN gradients
def test_nan_gradients_named(mlp_case: ModelCase, method_case: MethodCase) -> None:
    model = _attached(mlp_case, method_case)
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.1)
    batch = mlp_case.batch(0)
    model(**batch).loss.backward()
    rankwise.check_finite_grads(model)  # a clean batch passes
    opt.step(); opt.zero_grad()
    rankwise.step(model, opt)
    # one poisoned gradient, in the second adapted layer: the error names exactly that tensor
    model(**batch).loss.backward()
    name, layer = list(rankwise.adapter_layers(model).items())[1]
    tensor = layer.trainable[-1]
    getattr(layer, tensor).grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"gradient of adapter tensor '{name}\.{tensor}' holds NaN/inf"):
        rankwise.check_finite_grads(model)
    # a loop that skips the check: the guard in rankwise.step stops it right after the bad update
    opt.step(); opt.zero_grad()
    with pytest.raises(FloatingPointError, match=rf"adapter tensor '{name}\.{tensor}' holds NaN/inf after step 2"):
        rankwise.step(model, opt)
    rankwise.step(model, opt, check_finite=False)  # the explicit opt-out


def test_nan_from_the_data(mlp_case: ModelCase) -> None:
    model = _attached(mlp_case, METHOD_CASES["lora"])
    batch = mlp_case.batch(0)
    batch["x"][2, 5] = float("inf")
    model(**batch).loss.backward()
    with pytest.raises(FloatingPointError, match=r"gradient of adapter tensor 'fc1\.lora_(a|b)'"):
        rankwise.check_finite_grads(model)


def test_digest_covers_zero_dim_tensors() -> None:
    from rankwise.io import tensors_digest

    a = tensors_digest({"step": torch.tensor(3.0), "w": torch.ones(2)})
    b = tensors_digest({"step": torch.tensor(4.0), "w": torch.ones(2)})
    assert a != b
