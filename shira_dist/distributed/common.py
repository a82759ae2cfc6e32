"""Small helpers every strategy shares: find the SHiRA model inside an engine, rank/world and
the data-parallel slice of a global batch.

    DDP(model).module                  ─┐
    DeepSpeedEngine(model).module       ├─► unwrap_shira_model(...) -> model
    FSDP2: fully_shard(model)          ─┘   (FSDP2 keeps the object, only changes its class)

``model``: what get_peft_model / PeftModel.from_pretrained return (a shira_dist.PeftModel),
or a bare ShiraModel; both answer the same methods.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..model import ShiraModel
from ..peft_model import PeftModel


def unwrap_shira_model(model: nn.Module) -> PeftModel | ShiraModel:
    """The SHiRA model inside ``model`` (itself, DDP's/DeepSpeed's/FSDP1's ``.module``, ...)."""
    seen = model
    while not isinstance(seen, (PeftModel, ShiraModel)):
        inner = getattr(seen, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"{type(model).__name__} holds no SHiRA model: wrap the result of "
                            "shira_dist.get_peft_model / PeftModel.from_pretrained")
        seen = inner
    return seen


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when no process group is running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def data_parallel_slice(global_batch_size: int, rank: int, world_size: int) -> slice:
    """Rows of a global batch this rank trains on: equal contiguous blocks, in rank order.

    With equal blocks (and the same number of loss tokens per row) the mean of the ranks'
    losses is the single-process loss of the whole batch, and so are the averaged gradients.
    """
    if global_batch_size % world_size:
        raise ValueError(f"global batch size {global_batch_size} does not split evenly over {world_size} ranks; "
                         f"use a multiple of {world_size}")
    per_rank = global_batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)
