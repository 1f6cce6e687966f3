"""Issue 20, library half: what an adversarial review broke, each case a test (docs/reliability.md, last section).

Crafted files (regex DoS, NaN/inf and malformed metadata, malformed PEFT configs), zero-norm rows in
DoRA/EDoRA, GoRA's data-dependent init, RAC-LoRA with the wrong optimizer, all-or-nothing attach /
load / import, dtype changes after attach, compiled / wrapped models, and the import → save → load
round trip.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import rankwise
from conftest import ModelCase, NestedFc
from method_matrix import METHOD_CASES
from rankwise.io import metadata_digest, tensors_digest
from rankwise.state import get_state
from test_bad_input import _assert_unchanged, _snapshot

ROOT = Path(__file__).resolve().parents[1]
EVIL = "([a-z_.0-9]+)+!"  # catastrophic backtracking on any long name of [a-z_.0-9] (no "!" to find)


# ---------------------------------------------------------------------------- helpers
def _saved(case: ModelCase, tmp_path: Path, cfg: rankwise.AdapterConfig | None = None) -> Path:
    model = case.make()
    rankwise.attach(model, cfg or rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    return rankwise.save(model, tmp_path / "adapter")


def _rewrite(path: Path, edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], Any], *, redigest: bool = True) -> None:
    """Edit a saved adapter's metadata/tensors in place, as a crafter would (checksums recomputed).

    ``edit`` changes ``meta``/``tensors`` in place; returning a list replaces the whole metadata by it.
    """
    file = path / "adapter.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads(f.metadata()["rankwise"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    new_meta = edit(meta, tensors)
    meta = new_meta if isinstance(new_meta, list) else meta
    if redigest and isinstance(meta, dict):
        meta["tensors_sha256"] = tensors_digest(tensors)
        meta["metadata_sha256"] = metadata_digest(meta)
    save_file(tensors, str(file), metadata={"rankwise": json.dumps(meta)})


def _run_with_timeout(script: str, timeout: float = 120.0) -> str:
    """Run ``script`` in a fresh interpreter; a hang (catastrophic regex) fails the test instead of hanging it."""
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish in {timeout} s: a regex read from a file is being evaluated")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# ---------------------------------------------------------------------------- 4. regex DoS from a file
def test_crafted_regexes_in_files_are_never_evaluated(tmp_path) -> None:
    """A saved adapter whose recorded target_modules is a catastrophic regex loads (by its recorded layer
    names); a PEFT folder with that regex as target_modules imports (targets come from its tensors), and
    with it as a rank_pattern / alpha_pattern key is refused naming the key. Names are 100+ characters."""
    out = _run_with_timeout(f"""
        import json, time, torch
        from torch import nn
        import rankwise
        from rankwise.io import metadata_digest
        from safetensors import safe_open
        from safetensors.torch import save_file

        def make():
            torch.manual_seed(0)
            inner = nn.Sequential()
            inner.add_module("fc_" + "a" * 60, nn.Linear(8, 8))
            inner.add_module("fc_" + "b" * 60, nn.Linear(8, 8))
            return nn.ModuleDict({{"block_with_a_rather_long_name_" + "x" * 40: inner}})

        evil = {EVIL!r}
        start = time.perf_counter()
        model = make()
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc_" + "a" * 60]))
        rankwise.save(model, {str(tmp_path / 'a')!r})
        file = {str(tmp_path / 'a' / 'adapter.safetensors')!r}
        with safe_open(file, framework="pt") as f:
            meta = json.loads(f.metadata()["rankwise"]); tensors = {{k: f.get_tensor(k) for k in f.keys()}}
        meta["config"]["target_modules"] = evil
        meta["config"]["exclude_modules"] = evil
        meta["metadata_sha256"] = metadata_digest(meta)
        save_file(tensors, file, metadata={{"rankwise": json.dumps(meta)}})
        loaded = rankwise.load(make(), {str(tmp_path / 'a')!r})
        assert list(rankwise.adapter_layers(loaded)) == list(rankwise.adapter_layers(model))

        rankwise.export_peft(model, {str(tmp_path / 'p')!r})
        cfg_file = {str(tmp_path / 'p' / 'adapter_config.json')!r}
        cfg = json.load(open(cfg_file))
        cfg["target_modules"] = evil
        json.dump(cfg, open(cfg_file, "w"))
        rankwise.import_peft(make(), {str(tmp_path / 'p')!r})
        for field, value in (("rank_pattern", 2), ("alpha_pattern", 4.0)):
            json.dump(dict(cfg, **{{field: {{evil: value}}}}), open(cfg_file, "w"))
            fresh = make()
            try:
                rankwise.import_peft(fresh, {str(tmp_path / 'p')!r})
            except rankwise.AdapterFileError as exc:
                assert field in str(exc) and "regular expression" in str(exc), exc
                assert not rankwise.adapter_layers(fresh)
            else:
                raise AssertionError(field + " regex key was accepted")
        print("ok", time.perf_counter() - start)
    """)
    assert out.startswith("ok")
    assert float(out.split()[1]) < 30.0


def test_plain_pattern_keys_follow_peft_rule() -> None:
    """PEFT's ``(.*\\.)?(key)$`` for plain keys: equal or dotted suffix; ``^key``: equal only; first key wins."""
    from rankwise.peft_format import pattern_value

    pats = {"^fc": 1, "block.fc": 2, "fc": 3}
    assert pattern_value(pats, "fc", 0) == 1
    assert pattern_value(pats, "block.fc", 0) == 2
    assert pattern_value(pats, "other.fc", 0) == 3
    assert pattern_value(pats, "blockfc", 0) == 0  # not a dotted suffix
    assert pattern_value({"fc$": 5}, "a.fc", 0) == 5
    with pytest.raises(rankwise.AdapterFileError, match=r"alpha_pattern key '\.\*fc' is a regular expression"):
        pattern_value({".*fc": 1}, "a.fc", 0, "alpha_pattern")


