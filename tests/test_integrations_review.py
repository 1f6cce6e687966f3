"""Integrations review (2026-12-04): HF Trainer's callback, against an uninterrupted run as the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyMLP, run_python

import rankwise
from rankwise.state import get_state

transformers = pytest.importorskip("transformers")


class _DictMLP(TinyMLP):
    """TinyMLP returning a dict, as ``Trainer`` expects of a model's output."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:  # type: ignore[override]
        out = super().forward(x, labels)
        return {"loss": out.loss, "logits": out.logits}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _epoch_chain_run(out: Path, epochs_per_link: int, resume: Path | None) -> torch.nn.Module:
    """4 epochs of 4 optimizer steps (2 micro-batches each), a checkpoint every 2 steps; links end by epoch."""
    from rankwise.integrations.hf import RankwiseCallback

    torch.manual_seed(0)
    model = _DictMLP()
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, link_steps=None, target_modules=["fc1", "fc2"], seed=3))
    args = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        save_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", seed=0, report_to=[], logging_strategy="no",
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(16),
                                   callbacks=[RankwiseCallback(epochs_per_link=epochs_per_link)])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model


@pytest.mark.parametrize(("epochs_per_link", "checkpoint"), [(2, 4), (2, 6), (1, 4)],
                         ids=["every-2-epochs-from-an-epoch-end", "every-2-epochs-from-mid-epoch", "every-epoch-from-an-epoch-end"])
def test_epoch_links_resume_like_the_uninterrupted_run(epochs_per_link: int, checkpoint: int, tmp_path: Path) -> None:
    """``RankwiseCallback(epochs_per_link=k)`` resumed from a step checkpoint (at an epoch's last step, or mid-epoch)
    ends its links at the epochs the uninterrupted run does: the same chain, counters and tensors. The callback
    counted epochs itself from 0 in each ``train()``, so a resumed run ended links k epochs after the resume; and a
    checkpoint at an epoch's last step was written before that epoch's link end, which the resumed run never did."""
    from rankwise.io import adapter_tensors

    whole = _epoch_chain_run(tmp_path / "whole", epochs_per_link, None)
    resumed = _epoch_chain_run(tmp_path / "resumed", epochs_per_link, tmp_path / "whole" / f"checkpoint-{checkpoint}")
    links = 4 // epochs_per_link
    assert get_state(whole).step == 16 and get_state(whole).method_state["links"] == links  # one link per k epochs
    assert all(int(layer.links) == links for layer in rankwise.adapter_layers(whole).values())
    assert (get_state(resumed).step, get_state(resumed).method_state) == (get_state(whole).step, get_state(whole).method_state)
    expected, got = adapter_tensors(whole), adapter_tensors(resumed)
    assert expected.keys() == got.keys()
    for key, t in expected.items():
        assert torch.equal(got[key], t), key


@pytest.mark.parametrize("adapters", [1, 2])
def test_a_state_dict_inside_disabled_differs_from_the_adapted_one_and_loads_back(adapters: int) -> None:
    """Inside ``rankwise.disabled`` the model computes its base: its state_dict says so (TRL keys its reference
    log-prob cache by a hash of the state_dict), differing from the adapted model's in ``rankwise_state`` only;
    loaded back it restores the same tensors and counters, and disables nothing."""
    torch.manual_seed(0)
    model = TinyMLP()
    for i in range(adapters):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"], seed=i), name=None if i == 0 else "other")
    get_state(model, "default").step = 3
    adapted = model.state_dict()
    with rankwise.disabled(model):
        inside = model.state_dict()
    assert adapted.keys() == inside.keys() and not torch.equal(adapted["rankwise_state"], inside["rankwise_state"])
    assert all(torch.equal(adapted[k], inside[k]) for k in adapted if k != "rankwise_state")
    get_state(model, "default").step = 0
    model.load_state_dict(inside)
    assert get_state(model, "default").step == 3 and not any(layer.disabled for layer in rankwise.adapter_layers(model, "default").values())
    assert torch.equal(model.state_dict()["rankwise_state"], adapted["rankwise_state"])


def test_the_dotted_path_to_the_callback_works_after_a_bare_import() -> None:
    """``rankwise.integrations.hf.RankwiseCallback`` resolves after ``import rankwise`` alone (PEP 562 on first
    use), to the class ``from rankwise.integrations.hf import RankwiseCallback`` gives, while the bare import still
    imports neither the integrations nor transformers; a name that is not there is still an AttributeError."""
    code = (
        "import sys, rankwise\n"
        "assert 'transformers' not in sys.modules and 'rankwise.integrations' not in sys.modules\n"
        "cls = rankwise.integrations.hf.RankwiseCallback\n"
        "from rankwise.integrations.hf import RankwiseCallback\n"
        "import transformers\n"
        "assert cls is RankwiseCallback and issubclass(cls, transformers.TrainerCallback)\n"
        "for owner, name in ((rankwise, 'integration'), (rankwise.integrations, 'trl'), (rankwise.integrations, 'hf2')):\n"
        "    try:\n"
        "        getattr(owner, name)\n"
        "    except AttributeError as e:\n"
        "        assert name in str(e), e\n"
        "    else:\n"
        "        raise AssertionError(name)\n"
    )
    run_python(code)
