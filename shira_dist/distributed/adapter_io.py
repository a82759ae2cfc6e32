"""Adapter-only checkpoints from a sharded model: gather the SHiRA tensors, never the model.

    ShiraModel.adapter_state_dict(name)      PEFT keys -> the live tensors (no copies)
        │  plain tensor (single, DDP, ZeRO-2)  -> as is
        │  DTensor (FSDP2 shard)               -> .full_tensor()       (all-gather of that tensor)
        │  ZeRO-3 partitioned parameter        -> GatheredParameters   (all-gather of those only)
        │  FSDP1 (use_orig_params)             -> summon_full_params of the units holding
        │                                         trainables only (values + norms), recurse=False
        ▼
    rank 0: checkpoint.write_adapter_tensors + ShiraConfig.save_pretrained   (same files as
            ShiraModel.save_pretrained, so ShiraModel / peft.PeftModel.from_pretrained load them)

Only adapter-sized tensors move (values and modules_to_save copies); indices are buffers,
whole on every rank. Everything here is collective: call it on all ranks.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .. import checkpoint as ckpt
from ..partitioned import gathered
from ..partitioned import is_partitioned as is_zero3_partitioned
from .common import rank_and_world, unwrap_shira_model

_FSDP1_WRAPPER = "_fsdp_wrapped_module."  # FSDP1 inserts this into module paths


@contextlib.contextmanager
def _fsdp1_gathered(model: nn.Module) -> Iterator[None]:
    """Under FSDP1, summon (recurse=False) only the units that hold trainable tensors."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from .fsdp import fsdp1_units_with_trainables

    if not any(isinstance(m, FSDP) for m in model.modules()):
        yield
        return
    if not isinstance(model, FSDP):
        raise TypeError("the model is sharded with FSDP1: pass the root FSDP module that shard_fsdp1 returned "
                        "(its own unit may hold adapter tensors)")
    with contextlib.ExitStack() as stack:
        for unit in fsdp1_units_with_trainables(model):
            stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False))
        yield


def _whole(t: Tensor) -> Tensor:
    """A detached, unsharded, unaliased CPU copy of ``t`` (all-gathers a DTensor)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True)


def gather_adapter_state_dict(model: nn.Module, adapter_name: str = "default",
                              rank0_only: bool = True) -> Optional[dict[str, Tensor]]:
    """One adapter's tensors under PEFT's keys, unsharded, on the CPU.

    ``model``: a ShiraModel, or an engine holding one (DDP, DeepSpeedEngine, FSDP2-sharded,
    the FSDP1 root from ``shard_fsdp1``). Collective (every rank must call it); returns the
    dict on rank 0 and, unless ``rank0_only=False``, on the other ranks too (else None).
    """
    shira = unwrap_shira_model(model)
    with _fsdp1_gathered(model):
        live = shira.adapter_state_dict(adapter_name)
        with gathered(list(live.values())):
            out = {key.replace(_FSDP1_WRAPPER, ""): _whole(t) for key, t in live.items()}
    rank, _ = rank_and_world()
    return out if rank == 0 or not rank0_only else None


def save_adapter(model: nn.Module, save_directory: str | os.PathLike,
                 selected_adapters: Optional[list[str]] = None) -> None:
    """``ShiraModel.save_pretrained`` for a sharded model: gather the adapters, rank 0 writes.

    Writes the same files (adapter_config.json + adapter_model.safetensors, other adapters
    in subfolders). Collective; returns on every rank once the files exist.
    """
    shira = unwrap_shira_model(model)
    names = list(shira.peft_config) if selected_adapters is None else shira._check_adapters(selected_adapters)
    rank, world = rank_and_world()
    for name in names:
        tensors = gather_adapter_state_dict(model, name)
        if rank == 0:
            ckpt.write_adapter(save_directory, name, tensors, shira.peft_config[name])
    if world > 1:
        dist.barrier()

