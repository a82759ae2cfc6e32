"""A few greedy answers of the model to fixed prompts, before and after training (task.sample_prompts).

    samples.json   {"prompts": [...], "rendered_with_chat_template": bool,
                    "before": [answer, ...] (the untrained adapter, i.e. the base), "after": [...]}

The prompts are user turns rendered with the tokenizer's chat template when the task reads chat
data (its format is not template rows) and the tokenizer has one; else they are fed as they are.
Greedy decoding, ``task.sample_max_new_tokens`` new tokens at most, one prompt at a time (no
padding), on rank 0 only, in eval mode. The file is written atomically by rank 0; "before" is
kept across a resume, since the untrained model is gone by then.
"""

from __future__ import annotations

import json
import os
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

from ..io import atomic_write_bytes
from .formats import templates_set
from .schema import TaskConfig

SAMPLES_NAME = "samples.json"


def uses_chat_template(task: TaskConfig, hf_tokenizer) -> bool:
    return (task.format != "template" and not templates_set(task)
            and getattr(hf_tokenizer, "chat_template", None) is not None)


def prompt_ids(prompt: str, hf_tokenizer, chat: bool) -> list[int]:
    if chat:
        return list(hf_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                     add_generation_prompt=True, return_dict=True)["input_ids"])
    return hf_tokenizer(prompt, add_special_tokens=True)["input_ids"]


@torch.no_grad()
def greedy_answers(model: nn.Module, hf_tokenizer, prompts: list[str], chat: bool, max_new_tokens: int,
                   device: torch.device, autocast: Callable[[], ContextManager]) -> list[str]:
    """Each prompt's greedy continuation (the new tokens only, special tokens dropped)."""
    was_training = model.training
    model.eval()
    answers = []
    try:
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(prompt, hf_tokenizer, chat)], device=device)
            with autocast():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=hf_tokenizer.pad_token_id
                                     if hf_tokenizer.pad_token_id is not None else hf_tokenizer.eos_token_id)
            answers.append(hf_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


def read_samples(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, SAMPLES_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_samples(output_dir: str, document: dict) -> None:
    atomic_write_bytes(os.path.join(output_dir, SAMPLES_NAME), (json.dumps(document, indent=2) + "\n").encode())


def sample_lines(when: str, prompts: list[str], answers: list[str]) -> str:
    """Log lines: one prompt and its answer each."""
    return "\n".join(f"[shira_dist] sample {when}: {p!r} -> {a!r}" for p, a in zip(prompts, answers))
