"""RAC-LoRA's chain machinery: exact merges, resets, the sketch distribution, export, save/load, distributed."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

import rankwise
from conftest import ModelCase, TinyMLP
from rankwise.methods.raclora import RacLoraLinear
from rankwise.state import get_state


def _model(frozen: str = "A", link_steps: int | None = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyMLP()
    cfg = rankwise.RacLoraConfig(r=2, alpha=4, link_steps=link_steps, frozen=frozen, target_modules=["fc1", "fc2"], seed=3, **kw)
    rankwise.attach(model, cfg)
    return model


def _batch(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randn(8, 12, generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for i in steps:
        model(**_batch(i)).loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)


def _layers(model: torch.nn.Module) -> dict[str, RacLoraLinear]:
    return rankwise.adapter_layers(model)  # type: ignore[return-value]


@pytest.mark.parametrize("frozen", ["A", "B", "alternate"])
def test_link_end_keeps_function_resets_state_and_zeroes_trained_factor(frozen: str) -> None:
    model = _model(frozen, link_steps=None)
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    for link in range(3):
        _train(model, opt, range(10 * link, 10 * link + 2))
        x = _batch(99)["x"]
        with torch.no_grad():
            before = model(x).logits
            deltas = {n: layer.delta_weight() for n, layer in _layers(model).items()}
        sampled = {n: layer.sampled() for n, layer in _layers(model).items()}
        rankwise.end_link(model, opt)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-6)
        for name, layer in _layers(model).items():
            torch.testing.assert_close(layer.delta_weight(), deltas[name], rtol=1e-5, atol=1e-6)
            assert int(layer.links) == link + 1
            trained = layer.lora_b if layer.sampled() == "A" else layer.lora_a
            assert not trained.any(), "the trained factor must start each link at zero"
            for p in (layer.lora_a, layer.lora_b):
                assert p not in opt.state, "optimizer state leaked across a link"
                assert p.grad is None
            assert layer.chain_a.shape[0] == 2 * (link + 1)
            if frozen == "alternate":
                assert layer.sampled() != sampled[name]
            else:
                assert layer.sampled() == frozen


def test_link_steps_counts_and_parameters_are_never_replaced() -> None:
    model = _model("A", link_steps=3)
    ids = {n: id(p) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(rankwise.trainable_parameters(model).values(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    sketch0 = {n: layer.lora_a.clone() for n, layer in _layers(model).items()}
    for i in range(7):
        _train(model, opt, range(i, i + 1))
        sched.step()
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    for name, layer in _layers(model).items():
        assert int(layer.links) == 2  # links ended after steps 3 and 6
        assert not torch.equal(layer.lora_a, sketch0[name]), "the sketch was not resampled"
        assert not layer.lora_a.requires_grad and layer.lora_b.requires_grad


def test_sketch_projection_expectation_is_r_over_n() -> None:
    """E[H_A] = (r/n) I for Gaussian A (r x n), H_A = Aᵀ(AAᵀ)⁺A: checked by Monte Carlo on the layer's own sketches."""
    n, r, draws = 12, 3, 3000
    base = torch.nn.Linear(n, 8)
    cfg = rankwise.RacLoraConfig(r=r, target_modules=["x"], seed=0)
    layer = RacLoraLinear(base, cfg, r, seed=5)
    total = torch.zeros(n, n, dtype=torch.float64)
    for t in range(draws):
        layer.links.fill_(t)
        layer.init_link()
        a = layer.lora_a.double()  # r x n
        total += a.t() @ torch.linalg.pinv(a @ a.t()) @ a
    mean = total / draws
    torch.testing.assert_close(mean, (r / n) * torch.eye(n, dtype=torch.float64), rtol=0, atol=0.03)
    # and the default scale makes the sketch's rows nearly orthonormal: E[AAᵀ] = I
    layer.links.fill_(0)
    layer.init_link()
    assert abs(float((layer.lora_a @ layer.lora_a.t()).diagonal().mean()) - 1.0) < 0.6


def test_export_is_the_accumulated_delta_and_loads_in_peft(mlp_case: ModelCase, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    base = mlp_case.make()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, link_steps=2, target_modules=["fc1", "fc2"], seed=1))
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=5e-2)
    _train(model, opt, range(5))  # two merged links and half a third
    for layer in _layers(model).values():
        f = layer.peft_factors()
        assert f.lora_a.shape[0] == 3 * 2
        torch.testing.assert_close(f.scale * f.lora_b @ f.lora_a, layer.delta_weight(), rtol=1e-5, atol=1e-6)
    rankwise.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = mlp_case.batch(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)


def test_compress_chain_reports_svd_error() -> None:
    model = _model("A", link_steps=1)
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=5e-2)
    _train(model, opt, range(6))
    deltas = {n: layer.delta_weight().detach() for n, layer in _layers(model).items()}
    errors = rankwise.compress_chain(model, 3)
    for name, layer in _layers(model).items():
        s = torch.linalg.svdvals(deltas[name])
        expected = float(torch.linalg.norm(s[3:]) / torch.linalg.norm(s))
        assert abs(errors[name] - expected) < 1e-4
        got = float(torch.linalg.norm(layer.delta_weight() - deltas[name]) / torch.linalg.norm(deltas[name]))
        assert abs(got - expected) < 1e-4 and layer.peft_factors().lora_a.shape[0] == 3


