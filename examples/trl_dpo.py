"""Preference tuning (DPO) of a SHiRA adapter with TRL's DPOTrainer, no separate reference model.

With ``ref_model=None`` and a PEFT model, TRL adds a frozen copy of the adapter config named
"ref" (a fresh adapter: zero values, so the reference is the base model) and computes the
reference log-probs with it active; only "default" trains. ``save_model`` writes "default" at
the top of the folder and "ref" in a subfolder, PEFT's layout. Runs in seconds, nothing
downloaded.

    python examples/trl_dpo.py [output_dir]
"""

import os
import sys
import tempfile

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import shira_dist
from tiny_setup import byte_tokenizer, peft_reload_diff, print_losses, shira_config, small_llama

output_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="trl_dpo_")
tokenizer = byte_tokenizer()
model = shira_dist.get_peft_model(small_llama(len(tokenizer)), shira_config())

preferences = Dataset.from_dict({
    "prompt": ["the cat sat on", "a dog ran to", "the big blue", "a small cat ran"],
    "chosen": [" the mat.", " the house.", " tree grew.", " home."],
    "rejected": [" qzx vvk.", " jjj kq.", " xxq zz.", " kkv."],
})
args = DPOConfig(output_dir=output_dir, max_steps=8, per_device_train_batch_size=4, learning_rate=3e-2,
                 logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, bf16=False, disable_tqdm=True,
                 seed=0)
trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=preferences, processing_class=tokenizer)
print(f"adapters: {sorted(model.peft_config)} (active: {model.active_adapter})")
trainer.train()
print_losses(trainer, reward_margin="rewards/margins")

final = os.path.join(output_dir, "final")
trainer.save_model(final)
print(f"saved {final}: {' '.join(sorted(os.listdir(final)))}")

# The trained adapter loads with plain peft; the "ref" one computes the base model.
batch = tokenizer(["the cat sat on the mat."], return_tensors="pt")
diff = peft_reload_diff(model, final, len(tokenizer), batch)
print(f"reloaded with peft.PeftModel.from_pretrained: max |logit diff| = {diff:.2e}")
ref_diff = peft_reload_diff(small_llama(len(tokenizer)), os.path.join(final, "ref"), len(tokenizer), batch)
print(f"reference adapter vs base model: max |logit diff| = {ref_diff:.2e}")
