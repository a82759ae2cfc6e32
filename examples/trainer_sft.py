"""Fine-tune a SHiRA adapter with the Hugging Face Trainer, then load it with PEFT.

`get_peft_model` returns a `peft.PeftModel` subclass, so the Trainer treats it as PEFT: it
trains only the adapter values (default optimizer), and `save_model` and every checkpoint hold
the adapter alone, in PEFT's files. Runs in seconds on a CPU, nothing downloaded (tiny_setup.py).

    python examples/trainer_sft.py [output_dir]
"""

import os
import sys
import tempfile

from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import shira_dist
from tiny_setup import TEXTS, byte_tokenizer, peft_reload_diff, print_losses, shira_config, small_llama

output_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="trainer_sft_")
tokenizer = byte_tokenizer()
model = shira_dist.get_peft_model(small_llama(len(tokenizer)), shira_config())
model.print_trainable_parameters()

train_dataset = [tokenizer(text + tokenizer.eos_token) for text in TEXTS]
args = TrainingArguments(output_dir=output_dir, max_steps=8, per_device_train_batch_size=6, learning_rate=3e-2,
                         logging_steps=2, save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
trainer.train()
print_losses(trainer)

final = os.path.join(output_dir, "final")
trainer.save_model(final)
print(f"saved {final}: {' '.join(sorted(os.listdir(final)))}")
for step in (4, 8):  # the checkpoints: adapter weights only, beside optimizer and scheduler state
    checkpoint = os.path.join(output_dir, f"checkpoint-{step}")
    print(f"saved {checkpoint}: {' '.join(sorted(os.listdir(checkpoint)))}")

# The saved adapter is PEFT's: plain peft loads it onto a fresh base model.
diff = peft_reload_diff(model, final, len(tokenizer), tokenizer(TEXTS, padding=True, return_tensors="pt"))
print(f"reloaded with peft.PeftModel.from_pretrained: max |logit diff| = {diff:.2e}")
