"""The quick start: LoRA on a model, a few steps, save, load onto a fresh
copy. ``python examples/quickstart.py``"""

import copy
import sys
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification

import rankwise

out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
torch.manual_seed(0)
model = BertForSequenceClassification(config)  # or .from_pretrained("bert-base-uncased", num_labels=2)
fresh = copy.deepcopy(model)  # an untouched base, to load the adapter onto at the end
print(rankwise.attach(model, rankwise.LoraConfig(r=8, alpha=16, target_modules="all-linear",
                                                 modules_to_save=["classifier"])))  # the new head trains fully
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids, labels = torch.randint(0, 100, (8, 16)), torch.randint(0, 2, (8,))
for _ in range(3):
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    rankwise.step(model, optimizer)  # after every optimizer step
rankwise.save(model, out)  # the adapter (and the head) only
rankwise.load(fresh, out)  # verified against the base before anything is touched
print("saved and loaded:", out)
