"""Review round 17 (2026-12-05), chains under every driver (docs/reliability.md, that section): RAC-LoRA, COLA and
Asymmetric LoRA trained by the plain loop, Accelerate, HF Trainer's callback and the harness, each against an
independent reference (a chain written in plain PyTorch, or the uninterrupted run)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import rankwise
from conftest import TinyMLP
from rankwise.methods.raclora import RacLoraLinear, end_link
from rankwise_harness import cli
from rankwise_harness.train import finetune
from test_harness_train import Crash, _cfg, crash_at, sst2, tiny_models  # noqa: F401  (module fixtures)

S = 4 / 2  # alpha / r of every chain below


def _batch(i: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 12, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)


def _attached(dtype: torch.dtype = torch.float32, **kw: Any) -> tuple[TinyMLP, TinyMLP]:
    """``(base, adapted copy)``: TinyMLP with a rank-2 chain (alpha 4, seed 3) on fc1 and fc2."""
    torch.manual_seed(0)
    base = TinyMLP().to(dtype)
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.RacLoraConfig(**{"r": 2, "alpha": 4, "target_modules": ["fc1", "fc2"], "seed": 3, **kw}))
    return base, model


def _layers(model: nn.Module, name: str | None = None) -> dict[str, RacLoraLinear]:
    return rankwise.adapter_layers(model, name)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- the plain loop against a plain chain
class _PlainChain:
    """RAC-LoRA / COLA written from the paper in plain PyTorch (fp64): ``h = x (W0 + Σ_τ s B_τ A_τ)ᵀ + b + s x Aᵀ Bᵀ``;
    at a link end ``W_chain += s B A`` and a fresh Adam over the next link's trained factor(s) (the moments of a factor
    trained again carried over with ``keep``). The factors each link starts from (the drawn sketch, zeros) are read
    from the layers: they are the chain's random input, not its arithmetic."""

    def __init__(self, base: TinyMLP, layers: dict[str, RacLoraLinear], train_both: bool, keep: bool) -> None:
        self.base, self.layers, self.train_both, self.keep = base, layers, train_both, keep
        self.chain = {n: torch.zeros_like(getattr(base, n).weight) for n in layers}  # out x in
        self.a: dict[str, Tensor] = {}
        self.b: dict[str, Tensor] = {}
        self.opt = self._start({})

    def _start(self, old: dict[tuple[str, str], dict[str, Tensor]]) -> torch.optim.Adam:
        for n, layer in self.layers.items():
            sketch_a = layer.sampled() == "A"
            self.a[n] = layer.lora_a.detach().clone().requires_grad_(self.train_both or not sketch_a)  # r x in
            self.b[n] = layer.lora_b.detach().clone().requires_grad_(self.train_both or sketch_a)  # out x r
        opt = torch.optim.Adam([t for n in self.layers for t in (self.a[n], self.b[n]) if t.requires_grad], lr=1e-2)
        for (n, k), state in old.items():
            t = self.a[n] if k == "A" else self.b[n]
            if self.keep and t.requires_grad:
                opt.state[t] = {key: v.clone() for key, v in state.items()}
        return opt

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for n in ("fc1", "fc2"):
            lin = getattr(self.base, n)
            h = torch.tanh(h @ (lin.weight + self.chain[n]).t() + lin.bias + S * (h @ self.a[n].t()) @ self.b[n].t())
        return self.base.head(h)

    def step(self, x: Tensor, y: Tensor) -> None:
        nn.functional.cross_entropy(self.forward(x), y).backward()
        self.opt.step()
        self.opt.zero_grad()

    def end_link(self) -> None:
        old = {(n, k): self.opt.state[t] for n in self.layers for k, t in (("A", self.a[n]), ("B", self.b[n]))
               if t.requires_grad and t in self.opt.state}
        for n in self.layers:
            self.chain[n] = self.chain[n] + S * self.b[n].detach() @ self.a[n].detach()
        self.opt = self._start(old)


@pytest.mark.parametrize("kw", [{}, {"frozen": "B"}, {"frozen": "alternate"}, {"train_both": True},
                                {"keep_optimizer_state": True}, {"frozen": "alternate", "keep_optimizer_state": True},
                                {"train_both": True, "frozen": "B", "keep_optimizer_state": True}],
                         ids=["A", "B", "alternate", "cola", "A-keep", "alternate-keep", "cola-B-keep"])