# ---------------------------------------------------------------------------- 5, 13. malformed or non-finite metadata
def _layer(meta: dict[str, Any], name: str = "fc1") -> dict[str, Any]:
    return meta["layers"][name]


BAD_METADATA: dict[str, tuple[Callable[[dict[str, Any], dict[str, torch.Tensor]], Any], str]] = {
    # case -> (edit, the field the error must name)
    "no layers": (lambda m, t: m.pop("layers"), "'layers'"),
    "layers a list": (lambda m, t: m.__setitem__("layers", list(m["layers"])), "'layers'"),
    "layers empty": (lambda m, t: m.__setitem__("layers", {}), "'layers' is empty"),
    "layer spec a list": (lambda m, t: m["layers"].__setitem__("fc1", [1, 2]), "'layers.fc1'"),
    "rank 0": (lambda m, t: _layer(m).__setitem__("rank", 0), "layers.fc1.rank"),
    "rank negative": (lambda m, t: _layer(m).__setitem__("rank", -4), "layers.fc1.rank"),
    "rank a string": (lambda m, t: _layer(m).__setitem__("rank", "4"), "layers.fc1.rank"),
    "rank a float": (lambda m, t: _layer(m).__setitem__("rank", 4.5), "layers.fc1.rank"),
    "rank larger than the layer": (lambda m, t: _layer(m).__setitem__("rank", 13), "layers.fc1.rank"),
    "rank not the tensors' rank": (lambda m, t: _layer(m).__setitem__("rank", 3), "'layers.fc1.rank' = 3"),
    "no rank": (lambda m, t: _layer(m).pop("rank"), "'rank'"),
    "scale NaN": (lambda m, t: _layer(m).__setitem__("scale", float("nan")), "layers.fc1.scale"),
    "scale inf": (lambda m, t: _layer(m).__setitem__("scale", float("inf")), "layers.fc1.scale"),
    "scale negative": (lambda m, t: _layer(m).__setitem__("scale", -2.0), "layers.fc1.scale"),
    "scale a string": (lambda m, t: _layer(m).__setitem__("scale", "2"), "layers.fc1.scale"),
    "in_features a float": (lambda m, t: _layer(m).__setitem__("in_features", 12.0), "layers.fc1.in_features"),
    "out_features a bool": (lambda m, t: _layer(m).__setitem__("out_features", True), "layers.fc1.out_features"),
    "conv1d a string": (lambda m, t: _layer(m).__setitem__("conv1d", "no"), "layers.fc1.conv1d"),
    "fingerprint NaN": (lambda m, t: _layer(m)["base_fingerprint"].__setitem__(0, float("nan")), "base_fingerprint[0]"),
    "base_quant unknown": (lambda m, t: _layer(m).__setitem__("base_quant", "3bit"), "layers.fc1.base_quant"),
    "base_quant_block 0": (lambda m, t: _layer(m).__setitem__("base_quant_block", 0), "layers.fc1.base_quant_block"),
    "modules_to_save a string": (lambda m, t: m.__setitem__("modules_to_save", "head"), "'modules_to_save'"),
    "method_state a list": (lambda m, t: m.__setitem__("method_state", [1]), "'method_state'"),
    "method_state counter negative": (lambda m, t: m.__setitem__("method_state", {"link_step": -3}), "method_state.link_step"),
    "method_state NaN": (lambda m, t: m.__setitem__("method_state", {"x": float("nan")}), "method_state.x"),
    "method_state nested": (lambda m, t: m.__setitem__("method_state", {"x": {"y": 1}}), "method_state.x"),
    "config a list": (lambda m, t: m.__setitem__("config", [1]), "'config'"),
    "config r 0": (lambda m, t: m["config"].__setitem__("r", 0), "r must be a positive integer"),
    "config alpha NaN": (lambda m, t: m["config"].__setitem__("alpha", float("nan")), "alpha must be a positive finite"),
    "metadata a list": (lambda m, t: [m], "must be a JSON object"),
    "no method": (lambda m, t: m.pop("method"), "'method'"),
    "a layer not in the model": (lambda m, t: m["layers"].__setitem__("fc9", dict(_layer(m))), "fc9"),
    "NaN in an adapter tensor": (lambda m, t: t["fc1.lora_a"].__setitem__((0, 0), float("nan")), "fc1.lora_a"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_malformed_metadata_is_an_adapter_file_error(case: str, mlp_case: ModelCase, tmp_path) -> None:
    edit, field = BAD_METADATA[case]
    path = _saved(mlp_case, tmp_path)
    _rewrite(path, edit)
    model = mlp_case.make()
    snap = _snapshot(model)
    with pytest.raises(rankwise.AdapterFileError) as info:
        rankwise.load(model, path)
    assert field in str(info.value), str(info.value)
    _assert_unchanged(model, snap)


def test_metadata_is_covered_by_the_checksum(mlp_case: ModelCase, tmp_path) -> None:
    """An edited scale (finite, so valid) without a matching digest is corruption; a file without the
    digest (written before it existed) still loads and computes what it did."""
    path = _saved(mlp_case, tmp_path)
    ref = rankwise.load(mlp_case.make(), path)
    _rewrite(path, lambda m, t: _layer(m).__setitem__("scale", 3.0), redigest=False)
    model = mlp_case.make()
    snap = _snapshot(model)
    with pytest.raises(rankwise.AdapterFileError, match="description's checksum does not match"):
        rankwise.load(model, path)
    _assert_unchanged(model, snap)

    path = _saved(mlp_case, tmp_path / "old")
    _rewrite(path, lambda m, t: m.pop("metadata_sha256"), redigest=False)
    old = rankwise.load(mlp_case.make(), path)
    batch = mlp_case.batch(0)
    torch.testing.assert_close(mlp_case.output(old, batch), mlp_case.output(ref, batch), rtol=0, atol=0)


def test_bad_safetensors_header_is_an_adapter_file_error(mlp_case: ModelCase, tmp_path) -> None:
    path = _saved(mlp_case, tmp_path)
    (path / "adapter.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    with pytest.raises(rankwise.AdapterFileError, match="truncated or corrupt"):
        rankwise.load(mlp_case.make(), path)
    model = mlp_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"]))
    rankwise.export_peft(model, tmp_path / "p")
    (tmp_path / "p" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    fresh = mlp_case.make()
    snap = _snapshot(fresh)
    with pytest.raises(rankwise.AdapterFileError, match="adapter_model.safetensors is truncated or corrupt"):
        rankwise.import_peft(fresh, tmp_path / "p")
    _assert_unchanged(fresh, snap)


# ---------------------------------------------------------------------------- 5, 13. malformed PEFT configs
def _peft_folder(case: ModelCase, tmp_path: Path) -> Path:
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]))
    return rankwise.export_peft(model, tmp_path / "peft")


BAD_PEFT: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "no r": (lambda c: c.pop("r"), "'r'"),
    "r 0": (lambda c: c.__setitem__("r", 0), "'r'"),
    "r negative": (lambda c: c.__setitem__("r", -4), "'r'"),
    "r a string": (lambda c: c.__setitem__("r", "4"), "'r'"),
    "no lora_alpha": (lambda c: c.pop("lora_alpha"), "'lora_alpha'"),
    "lora_alpha NaN": (lambda c: c.__setitem__("lora_alpha", float("nan")), "'lora_alpha'"),
    "lora_alpha 0": (lambda c: c.__setitem__("lora_alpha", 0), "'lora_alpha'"),
    "alpha_pattern NaN": (lambda c: c.__setitem__("alpha_pattern", {"fc1": float("nan")}), "alpha_pattern['fc1']"),
    "alpha_pattern inf": (lambda c: c.__setitem__("alpha_pattern", {"fc1": float("inf")}), "alpha_pattern['fc1']"),
    "rank_pattern 0": (lambda c: c.__setitem__("rank_pattern", {"fc1": 0}), "rank_pattern['fc1']"),
    "rank_pattern a list": (lambda c: c.__setitem__("rank_pattern", ["fc1"]), "'rank_pattern'"),
    "lora_dropout 1.5": (lambda c: c.__setitem__("lora_dropout", 1.5), "'lora_dropout'"),
    "use_dora a string": (lambda c: c.__setitem__("use_dora", "yes"), "'use_dora'"),
    "modules_to_save a number": (lambda c: c.__setitem__("modules_to_save", 3), "'modules_to_save'"),
    "config a list": (lambda c: [c], "must hold a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_PEFT))
def test_malformed_peft_config_is_an_adapter_file_error(case: str, mlp_case: ModelCase, tmp_path) -> None:
    edit, field = BAD_PEFT[case]
    folder = _peft_folder(mlp_case, tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    new = edit(cfg)
    (folder / "adapter_config.json").write_text(json.dumps(cfg if new is None or not isinstance(new, list) else new))
    model = mlp_case.make()
    snap = _snapshot(model)
    with pytest.raises(rankwise.AdapterFileError) as info:
        rankwise.import_peft(model, folder)
    assert field in str(info.value), str(info.value)
    _assert_unchanged(model, snap)


def test_peft_config_not_json_and_nan_tensor(mlp_case: ModelCase, tmp_path) -> None:
    folder = _peft_folder(mlp_case, tmp_path)
    good = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text("{r: 4")
    with pytest.raises(rankwise.AdapterFileError, match="not valid JSON"):
        rankwise.import_peft(mlp_case.make(), folder)
    (folder / "adapter_config.json").write_text(good)
    tensors = {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("fc2.lora_B.weight"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    model = mlp_case.make()
    snap = _snapshot(model)
    with pytest.raises(rankwise.AdapterFileError, match=r"fc2\.lora_B\.weight.*NaN/inf"):
        rankwise.import_peft(model, folder)
    _assert_unchanged(model, snap)


# ---------------------------------------------------------------------------- 6. DoRA/EDoRA on an all-zero weight row
@pytest.mark.parametrize("method", ["dora", "edora", "edora-random"])
def test_zero_weight_row_stays_the_base_output(method: str, mlp_case: ModelCase) -> None:
    """A pruned row (all-zero ``W0`` row): no NaN at init, after a training step, or merged; the row's
    output stays the base's (its bias) exactly, the other rows are those of the unpruned-row layer."""
    base = mlp_case.make()
    with torch.no_grad():
        base.fc2.weight[5].zero_()
    batch = mlp_case.batch(0)
    h = torch.tanh(base.fc1(batch["x"]))  # fc2's input
    base_out = base.fc2(h)
    model = mlp_case.make()
    with torch.no_grad():
        model.fc2.weight[5].zero_()
    cfg, cal = METHOD_CASES[method].make(mlp_case, False)
    rankwise.attach(model, cfg, calibration=cal)
    out = model.fc2(h)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 5], base_out[:, 5])  # exactly the bias
    if METHOD_CASES[method].identity_at_init:
        torch.testing.assert_close(out, base_out, rtol=1e-5, atol=1e-6)
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.1)
    model(**batch).loss.backward()
    rankwise.check_finite_grads(model)
    opt.step()
    rankwise.step(model, opt)  # its finiteness check passes (random factors may now move the row: it trains)
    out = model.fc2(h)
    assert torch.isfinite(out).all()
    rankwise.merge(model)
    torch.testing.assert_close(model.fc2(h), out, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- 7. GoRA's data-dependent init
def _gora(**kw: Any) -> rankwise.GoraConfig:
    return rankwise.GoraConfig(r_ref=2, r_min=1, r_max=4, alpha=8, n_steps=2, target_modules=["fc1", "fc2"], seed=0, **kw)


@pytest.mark.parametrize(
    "cfg, scale, message",
    [
        (dict(gamma=1e300), 1.0, r"GoRA layer 'fc1': GoRA's initial B is not finite.*gamma=1e\+300"),
        (dict(), 1e39, r"non-finite gradient \(NaN/inf\) for layer 'fc1'"),
        (dict(gamma=1e30), 1e30, r"GoRA layer 'fc1': GoRA's initial B is not finite"),
    ],
    ids=["huge-gamma", "overflowing-loss", "large-loss-and-gamma"],
)
def test_gora_non_finite_init_names_the_layer(cfg: dict[str, Any], scale: float, message: str, mlp_case: ModelCase) -> None:
    model = mlp_case.make()
    model.head.weight.requires_grad_(False)  # a custom flag that must survive the failure
    snap = _snapshot(model)
    batches = [mlp_case.batch(i) for i in range(2)]
    with pytest.raises(FloatingPointError, match=message):
        rankwise.attach(model, _gora(**cfg), calibration=batches, loss_fn=lambda m, b: m(**b).loss * scale)
    _assert_unchanged(model, snap)


def test_gora_importance_overflow_is_named() -> None:
    """Step 2 directly: a finite gradient whose importance overflows fp32 raises naming the layer."""
    from rankwise.methods.gora import importances

    layer = nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight.fill_(1e30)
    with pytest.raises(FloatingPointError, match=r"importance of layer 'big'"):
        importances({"big": layer}, {"big": torch.full((8, 8), 1e30)}, "mean_abs_wg")


def test_gora_shares_survive_a_sum_that_overflows() -> None:
    from rankwise.methods.gora import importance_shares

    shares = importance_shares({"a": 3e38, "b": 3e38, "c": 0.0})
    assert shares == {"a": 0.5, "b": 0.5, "c": 0.0}


# ---------------------------------------------------------------------------- 8. RAC-LoRA and the wrong optimizer
@pytest.mark.parametrize("method", ["raclora", "raclora-b", "cola"])
def test_raclora_refuses_an_optimizer_without_its_parameters(method: str, mlp_case: ModelCase) -> None:
    model = mlp_case.make()
    cfg, _ = METHOD_CASES[method].make(mlp_case, False)
    rankwise.attach(model, cfg)
    real = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    model(**mlp_case.batch(0)).loss.backward()
    real.step()
    other_model = mlp_case.make()
    rankwise.attach(other_model, cfg)
    other = torch.optim.Adam(rankwise.trainable_parameters(other_model).values(), lr=1e-2)
    state = get_state(model)
    before = ({k: v.clone() for k, v in model.state_dict().items()}, state.step, dict(state.method_state),
              {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in real.state.items()})
    for call in (lambda: rankwise.step(model, other), lambda: rankwise.end_link(model, other)):
        with pytest.raises(ValueError, match=r"does not hold adapter parameter 'fc1\.lora_[ab]'|does not hold adapter parameter fc1\.lora_[ab]"):
            call()
        assert state.step == before[1] and state.method_state == before[2]
        for k, v in before[0].items():
            assert torch.equal(model.state_dict()[k], v), k
        assert {id(p) for p in real.state} == set(before[3])  # the real optimizer's moments untouched
    rankwise.step(model, real)  # the right optimizer still works
    assert state.step == before[1] + 1


# ---------------------------------------------------------------------------- 9. all or nothing
def test_attach_failure_restores_every_flag() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    mlp[2].bias.requires_grad_(False)  # a custom pattern, kept exactly
    snap = _snapshot(mlp)
    for cfg in (rankwise.LoraConfig(r=2, target_modules=["0", "4"]), rankwise.DoraConfig(r=2, target_modules=["0", "4"]),
                rankwise.EdoraConfig(r=2, target_modules=["0", "4"]), rankwise.RacLoraConfig(r=2, target_modules=["0", "4"])):
        with pytest.raises(ValueError, match=r"rank 2 is larger than this layer's dimensions \(out=1"):
            rankwise.attach(mlp, cfg)
        _assert_unchanged(mlp, snap)
        assert mlp[0].weight.requires_grad and mlp[0].bias.requires_grad


def test_load_and_import_failures_after_building_restore_the_model(mlp_case: ModelCase, tmp_path) -> None:
    """Failures found only after the layers were built (a stray tensor in the file, a PEFT lora_B of the
    wrong shape on the second layer): every flag, module and fully-trained module is as before."""
    path = _saved(mlp_case, tmp_path)
    _rewrite(path, lambda m, t: t.__setitem__("fc2.extra", torch.zeros(2)))
    model = mlp_case.make()
    model.fc1.bias.requires_grad_(False)
    snap = _snapshot(model)
    with pytest.raises(rankwise.AdapterFileError, match="tensors this method does not use"):
        rankwise.load(model, path)
    _assert_unchanged(model, snap)

    folder = _peft_folder(mlp_case, tmp_path)
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("fc2.lora_B.weight"))
    tensors[key] = torch.zeros(15, 4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"fc2\.lora_B has shape \(15, 4\)"):
        rankwise.import_peft(model, folder)
    _assert_unchanged(model, snap)


# ---------------------------------------------------------------------------- 10. dtype changes after attach
@pytest.mark.parametrize("method", list(METHOD_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_forward_follows_the_models_dtype(method: str, dtype: torch.dtype, mlp_case: ModelCase) -> None:
    model = mlp_case.make()
    cfg, cal = METHOD_CASES[method].make(mlp_case, True)
    rankwise.attach(model, cfg, calibration=cal)
    with torch.no_grad():  # a trained-looking adapter: every tensor non-zero
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    batch = mlp_case.batch(0)
    ref = mlp_case.output(model, batch)
    model.to(dtype)
    for layer in rankwise.adapter_layers(model).values():
        assert layer.adapter_dtype == dtype
    out = mlp_case.output(model, {"x": batch["x"].to(dtype), "labels": batch["labels"]})
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    model(**{"x": batch["x"].to(dtype), "labels": batch["labels"]}).loss.backward()  # and trains
    assert all(p.grad is not None and p.grad.dtype == dtype for p in rankwise.trainable_parameters(model).values())


# ---------------------------------------------------------------------------- 11. compiled and wrapped models
def test_compiled_and_wrapped_models_save_plain_names(mlp_case: ModelCase, tmp_path) -> None:
    model = mlp_case.make()
    cfg, _ = METHOD_CASES["dora"].make(mlp_case, True)
    rankwise.attach(torch.compile(model), cfg)  # attach through the wrapper: the adapter goes on the model inside
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    batch = mlp_case.batch(0)
    ref = mlp_case.output(model, batch)
    for i, wrapped in enumerate((torch.compile(model), nn.DataParallel(model), torch.compile(nn.DataParallel(model)))):
        assert list(rankwise.adapter_layers(wrapped)) == ["fc1", "fc2"]
        rankwise.save(wrapped, tmp_path / f"a{i}")
        meta = json.loads((tmp_path / f"a{i}" / "adapter_config.json").read_text())
        assert sorted(meta["layers"]) == ["fc1", "fc2"] and meta["modules_to_save"] == ["head"]
        loaded = rankwise.load(mlp_case.make(), tmp_path / f"a{i}")
        torch.testing.assert_close(mlp_case.output(loaded, batch), ref, rtol=0, atol=0)
        rankwise.export_peft(wrapped, tmp_path / f"p{i}")
        peft_cfg = json.loads((tmp_path / f"p{i}" / "adapter_config.json").read_text())
        assert peft_cfg["target_modules"] == ["fc1", "fc2"]
        imported = rankwise.import_peft(mlp_case.make(), tmp_path / f"p{i}")
        torch.testing.assert_close(mlp_case.output(imported, batch), ref, rtol=1e-5, atol=1e-6)


def test_ddp_wrapped_model_saves_plain_names(mlp_case: ModelCase, tmp_path) -> None:
    import torch.distributed as dist

    model = mlp_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"], seed=0))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        rankwise.save(ddp, tmp_path / "a")
        rankwise.step(ddp)  # the state is found through the wrapper
    finally:
        dist.destroy_process_group()
    assert list(json.loads((tmp_path / "a" / "adapter_config.json").read_text())["layers"]) == ["fc1"]
    rankwise.load(mlp_case.make(), tmp_path / "a")


# ---------------------------------------------------------------------------- 12. import → save → load of a regex-targeted PEFT adapter


def test_import_save_load_round_trip_of_a_regex_target(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(NestedFc(), peft.LoraConfig(r=2, lora_alpha=4, target_modules="fc", init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path / "peft"))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    want = theirs(x)
    ours = rankwise.import_peft(NestedFc(), tmp_path / "peft")
    assert list(rankwise.adapter_layers(ours)) == ["fc"]  # the regex matched the top-level fc only
    rankwise.save(ours, tmp_path / "rw")
    loaded = rankwise.load(NestedFc(), tmp_path / "rw")
    assert list(rankwise.adapter_layers(loaded)) == ["fc"]
    torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-6)


def test_public_surface_is_core_api_plus_method_extras_at_home() -> None:
    """``__all__`` names only the core API, each resolvable; one method's extras live in its module and
    the old top-level names are those very objects (old code keeps working)."""
    from rankwise.methods import gora, raclora

    assert all(hasattr(rankwise, name) for name in rankwise.__all__)
    extras = {"end_link": raclora, "compress_chain": raclora, "gora_rank_table": gora, "plot_gora_ranks": gora}
    for name, home in extras.items():
        assert name not in rankwise.__all__
        assert getattr(rankwise, name) is getattr(home, name)