def test_cola_and_asymmetric_are_one_flag_apart() -> None:
    cola = rankwise.RacLoraConfig.cola(r=2, target_modules=["fc1"])
    asym = rankwise.RacLoraConfig.asymmetric(r=2, target_modules=["fc1"])
    assert cola.replace(train_both=False) == rankwise.RacLoraConfig(r=2, target_modules=["fc1"])
    assert asym.replace(chain=True) == rankwise.RacLoraConfig(r=2, target_modules=["fc1"])
    torch.manual_seed(0)
    m = TinyMLP()
    rankwise.attach(m, cola)
    layer = _layers(m)["fc1"]
    assert layer.lora_a.requires_grad and layer.lora_b.requires_grad  # COLA trains both
    torch.manual_seed(0)
    m2 = TinyMLP()
    rankwise.attach(m2, asym.replace(link_steps=1))
    opt = torch.optim.SGD(rankwise.trainable_parameters(m2).values(), lr=0.1)
    _train(m2, opt, range(3))
    assert int(_layers(m2)["fc1"].links) == 0  # asymmetric: one link, never merged
    with pytest.raises(ValueError, match="chain=False"):
        rankwise.end_link(m2, opt)


def test_bad_config_and_missing_optimizer() -> None:
    with pytest.raises(ValueError, match="frozen"):
        rankwise.RacLoraConfig(frozen="C", target_modules=["fc1"])
    with pytest.raises(ValueError, match="link_steps"):
        rankwise.RacLoraConfig(link_steps=0, target_modules=["fc1"])
    with pytest.raises(ValueError, match="sketch_scale"):
        rankwise.RacLoraConfig(sketch_scale=-1.0, target_modules=["fc1"])
    model = _model("A", link_steps=1)
    with pytest.raises(ValueError, match="optimizer"):
        rankwise.step(model)