def test_a_chain_trained_by_the_plain_loop_is_the_papers_chain_written_in_plain_pytorch(kw: dict[str, Any]) -> None:
    """10 Adam steps in links of 3: the outputs, and each layer's record ``C_b Cₐ = Σ_τ s B_τ A_τ``, equal the plain
    chain's (fp64, to 1e-12)."""
    base, model = _attached(torch.float64, link_steps=3, **kw)
    layers = _layers(model)
    plain = _PlainChain(base, layers, kw.get("train_both", False), kw.get("keep_optimizer_state", False))
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    for i in range(10):
        x, y = _batch(i, torch.float64)
        model(x, y).loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
        plain.step(x, y)
        if (i + 1) % 3 == 0:
            plain.end_link()
    x, _ = _batch(99, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain.forward(x), rtol=0, atol=1e-12)
    for n, layer in layers.items():
        assert int(layer.links) == 3
        torch.testing.assert_close(layer.chain_delta(), plain.chain[n], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- Accelerate
def _accelerate_run(every_micro_batch: bool) -> TinyMLP:
    from accelerate import Accelerator

    _, model = _attached(link_steps=2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    for i in range(12):  # 12 micro-batches, 3 per update: 4 updates, 2 links
        x, y = _batch(i)
        with accelerator.accumulate(wrapped):
            accelerator.backward(wrapped(x, y).loss)
            optimizer.step()
            optimizer.zero_grad()
        if every_micro_batch or (accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped):
            rankwise.step(accelerator.unwrap_model(wrapped), optimizer)
    return accelerator.unwrap_model(wrapped)


def test_rankwise_step_after_every_accelerate_micro_batch_counts_the_updates_only() -> None:
    """``optimizer.step(); rankwise.step(model, optimizer)`` inside ``accelerator.accumulate`` (the plain loop's two
    lines): Accelerate's ``step`` does nothing on a micro-batch that does not end the accumulation. Before, each such
    call counted: 12 steps and 6 links for 4 updates, links ending mid-accumulation (the factor re-zeroed and the
    gradients of the window so far dropped), every link's weight off by up to 0.068. Now such a call is not counted:
    the run equals the documented loop (``step`` only when ``sync_gradients``) and a plain loop averaging 3 losses."""
    documented, every = _accelerate_run(False), _accelerate_run(True)
    _, plain = _attached(link_steps=2)
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2)
    for update in range(4):
        for i in range(3 * update, 3 * update + 3):
            x, y = _batch(i)
            (plain(x, y).loss / 3).backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(plain, opt)
    for model in (documented, every):
        assert rankwise.step_count(model) == 4
        for n, layer in _layers(model).items():
            assert int(layer.links) == 2
            torch.testing.assert_close(layer.merged_weight(), _layers(plain)[n].merged_weight(), rtol=0, atol=1e-6)
    for a, b in zip(documented.state_dict().values(), every.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- HF Trainer: links by epoch, several adapters
class _Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x, y = _batch(i)
        return {"x": x[0], "labels": y[0]}


def _trainer(model: TinyMLP, out: Path, seen: list[tuple[Tensor, Tensor]], epochs: int = 2) -> Any:
    import transformers

    from rankwise.integrations.hf import RankwiseCallback

    def forward(x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        seen.append((x.clone(), labels.clone()))
        o = TinyMLP.forward(model, x, labels)
        return {"loss": o.loss, "logits": o.logits}

    model.forward = forward  # type: ignore[method-assign]
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, num_train_epochs=epochs, learning_rate=1e-2,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, optim="adamw_torch", report_to=[],
        save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[RankwiseCallback(epochs_per_link=1)])


def _two_adapters(second: str) -> TinyMLP:
    torch.manual_seed(0)
    model = TinyMLP()
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, link_steps=None, target_modules=["fc1"], seed=1), name="chain")
    other = (rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=2) if second == "lora" else
             rankwise.RacLoraConfig.cola(r=2, alpha=4, link_steps=None, target_modules=["fc2"], seed=2))
    rankwise.attach(model, other, name="other")
    rankwise.set_active(model, ["chain", "other"])
    return model


