"""Small helpers every strategy shares: find the ShiraModel inside an engine, rank/world,
the data-parallel slice of a global batch, switching layers to the unfused path, and reading
indices that ZeRO-3/FSDP2 shard (:func:`whole_patterns`).

    DDP(ShiraModel).module            ─┐
    DeepSpeedEngine(ShiraModel).module ├─► unwrap_shira_model(...) -> the ShiraModel
    FSDP2: fully_shard(ShiraModel)    ─┘   (FSDP2 keeps the object, only changes its class)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.distributed as dist
from torch import Tensor, nn

from ..layer import ShiraLinear
from ..model import ShiraModel
from ..partitioned import gathered
from ..patterns import SparsePattern


def unwrap_shira_model(model: nn.Module) -> ShiraModel:
    """The ShiraModel inside ``model`` (itself, DDP's/DeepSpeed's/FSDP1's ``.module``, ...)."""
    seen = model
    while not isinstance(seen, ShiraModel):
        inner = getattr(seen, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"{type(model).__name__} holds no ShiraModel: wrap the result of "
                            "shira_dist.get_peft_model / ShiraModel.from_pretrained")
        seen = inner
    return seen


def shira_patterns(model: nn.Module) -> list[SparsePattern]:
    """Every adapter's stored pattern in every SHiRA layer, in a fixed order."""
    return [p for _, layer in unwrap_shira_model(model).shira_layers() for p in layer.shira_indices.patterns.values()]


def pattern_columns(model: nn.Module) -> list[Tensor]:
    """Every SHiRA pattern's ``col`` tensor (the part of the indices ZeRO-3 and FSDP2 shard),
    in a fixed order."""
    return [p.col for p in shira_patterns(model)]


@contextlib.contextmanager
def whole_patterns(model: nn.Module) -> Iterator[None]:
    """Inside the block every SHiRA pattern is whole on this rank, so indices can be read
    (``layer.shira_indices[name]``, ``adapter_state_dict``): ZeRO-3 partitions are gathered
    (``GatheredParameters``), FSDP2 pattern units all-gathered (``SparsePattern.whole``) and
    resharded on exit. Collective: every rank enters it. A no-op where the indices are buffers
    (single process, DDP, FSDP1, ZeRO-1/2)."""
    patterns = shira_patterns(model)
    with contextlib.ExitStack() as stack:
        for p in patterns:
            stack.enter_context(p.whole())
        stack.enter_context(gathered([p.col for p in patterns]))
        yield


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


def use_unfused_path(model: nn.Module) -> int:
    """Put every SHiRA layer on the unfused path (base forward + sparse delta); returns the count.

    The sharding helpers call this (overriding "auto" and "fused"): an engine that gathers a
    weight for the forward and frees it after (FSDP2, ZeRO-3) drops an in-place fused write
    before the backward, and ZeRO-1/2 update the values without a version bump, so a fused
    write would go stale unnoticed. Both were measured to give wrong gradients.
    """
    shira = unwrap_shira_model(model)
    if hasattr(shira, "set_fuse_mode"):  # models from before fused mode have only this path
        shira.set_fuse_mode("unfused")
    return sum(1 for m in shira.modules() if isinstance(m, ShiraLinear))
