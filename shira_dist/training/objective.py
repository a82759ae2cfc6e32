"""What is computed from a batch, per task: a summed loss, its target count, correct answers.

    causal_lm                logits (B, T, V): sum CE(logits[:, t], targets[:, t+1]) over non-ignored
    lm_classification        logits at the last prompt position (B, V) (left padding, so it is
                             position T-1 for every row): CE against the label word's token;
                             prediction = argmax over the label words' logits only
    sequence_classification  logits (B, C): CE against the class; prediction = argmax

Losses are sums (not means), so the training loop can divide by the global batch's target
count and get the same update however examples are split over micro-batches and ranks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoding import IGNORE


@dataclass
class Objective:
    task_type: str
    label_token_ids: Optional[Tensor]  # (C,) lm_classification only
    pass_position_ids: bool  # the model's forward takes position_ids (left padding needs them)
    pass_logits_to_keep: bool  # the model's forward takes logits_to_keep (skip unused logits)

    @classmethod
    def for_model(cls, task_type: str, model: nn.Module, label_token_ids: Optional[list[int]]) -> "Objective":
        params = inspect.signature(model.forward).parameters
        ids = None if label_token_ids is None else torch.tensor(label_token_ids, dtype=torch.long)
        return cls(task_type, ids, "position_ids" in params, "logits_to_keep" in params)

    @property
    def left_pad(self) -> bool:
        return self.task_type == "lm_classification"

    def num_targets(self, batch: dict[str, Tensor]) -> int:
        if self.task_type == "causal_lm":
            return int((batch["targets"][:, 1:] != IGNORE).sum())
        return int(batch["label"].numel())

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(summed loss (scalar fp32), number of correct predictions (scalar) or None)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.task_type == "causal_lm":
            logits = model(**inputs).logits  # (B, T, V)
            targets = batch["targets"][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
            return loss, None
        if self.task_type == "lm_classification":
            if self.pass_position_ids:
                inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            if self.pass_logits_to_keep:
                inputs["logits_to_keep"] = 1
            logits = model(**inputs).logits[:, -1].float()  # (B, V)
            label_ids = self.label_token_ids.to(logits.device)
            loss = F.cross_entropy(logits, label_ids[batch["label"]], reduction="sum")
            correct = (logits[:, label_ids].argmax(-1) == batch["label"]).sum()
            return loss, correct
        logits = model(**inputs).logits.float()  # (B, C)
        loss = F.cross_entropy(logits, batch["label"], reduction="sum")
        return loss, (logits.argmax(-1) == batch["label"]).sum()