@pytest.mark.parametrize("second", ["lora", "cola"])
def test_epoch_links_on_a_model_with_several_adapters_end_every_active_chain(second: str, tmp_path: Path) -> None:
    """``RankwiseCallback(epochs_per_link=1)`` on a RAC-LoRA chain beside a LoRA (or a COLA chain). Before: the run
    died at the end of epoch 1 (global step 4, the epoch's training lost without a checkpoint) with "this model has 2
    adapters ['chain', 'other']: pass name= to choose one", which the callback cannot take. Now every active chain's
    link ends; the run equals a plain loop over the same batches calling ``end_link(..., name=)`` for each chain."""
    model = _two_adapters(second)
    seen: list[tuple[Tensor, Tensor]] = []
    _trainer(model, tmp_path, seen).train()
    ref = _two_adapters(second)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    chains = ["chain"] + (["other"] if second == "cola" else [])
    for epoch in range(2):
        for x, y in seen[4 * epoch:4 * epoch + 4]:
            ref(x, y).loss.backward()
            opt.step()
            opt.zero_grad()
            rankwise.step(ref, opt)
        for name in chains:
            end_link(ref, opt, name=name)
    for name in chains:
        assert all(int(layer.links) == 2 for layer in _layers(model, name).values())
    mine, theirs = model.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_epochs_per_link_on_a_model_without_a_chain_is_refused_before_training(tmp_path: Path) -> None:
    """Before: a LoRA model with ``epochs_per_link`` trained a whole epoch, then raised "not a RAC-LoRA chain". Now
    ``train()`` is refused at its start: no step taken, the adapter as attached."""
    torch.manual_seed(0)
    model = TinyMLP()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"], seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(model, tmp_path, [])
    with pytest.raises(ValueError, match="not a RAC-LoRA chain"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_end_link_over_several_adapters_checks_every_chain_before_any_ends() -> None:
    """``end_link(model, optimizer)`` with two chains: both end (the outputs unchanged), or, with an optimizer that
    lacks one chain's factors, neither (the refusal names the factor)."""
    model = _two_adapters("cola")
    x, _ = _batch(5)
    with torch.no_grad():
        before = model(x).logits
    chain_only = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad and "fc1" in n])
    with pytest.raises(ValueError, match="does not hold adapter parameter fc2"):
        end_link(model, chain_only)
    assert all(int(layer.links) == 0 for name in ("chain", "other") for layer in _layers(model, name).values())
    end_link(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    assert all(int(layer.links) == 1 for name in ("chain", "other") for layer in _layers(model, name).values())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- LoRA+ on a chain
def test_lora_plus_on_a_chain_that_trains_no_b_is_refused_and_alternate_speeds_up_the_b_links() -> None:
    """LoRA+ gives ``B`` ``ratio · lr``. RAC-LoRA ``frozen="B"`` trains only ``A``: before, the groups put every tensor
    at ``lr`` and the ratio changed nothing, silently. Now refused. ``frozen="A"``: its trained ``B`` at ``ratio · lr``;
    ``alternate``: ``B`` (trained in even links) at ``ratio · lr``, ``A`` (odd links) at ``lr`` (documented)."""
    def lrs(**kw: Any) -> dict[str, float]:
        _, model = _attached(**kw)
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: g["lr"] for g in rankwise.lora_plus_param_groups(model, lr=1e-3, ratio=16)
                for p in g["params"]}

    with pytest.raises(ValueError, match="LoRA\\+ ratio 16 would change nothing.*frozen='B'"):
        lrs(frozen="B")
    _, model = _attached(frozen="B")
    assert rankwise.lora_plus_param_groups(model, lr=1e-3, ratio=1)[0]["lr"] == 1e-3  # ratio 1: nothing to refuse
    assert lrs(frozen="A") == {"fc1.lora_b": 16e-3, "fc2.lora_b": 16e-3}
    assert lrs(frozen="alternate") == {"fc1.lora_a": 1e-3, "fc2.lora_a": 1e-3, "fc1.lora_b": 16e-3, "fc2.lora_b": 16e-3}
    assert lrs(frozen="B", train_both=True)["fc1.lora_b"] == 16e-3  # COLA trains B: LoRA+ as for LoRA


def test_the_harness_refuses_lora_plus_on_a_frozen_b_chain_writing_nothing(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """Before: ``--lora-plus-ratio 16 --set frozen='"B"'`` trained at ``--lr`` while config.json recorded ratio 16."""
    out = tmp_path / "run"
    code = cli.main(["finetune", "--method", "raclora", "--data", sst2, "--model", tiny_models["bert"], "--output",
                     str(out), "--lora-plus-ratio", "16", "--set", 'frozen="B"', "--task", "sst2", "--max-steps", "1",
                     "--batch-size", "8", "--max-length", "32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--lora-plus-ratio 16" in err and "frozen='B'" in err
    assert not out.exists()


# ---------------------------------------------------------------------------- the harness: resume mid-link
def test_a_harness_chain_resumed_mid_link_equals_the_uninterrupted_run(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:  # noqa: F811
    """2 epochs of 3 steps (8 batches, ``--grad-accum 3``: each epoch ends with a short step), links of 3 steps,
    kept Adam moments, sketches alternating, LoRA+ and dropout; killed after step 5 and resumed from the step-4
    checkpoint, one step into the second link: losses and every adapter tensor equal the uninterrupted run's."""
    kw: dict[str, Any] = dict(method="raclora", max_steps=None, epochs=2, grad_accum=3, save_every=2, dropout=0.1,
                              lora_plus_ratio=4.0, overrides={"link_steps": "3", "keep_optimizer_state": "true",
                                                              "frozen": '"alternate"'})
    quiet = dict(show_progress=False, log=lambda _m: None)
    whole = finetune(_cfg(tmp_path / "a", tiny_models, sst2, **kw), **quiet)
    cfg = _cfg(tmp_path / "b", tiny_models, sst2, **kw)
    with pytest.raises(Crash):
        finetune(cfg, hook=crash_at(5), **quiet)
    assert (Path(cfg.output) / "checkpoints" / "LATEST").read_text() == "step-0000004"
    resumed = finetune(cfg, resume=True, **quiet)
    assert whole["steps"] == 6 and resumed["losses"] == whole["losses"]
    a = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter.safetensors"))
    b = load_file(str(Path(cfg.output) / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {int(v) for k, v in a.items() if k.endswith(".links")} == {2}
    assert json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())["steps"] == 6
