"""Held-out evaluation: loss (and accuracy for classification), data-parallel over ranks.

Examples are ordered by length (so batches carry little padding) and rank r scores
examples r, r+W, r+2W, ... of that order; sums are all-reduced, so the numbers equal a
single-process evaluation (up to float summation order). Every rank runs the same number
of forward passes (a rank that runs out repeats an example with weight 0), which sharded
strategies need: their forward is a collective.
"""

from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Callable

import torch

from .batches import collate
from .objective import Objective
from .strategy import TrainingStrategy


def evaluate(strategy: TrainingStrategy, objective: Objective, dataset, rank: int, world_size: int,
             batch_size: int, pad_id: int, device: torch.device,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict:
    model = strategy.model
    was_training = model.training
    model.eval()
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
    mine = order[rank::world_size]
    per_rank = math.ceil(len(dataset) / world_size)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, targets, correct
    try:
        with torch.no_grad():
            for start in range(0, per_rank, batch_size):
                idx = mine[start:start + batch_size]
                weight = 1.0 if idx else 0.0
                batch = collate([dataset[i] for i in (idx or [0])], pad_id, objective.left_pad)
                n = objective.num_targets(batch)
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast():
                    loss, correct = objective(model, batch)
                totals += weight * torch.tensor([float(loss), n, float(correct) if correct is not None else 0.0],
                                                dtype=torch.float64)
    finally:
        model.train(was_training)
    totals = strategy.all_reduce_sum(totals)
    loss_sum, n, correct = totals.tolist()
    out = {"loss": loss_sum / max(n, 1.0), "examples": len(dataset)}
    if objective.task_type == "causal_lm":
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        out["tokens"] = int(n)
    else:
        out["accuracy"] = correct / max(n, 1.0)
    return out
