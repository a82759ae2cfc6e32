"""Quick start: a SHiRA adapter on a small Llama, trained, saved in PEFT's format and reloaded.

Runs in seconds on a CPU with nothing downloaded (the model is built from a config). The
full fine-tuning job (SmolLM2 on Rotten Tomatoes, launcher, W&B) is
`python -m shira_dist.train --config configs/default.yaml`.
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shira_dist import PeftModel, ShiraConfig, get_peft_model

torch.manual_seed(0)
config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
model = get_peft_model(LlamaForCausalLM(config), ShiraConfig(r=8, target_modules="all-linear", random_seed=0))
model.print_trainable_parameters()

# Teach the model one fixed sequence: the loss must fall.
seq = torch.randint(0, 256, (4, 32))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
model.train()
for step in range(30):
    loss = model(seq, labels=seq).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 10 == 0 or step == 29:
        print(f"step {step:2d}  loss {loss.item():.3f}")

model.eval()
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM(config), d)
    with torch.no_grad():
        diff = (reloaded(seq).logits - model(seq).logits).abs().max().item()
    print(f"saved to {d} (PEFT format) and reloaded: max |logit diff| = {diff:.2e}")
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        diff = (merged(seq).logits - model(seq).logits).abs().max().item()
    print(f"merged into the base weights: max |logit diff| = {diff:.2e}")
