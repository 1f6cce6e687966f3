"""Review round 87: two processes against one (docs/distributed.md: "what one process with ``--batch-size`` N x B
computes, N processes compute too").

* Round 84's unexplained 7e-4 is float rounding, measured: Adam's first update is ``lr · g / (|g| + eps)``, so an
  entry whose gradient is ~1e-9 (the sum of much larger terms) moves by an O(lr) amount that its last bits decide.
  It vanishes in float64 and with SGD (docs/reliability.md, round 87).
* A real difference: a generation run's loss is a mean over answer tokens, and the processes' shares of a batch hold
  different numbers of them. DDP averaged the shares' means, not the whole batch's mean: on 2 processes the gradients
  were 16% away from one process's (float64, SGD) and the reported loss 0.017 off. Each process's loss is now
  weighted by its share of the global batch's terms (``share_weighted``, ``TaskType.loss_terms``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from rankwise_harness import train as train_module
from rankwise_harness.batches import IGNORE
from rankwise_harness.config import RunConfig
from rankwise_harness.data import Example, get_task
from rankwise_harness.tasktypes import task_type_for
from rankwise_harness.train import finetune, share_weighted

ROOT = Path(__file__).resolve().parents[1]
QUIET: dict[str, Any] = dict(show_progress=False, log=lambda _m: None)


def _rows(n: int) -> list[dict[str, str]]:
    """GSM8K-style rows whose worked answers have very different lengths (1, 7 or 13 filler phrases)."""
    return [{"question": f"What is {i}+1?", "answer": "so we add one " * (1 + 6 * (i % 3)) + f"{i}+1={i + 1}\n#### {i + 1}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A seeded 2-layer GPT-2 without dropout, with the packaged MiniLM's tokenizer, saved as a checkpoint."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rankwise_harness.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=96, n_embd=32, n_layer=2, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def gsm(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("gsm8k")
    rows = _rows(16)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return str(folder)


def _generation(model: str) -> Any:
    from transformers import AutoTokenizer

    tt = task_type_for(get_task("gsm8k"), model, RunConfig(task="gsm8k", max_length=80))
    tt.tokenizer = AutoTokenizer.from_pretrained(model)
    return tt


def _examples() -> list[Example]:
    return [Example(text=r["question"], target=r["answer"]) for r in _rows(8)]


# ------------------------------------------------------------------------------------- the rule, one process
def test_loss_terms_of_a_generation_batch_are_the_tokens_its_loss_averages(tiny_gpt2: str) -> None:
    """``loss_terms`` is the divisor of the causal LM's mean: the model's loss times it equals the sum of the
    per-token cross-entropies computed by hand (logits at t against the label at t + 1, ignored labels skipped)."""
    from transformers import AutoModelForCausalLM

    tt = _generation(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).double()
    batch = tt.train_batch(_examples())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                                reduction="sum")
    terms = tt.loss_terms(batch)
    assert terms == int((target != IGNORE).sum()) > 8  # several answer tokens a row
    torch.testing.assert_close(tt.loss(model, batch).double() * terms, by_hand.double(), rtol=1e-6, atol=0)
    rows = tt.train_batch(_examples()[:1])
    assert tt.loss_terms(rows) == int((rows["labels"] != IGNORE).sum())  # the prompt's first token is never a label


def test_the_processes_weighted_losses_average_to_the_whole_batchs_mean(tiny_gpt2: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes' shares of an 8-row batch (rows 0-3 and 4-7), each loss weighted by ``share_weighted`` (the
    all-reduce of the terms simulated by their mean), average to the whole batch's loss, and so do their gradients
    (what DDP's averaging makes of them); the unweighted shares' mean is another loss (the defect: its gradient 0.8% away here, the weighted one within 1e-5)."""
    from transformers import AutoModelForCausalLM

    tt = _generation(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).double()
    rows = _examples()
    shares = [tt.train_batch(rows[:4]), tt.train_batch(rows[4:])]
    counts = [tt.loss_terms(b) for b in shares]
    assert counts[0] != counts[1]
    calls = iter(counts)
    monkeypatch.setattr(train_module, "mean_across_ranks",
                        lambda t: (next(calls), torch.tensor(sum(counts) / len(counts), dtype=t.dtype))[1])
    weighted = share_weighted(tt.loss, tt.loss_terms, 2)
    losses = [weighted(model, b) for b in shares]
    mean = (losses[0] + losses[1]) / 2
    whole = tt.loss(model, tt.train_batch(rows))
    torch.testing.assert_close(mean.double(), whole.double(), rtol=1e-6, atol=0)
    plain = (tt.loss(model, shares[0]) + tt.loss(model, shares[1])) / 2
    params = [p for p in model.parameters()]
    g_mean, g_whole, g_plain = (torch.autograd.grad(loss, params) for loss in (mean, whole, plain))
    for a, b in zip(g_mean, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    off = torch.cat([(a - b).flatten() for a, b in zip(g_plain, g_whole)]).norm()
    assert off > 1e-3 * torch.cat([b.flatten() for b in g_whole]).norm()  # unweighted: another gradient
    assert share_weighted(tt.loss, tt.loss_terms, 1) == tt.loss  # one process: the task's loss itself


def test_equal_shares_weigh_exactly_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A classification batch's shares hold as many rows each, so the weight is exactly 1.0: the loss (and a
    2-process classification run) is bit for bit what it was."""
    monkeypatch.setattr(train_module, "mean_across_ranks", lambda t: t)
    loss = torch.tensor(0.6931471805599453, dtype=torch.float32)
    weighted = share_weighted(lambda _m, _b: loss, lambda b: int(b["labels"].shape[0]), 2)
    assert torch.equal(weighted(torch.nn.Identity(), {"labels": torch.zeros(4)}), loss)


def test_a_generation_runs_accumulated_windows_are_its_whole_batches(tiny_gpt2: str, gsm: str, tmp_path: Path) -> None:
    """One process, ``--grad-accum 2 --batch-size 4`` against ``--batch-size 8`` on a generation task whose answers
    differ in length: the same rows per step, so the step losses and the trained factors agree to float rounding.
    (Before, each window minimised the mean of its two micro-batches' means, not the mean over its answer tokens:
    the step losses 0.017 apart at step 1.)"""
    from rankwise_harness.cli import main

    runs = {}
    for name, extra in (("whole", ["--batch-size", "8"]), ("accumulated", ["--batch-size", "4", "--grad-accum", "2"])):
        argv = _argv(tiny_gpt2, gsm, tmp_path / name, 8)
        i = argv.index("--batch-size")
        assert main(argv[:i] + argv[i + 2:] + extra) == 0
        runs[name] = tmp_path / name
    losses = [json.loads((run / "metrics.json").read_text())["losses"] for run in runs.values()]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0)
    a, b = (load_file(str(run / "adapter" / "adapter.safetensors")) for run in runs.values())
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)


def test_term_weights_are_exactly_one_for_equal_shares_and_the_token_shares_otherwise() -> None:
    """``term_weights`` of one process: t_k · r / Σ t (a window of micro-batches with 3 and 9 answer tokens: 0.5, 1.5),
    exactly 1.0 each where the micro-batches hold as many terms, and 1.0 where none holds any."""
    from rankwise_harness.train import term_weights

    assert term_weights([3, 9], 1) == [0.5, 1.5]
    assert term_weights([16, 16, 16], 1) == [1.0, 1.0, 1.0] and term_weights([0, 0], 1) == [1.0, 1.0]


# ------------------------------------------------------------------------------------- the harness, two processes
def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))


GORA = ["--calibration-batches", "2", "--set", "r_min=2", "--set", "r_max=8"]


def _argv(model: str, data: str, out: Path, batch_size: int, method: str = "lora") -> list[str]:
    return ["finetune", "--task", "gsm8k", "--data", data, "--model", model, "--method", method, *(GORA if method == "gora" else []),
            "--dropout", "0", "--max-steps", "3", "--batch-size", str(batch_size), "--lr", "1e-2", "--max-length", "80",
            "--max-eval", "3", "--max-new-tokens", "2", "--precision", "no", "--no-progress", "--output", str(out)]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("method", ["lora", "gora"])
def test_a_generation_run_on_two_processes_is_the_one_process_run(method: str, tiny_gpt2: str, gsm: str,
                                                                  tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 ... --batch-size 4`` against one process with ``--batch-size 8`` on a generation
    task whose answers differ in length: the step losses agree to float rounding (before: 0.017 apart at step 1, the
    mean of the shares' means) and so do the trained factors. GoRA: its calibration gradients (averaged across the
    processes) are weighted the same way, so its init is the one process's too."""
    from rankwise_harness.cli import main

    one = tmp_path / "one"
    assert main(_argv(tiny_gpt2, gsm, one, 8, method)) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "rankwise_harness.cli", *_argv(tiny_gpt2, gsm, two, 4, method)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [json.loads((run / "metrics.json").read_text())["losses"] for run in (one, two)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-6, atol=0)
    a, b = (load_file(str(run / "adapter" / "adapter.safetensors")) for run in (one, two))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)


