"""Supervised fine-tuning of a SHiRA adapter with TRL's SFTTrainer, then load it with PEFT.

Pass the shira_dist model itself as ``model=``: TRL sees a ``peft.PeftModel`` and trains only
the adapter values. (TRL's ``peft_config=`` takes only ``peft.PeftConfig`` objects; a
``shira_dist.ShiraConfig`` there is refused with a TypeError.) ``bf16=False`` keeps this tiny
CPU run in fp32; drop it on hardware with bf16. Runs in seconds, nothing downloaded.

    python examples/trl_sft.py [output_dir]
"""

import os
import sys
import tempfile

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import shira_dist
from tiny_setup import TEXTS, byte_tokenizer, peft_reload_diff, print_losses, shira_config, small_llama

output_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="trl_sft_")
tokenizer = byte_tokenizer()
model = shira_dist.get_peft_model(small_llama(len(tokenizer)), shira_config())

args = SFTConfig(output_dir=output_dir, max_steps=8, per_device_train_batch_size=6, learning_rate=3e-2,
                 logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, bf16=False, disable_tqdm=True,
                 seed=0)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                     processing_class=tokenizer)
trainer.train()
print_losses(trainer, token_accuracy="mean_token_accuracy")

final = os.path.join(output_dir, "final")
trainer.save_model(final)
print(f"saved {final}: {' '.join(sorted(os.listdir(final)))}")

diff = peft_reload_diff(model, final, len(tokenizer), tokenizer(TEXTS, padding=True, return_tensors="pt"))
print(f"reloaded with peft.PeftModel.from_pretrained: max |logit diff| = {diff:.2e}")
