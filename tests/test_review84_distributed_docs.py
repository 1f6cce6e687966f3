"""Review round 84: docs/distributed.md, run as written (2 gloo processes on CPU, torchrun / accelerate launch).

* The harness's refusal of a launch that asks Accelerate for FSDP, DeepSpeed or Megatron-LM comes before Accelerate is
  set up: on CPU, ``accelerate launch --num_processes 2 --use_fsdp`` died inside ``Accelerator()`` (exit 1, Accelerate's
  traceback), ``--use_deepspeed`` without DeepSpeed on its ``ImportError``, and one process under ``--use_fsdp``
  trained as if FSDP had not been asked for; the page says such a launch is refused with exit 2, nothing written.
* The page's DDP block called ``torch.cuda.set_device`` unconditionally, which fails on a CPU-only torch
  (``AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'``) although the block said what to change
  for CPU. It now picks gloo on CPU itself; the slow test runs it and the FSDP2 save block as written on 2 processes
  and compares the saved adapters with one process on the same global batches.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import write_sst2_slice
from safetensors.torch import load_file

import rankwise
from rankwise_harness.config import ConfigError, RunConfig
from rankwise_harness.train import check_launch_environment, finetune

ROOT = Path(__file__).resolve().parents[1]

if not dist.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))


# ------------------------------------------------------------------------------------- the harness's refusal
@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_a_launch_asking_accelerate_for_fsdp_deepspeed_or_megatron_is_refused_before_anything(
        kind: str, still_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``accelerate launch --use_fsdp`` / ``--use_deepspeed`` (or an Accelerate config) sets ``ACCELERATE_USE_<KIND>``:
    ``finetune`` refuses it with the harness's ``ConfigError`` (the CLI's exit 2), the run folder never made. On main,
    one process under FSDP trained and wrote the run; under DeepSpeed (not installed here) it ended on Accelerate's
    ``ImportError``."""
    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")
    out = tmp_path / "run"
    cfg = RunConfig(task="sst2", method="lora", data=write_sst2_slice(tmp_path, 8, 4), model=still_bert,
                    output=str(out), max_steps=1, batch_size=4, max_length=16, precision="no")
    with pytest.raises(ConfigError, match=rf"asks Accelerate for {kind}, which rankwise finetune does not run"):
        finetune(cfg, show_progress=False, log=lambda _m: None)
    assert not out.exists()


def test_the_launch_environment_is_read_as_accelerate_reads_it() -> None:
    """Accelerate turns a flag on only for ``true`` (any case); ``false``, absent or another word leaves it off."""
    for value in ("false", "0", "no", ""):
        check_launch_environment({"ACCELERATE_USE_FSDP": value, "ACCELERATE_USE_DEEPSPEED": value})
    check_launch_environment({})
    with pytest.raises(ConfigError, match="asks Accelerate for DEEPSPEED"):
        check_launch_environment({"ACCELERATE_USE_DEEPSPEED": "True"})


@pytest.mark.slow
def test_accelerate_launch_use_fsdp_on_two_cpu_processes_exits_2_on_each_writing_nothing(
        still_bert: str, tmp_path: Path) -> None:
    """The launch the page names, for real: each process prints the refusal (and exits 2: accelerate launch then
    reports the failed processes with its own status 1). On main: Accelerate's "FSDP parameter initialization with
    `sync_module_states=True` is not supported on cpu" traceback. About 45 s on the shared 2-core box."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--use_fsdp", "-m", "rankwise_harness.cli",
           "finetune", "--task", "sst2", "--data", write_sst2_slice(tmp_path, 8, 4), "--model", still_bert,
           "--method", "lora", "--max-steps", "1", "--batch-size", "2", "--no-progress", "--output", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert said.count("rankwise: error: this launch asks Accelerate for FSDP") == 2, said[-3000:]
    assert "sync_module_states" not in said, said[-3000:]
    assert not out.exists()


# ------------------------------------------------------------------------------------- the page's blocks, run
PRELUDE = '''
import torch, transformers as hf
from torch.utils.data import TensorDataset

def load_base_model():
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))

ROWS = torch.randint(0, 64, (8, 6), generator=torch.Generator().manual_seed(1))
DATA = TensorDataset(ROWS)

def as_batch(rows):
    x = torch.stack([r[0] for r in rows])
    return {"input_ids": x, "labels": x}
'''

WORKER = '''
import os
from torch.utils.data import DataLoader, DistributedSampler
shard = DistributedSampler(DATA, num_replicas=int(os.environ["WORLD_SIZE"]), rank=int(os.environ["RANK"]), shuffle=False)
loader = DataLoader(DATA, batch_size=2, collate_fn=as_batch, sampler=shard)  # made before the block joins the group
os.makedirs("ddp", exist_ok=True); os.chdir("ddp")
{ddp}
os.chdir("..")
from torch.distributed.fsdp import fully_shard
cfg = rankwise.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], seed=0)
model = load_base_model(); rankwise.attach(model, cfg)
for layer in rankwise.adapter_layers(model).values():
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr={lr})
for batch in loader:
    model(**batch).loss.backward(); opt.step(); opt.zero_grad(); rankwise.step(model, opt)
os.makedirs("fsdp2", exist_ok=True); os.chdir("fsdp2")
{fsdp2}
dist.barrier()
dist.destroy_process_group()
'''


def _page_blocks() -> tuple[str, str]:
    from test_doc_snippets import all_blocks

    blocks = {b.key: b.code for b in all_blocks() if b.page == "docs/distributed.md"}
    return blocks["docs/distributed.md#1"], blocks["docs/distributed.md#2"]


def _one_process(lr: float, out: Path) -> None:
    """The same training on one process: 2 steps of the 4-row global batches (rows 0-3, then 4-7)."""
    scope: dict[str, object] = {}
    exec(PRELUDE, scope)  # noqa: S102 - the workers' own model and rows
    model = scope["load_base_model"]()  # type: ignore[operator]
    rankwise.attach(model, rankwise.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], seed=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rows = scope["ROWS"]
    for start in (0, 4):
        batch = rows[start:start + 4]  # type: ignore[index]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step(); opt.zero_grad(); rankwise.step(model, opt)
    rankwise.save(model, out)


@pytest.mark.slow
def test_the_pages_ddp_and_fsdp2_blocks_run_on_two_cpu_processes_and_save_the_one_process_adapter(tmp_path: Path) -> None:
    """docs/distributed.md#1 (DDP) and #2 (FSDP2's save) as written, under ``torchrun --nproc_per_node 2`` on CPU (the
    reader's ``load_base_model`` a tiny Llama, ``loader`` a ``DistributedSampler``'s, FSDP2's training the page's
    sentence): rank 0's saved adapter equals one process's on the same global batches. On main the DDP block died in
    ``torch.cuda.set_device`` on this CPU-only torch. About 45 s on the shared 2-core box."""
    ddp, fsdp2 = _page_blocks()
    lr = float(re.search(r"lr=([0-9.e-]+)", ddp)[1])  # type: ignore[index]
    script = tmp_path / "train.py"
    script.write_text(PRELUDE + WORKER.format(ddp=ddp, fsdp2=fsdp2, lr=lr))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    _one_process(lr, tmp_path / "one")
    want = load_file(tmp_path / "one" / "adapter.safetensors")
    assert max(v.abs().max().item() for k, v in want.items() if k.endswith("lora_b")) > lr  # it trained (Adam: about lr a step)
    for run in ("ddp", "fsdp2"):
        got = load_file(tmp_path / run / "out" / "adapter.safetensors")
        assert set(got) == set(want), run
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"{run}: {k}")