# ------------------------------------------------------------------------------------- each process's RNG state
def test_a_checkpoint_holds_each_processs_rng_state_under_its_index(tmp_path: Path) -> None:
    """Process 1 of 2 writes its own RNG states as ``rng-1`` (rank 0 its ``rng-0``): with dropout the processes' states
    part ways (a mask consumes the RNG by its size, and the shares are padded to other widths), and a resumed process
    must go on from its own. (Round 10's resume test has no dropout, so every process's state is the same there: it
    passes when every process writes ``rng-0``.)"""
    from types import SimpleNamespace

    from rankwise_harness.checkpoint import CKPT_DIR, TrainerState, read_state, write_checkpoint

    model = torch.nn.Linear(2, 2)
    torch.manual_seed(1234)
    torch.rand(17)
    expected = torch.get_rng_state()
    process_1 = SimpleNamespace(process_index=1, is_main_process=False, scaler=None, unwrap_model=lambda m: m)
    tmp = tmp_path / CKPT_DIR / ".step-0000002.tmp"
    tmp.mkdir(parents=True)  # made by the main process's first phase
    write_checkpoint(model, False, process_1, None, None, TrainerState(step=2, elapsed=0.0, micro=2),
                     tmp_path, None)
    assert sorted(p.name for p in tmp.iterdir()) == ["rng-1.json", "rng-1.safetensors"]
    assert torch.equal(read_state(tmp, "rng-1")["torch"], expected)


