"""Which examples each optimizer step uses, on each rank; and padding them into tensors.

The data position is the step number: step k of a run uses global batch k of a fixed
order, a pure function of (seed, k), so resuming at step k needs nothing else.

    epoch e = k // steps_per_epoch     order_e = randperm(N, seed + e)
    global batch k  = order_e[i*G : (i+1)*G]      i = k % steps_per_epoch, G = micro*accum*world
    rank r's share  = global batch[r*micro*accum : (r+1)*micro*accum], split into accum micro-batches

Which rank takes which example does not change the update: losses are summed and divided
by the global batch's target count (see loop.py), so a 2-process run matches a 1-process
run with twice the accumulation, up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .encoding import IGNORE


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    micro_batch_size: int
    accumulation: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def check(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set has {self.num_examples} examples, fewer than one global batch of "
                             f"{self.global_batch} (micro_batch_size {self.micro_batch_size} x accumulation "
                             f"{self.accumulation} x world size {self.world_size}); lower the batch or add data")

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of this rank's micro-batches for optimizer step ``step`` (0-based)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        batch = order[i * self.global_batch:(i + 1) * self.global_batch]
        per_rank = self.micro_batch_size * self.accumulation
        mine = batch[rank * per_rank:(rank + 1) * per_rank].tolist()
        return [mine[j:j + self.micro_batch_size] for j in range(0, per_rank, self.micro_batch_size)]


def collate(examples: list[dict], pad_id: int, left_pad: bool) -> dict[str, Tensor]:
    """Pad to the longest example. Returns input_ids/attention_mask (B, T) and either
    targets (B, T) (causal LM, IGNORE on padding) or label (B,) (from class_index)."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids, mask, targets = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        pad = longest - n
        ids.append([pad_id] * pad + e["input_ids"] if left_pad else e["input_ids"] + [pad_id] * pad)
        mask.append([0] * pad + [1] * n if left_pad else [1] * n + [0] * pad)
        if "targets" in e:
            targets.append(e["targets"] + [IGNORE] * pad)
    out = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
    if targets:
        out["targets"] = torch.tensor(targets, dtype=torch.long)
    else:
        out["label"] = torch.tensor([e["class_index"] for e in examples], dtype=torch.long)
    return out