def test_save_load_mid_chain_then_continue_matches_uninterrupted(tmp_path) -> None:
    model = _model("alternate", link_steps=3)
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    _train(model, opt, range(4))  # mid-link (one link merged, one step into the next)
    rankwise.save(model, tmp_path / "a")
    opt_state = copy.deepcopy(opt.state_dict())
    torch.manual_seed(0)
    fresh = TinyMLP()
    rankwise.load(fresh, tmp_path / "a")
    opt2 = torch.optim.Adam(rankwise.trainable_parameters(fresh).values(), lr=1e-2)
    opt2.load_state_dict(opt_state)
    _train(model, opt, range(4, 11))
    _train(fresh, opt2, range(4, 11))
    x = _batch(50)["x"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1


def test_hf_callback_counts_optimizer_steps_under_accumulation(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from rankwise.integrations.hf import RankwiseCallback

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            b = _batch(i)
            return {"x": b["x"][0], "labels": b["labels"][0]}

    model = _model("A", link_steps=2)

    def forward(x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = TinyMLP.forward(model, x, labels)
        return {"loss": out.loss, "logits": out.logits}

    model.forward = forward  # type: ignore[method-assign]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[RankwiseCallback()])
    trainer.train()
    assert get_state(model).step == 4  # optimizer steps, not the 8 micro-batches
    assert all(int(layer.links) == 2 for layer in _layers(model).values())


def _dist_worker(rank: int, world: int, folder: str) -> None:
    from dist_teardown import join, leave

    join(rank, world, os.path.join(folder, "init"))
    torch.manual_seed(100 + rank)  # different global RNG per rank: the chain's seed must still agree
    model = TinyMLP()
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, link_steps=2, target_modules=["fc1", "fc2"]))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    for i in range(5):
        b = _batch(10 * i + rank)
        ddp(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(folder, f"rank{rank}.pt"))
    del ddp, opt  # the reducer holds the group: freed before it is destroyed
    leave()


@pytest.mark.slow  # ~10 s on 2 shared cores (process start-up); run with -m slow
def test_two_gloo_processes_build_identical_chains(tmp_path) -> None:
    mp.spawn(_dist_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    s0, s1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert int(s0["fc1.links"]) == 2 and s0["fc1.chain_a"].shape[0] == 4
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


def test_load_state_dict_takes_a_grown_chain_into_a_fresh_attached_model() -> None:
    """What HF Trainer's resume and the FSDP2 save recipe do: ``load_state_dict`` of a trained chain into a
    model attached anew (empty chain record) gives the same model, tensor for tensor."""
    model = _model("B", link_steps=2)
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    _train(model, opt, range(5))  # two links merged
    assert all(layer.chain_a.shape[0] == 4 for layer in _layers(model).values())
    fresh = _model("B", link_steps=2)
    assert all(layer.chain_a.shape[0] == 0 for layer in _layers(fresh).values())
    fresh.load_state_dict(model.state_dict())
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    with pytest.raises(RuntimeError, match="size mismatch for fc1.lora_b"):  # other shapes are still checked
        bad = {k: (v[:, :1] if k == "fc1.lora_b" else v) for k, v in model.state_dict().items()}
        _model("B", link_steps=2).load_state_dict(bad)


def test_a_link_end_on_flattened_shards_is_refused_before_anything_changes() -> None:
    """FSDP1 (``use_orig_params=True``) leaves each parameter as this rank's flat shard outside its forward:
    a link end there is refused with the fix named, and no layer's chain changes."""
    model = _model("A", link_steps=None)
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    _train(model, opt, range(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = _layers(model)["fc2"]
    full = layer.lora_b.data
    layer.lora_b.data = full.reshape(-1)[: full.numel() // 2]  # what FSDP1 leaves on one of two ranks
    with pytest.raises(RuntimeError, match="summon_full_params"):
        rankwise.end_link(model, opt)
    layer.lora_b.data = full
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_one_cola_link_is_lora_with_a_gaussian_a() -> None:
    """Until its first link ends, COLA (both factors trained, A Gaussian, B zero) is exactly a LoRA whose A was
    initialised with the same Gaussian: same outputs and the same Adam trajectory. What separates the two over a
    run is only what happens at link ends (merge, re-zeroed B, a new Gaussian A, Adam's state dropped) and the
    init scale (Gaussian σ² = 1/in against LoRA's Kaiming-uniform 1/(3 in))."""
    cola = _model(link_steps=None, train_both=True)
    torch.manual_seed(0)
    lora = TinyMLP()
    rankwise.attach(lora, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name, layer in rankwise.adapter_layers(lora).items():
            src = _layers(cola)[name]
            layer.lora_a.copy_(src.lora_a)  # the COLA link's Gaussian A, r x in
            assert not src.lora_b.any() and not layer.lora_b.any()
            assert layer.scale == src.scale
    opts = [torch.optim.Adam(rankwise.trainable_parameters(m).values(), lr=1e-2) for m in (cola, lora)]
    x = _batch(99)["x"]
    for i in range(5):
        for m, opt in zip((cola, lora), opts):
            m(**_batch(i)).loss.backward()
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(cola(x).logits, lora(x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", ["A", "B"])
def test_dropout_acts_on_the_current_link_only_not_on_the_merged_chain(frozen: str) -> None:
    """A merged link is part of ``W`` (paper: ``W ← W + s B_t A_t``): in training with dropout the layer computes
    ``x (W0 + C_b Cₐ)ᵀ + b + s · dropout(x) A_tᵀ B_tᵀ`` (its docstring's form; LoRA's dropout on the trained
    path only), the chain's term on the undropped input. Checked against that closed form under one dropout mask."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12).double()
    cfg = rankwise.RacLoraConfig(r=2, alpha=4, dropout=0.5, frozen=frozen, seed=0)
    layer = RacLoraLinear(base, cfg, 2, seed=0).double()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # two merged links, then a current link with both factors non-zero
        with torch.no_grad():
            (layer.lora_b if frozen == "A" else layer.lora_a).normal_(0, 0.5, generator=g)
        layer.end_link()
    with torch.no_grad():
        (layer.lora_b if frozen == "A" else layer.lora_a).normal_(0, 0.5, generator=g)
    layer.train()
    x = torch.randn(5, 16, dtype=torch.float64, generator=g)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    x_d = torch.nn.functional.dropout(x, 0.5, training=True)  # the same mask
    with torch.no_grad():
        w = base.weight + layer.chain_b @ layer.chain_a  # out x in: W0 with the chain merged in
        expected = x @ w.t() + base.bias + layer.scale * (x_d @ layer.lora_a.t()) @ layer.lora_b.t()
    torch.testing.assert_close(y.detach(), expected, rtol=1e-12, atol=1e-12)
    layer.eval()  # no dropout: the plain sum
    torch.testing.assert_close(layer(x).detach(), x @ layer.merged_weight().t() + base.bias, rtol=1e-12, atol=1e-12)


def test_a_refactored_chain_keeps_an_fp64_layers_precision() -> None:
    """Once the chain's rank would pass ``min(in, out)`` it is re-factored by an SVD, losslessly: the record's
    product stays ``Σ_t s B_t A_t`` to the layer's own precision (here fp64, so a link end never moves the
    function by more than fp64 rounding)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 6).double()
    layer = RacLoraLinear(base, rankwise.RacLoraConfig(r=2, alpha=4, seed=0), 2, seed=0)
    g = torch.Generator().manual_seed(0)
    expected = torch.zeros(6, 10, dtype=torch.float64)
    for _ in range(5):  # chain rank 2, 4, 6, then re-factored at 6 = min(in, out)
        with torch.no_grad():
            layer.lora_b.copy_(torch.randn(6, 2, generator=g, dtype=torch.float64))
        expected += layer.scale * layer.lora_b.detach() @ layer.lora_a
        layer.end_link()
    assert layer.chain_a.shape[0] == 6 and layer.chain_a.dtype == torch.float64
    torch.testing.assert_close(layer.chain_delta(), expected, rtol=1e-12, atol=1e-12)