# ------------------------------------------------------------------------------------- an unseeded chain's later links
def _unseeded_chain_worker(rank: int, init_file: str, out: str) -> None:
    """Rank ``rank`` of 2: RAC-LoRA (links of 2 steps) attached with ``seed=None`` after seeding its global RNG per
    rank, trained 3 steps under DDP (a link end at step 2 draws the next link's frozen factor), its adapter saved."""
    from seed_none_worker import adapter_tensors, attach_unseeded

    from conftest import MODEL_CASES

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = attach_unseeded("raclora")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
        case = MODEL_CASES["mlp"]()
        for i in range(3):
            ddp(**case.batch(100 + i)).loss.backward()
            opt.step()
            opt.zero_grad()
            import rankwise

            rankwise.step(model, opt)
        torch.save(adapter_tensors(model), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
def test_an_unseeded_chains_later_links_are_drawn_alike_on_every_rank(tmp_path: Path) -> None:
    """``seed=None`` with ranks whose global RNGs differ: ``attach`` makes the first link rank 0's, and the links drawn
    at link ends come from the seed ``shared_seed`` made rank 0's, so after a link end every rank still holds the same
    chain and frozen factor. (Round 10's test checks the adapter at attach only, where the broadcast of the tensors
    hides a per-rank seed: a ``shared_seed`` without its broadcast passed it.) 68 s on the shared 2-core box."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "adapter")
    mp.spawn(_unseeded_chain_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    held = [torch.load(f"{out}.{r}") for r in (0, 1)]
    assert held[0].keys() == held[1].keys() and any("chain" in k for k in held[0]), sorted(held[0])
    for key in held[0]:
        assert torch.equal(held[0][key], held[1][key]), f"rank 1's {key} is not rank 0's"


# ------------------------------------------------------------------------------------- a model FSDP shards in part
@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
def test_a_model_fsdp_shards_only_in_part_counts_as_sharded(tmp_path: Path) -> None:
    """FSDP1 wrapping the head alone (round 13's case) leaves the rest of the model unmanaged: ``sharded`` must still
    say so, since ``rankwise.step`` and ``check_finite_grads`` combine the ranks' finiteness flags on it (a NaN in one
    rank's shard of the head must stop every rank). A ``sharded`` asking every module passed every multi-process test
    (their models are wrapped whole). One gloo process: FSDP1 marks the modules it manages as on several."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    import rankwise
    from rankwise.distributed import sharded

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"], seed=0))
        assert not sharded(model)
        model[2] = FullyShardedDataParallel(model[2], use_orig_params=True, device_id=torch.device("cpu"))
        assert sharded(model)
    finally:
        dist.destroy_process_group()
