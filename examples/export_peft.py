"""Export to the HF PEFT adapter format, then load it with PEFT alone (``pip
install 'rankwise[peft]'``).

    python examples/export_peft.py [OUT_DIR]

``export_peft`` writes LoRA / rsLoRA / DoRA (and EDoRA, GoRA, RAC-LoRA in
their LoRA/DoRA form); ``vllm=True`` bakes per-layer scales in for engines
that read only ``r`` and ``lora_alpha``. A merged model instead:
``rankwise.detach(model, merge=True)`` then ``model.save_pretrained(dir)``.
"""

import sys
import tempfile

import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel

import rankwise


def make_base() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def main(out: str) -> None:
    model = make_base()
    rankwise.attach(model, rankwise.DoraConfig(r=4, alpha=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rankwise.step(model, optimizer)

    rankwise.export_peft(model, f"{out}/peft_adapter")
    peft_model = PeftModel.from_pretrained(make_base(), f"{out}/peft_adapter").eval()
    model.eval()
    with torch.no_grad():
        gap = (peft_model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    print(f"PEFT's model and rankwise's agree: largest logit difference {gap:.1e}")
    assert gap < 1e-4

    back = rankwise.import_peft(make_base(), f"{out}/peft_adapter")  # and back, to continue training
    print(f"imported into rankwise: {len(rankwise.adapter_layers(back))} adapted layers")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
