"""DeepSpeed ZeRO-1/2/3 (optionally with the optimizer offloaded to the CPU) for a ShiraModel.

    stage 1-2  frozen base: whole on every rank, untouched by the engine
               SHiRA values: fp32 master + Adam state partitioned; gradients reduced
               (adapter-sized traffic), then the updated values all-gathered
    stage 3    every parameter partitioned, frozen ones too (``numel() == 0`` outside forward);
               a SHiRA layer is a ZeRO-3 leaf module (``ShiraLinear._z3_leaf``): its base
               weight and its values are gathered together around its forward and backward

Nothing here is needed for correctness: ``deepspeed.initialize`` called directly works the
same (the layers compute with the values as they are at every forward, and fuse only into
weights they own and the engine does not swap). This adds the checks of a client optimizer
against the config, and the per-run fields of the config.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

import torch
from torch import nn

from .common import unwrap_shira_model


def deepspeed_config(config: str | os.PathLike | dict, micro_batch_size: int, gradient_accumulation_steps: int = 1,
                     zero_stage: Optional[int] = None, gradient_clipping: Optional[float] = None) -> dict:
    """A DeepSpeed config dict from a JSON file (e.g. configs/deepspeed/zero3.json) or a dict.

    Fills the per-run values the shipped files leave out: ``train_micro_batch_size_per_gpu``,
    ``gradient_accumulation_steps`` (global batch = micro × accumulation × world size),
    and optionally overrides ``zero_optimization.stage`` and ``gradient_clipping``.
    """
    if isinstance(config, dict):
        cfg = copy.deepcopy(config)
    else:
        with open(config) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"DeepSpeed config {str(config)!r} is not valid JSON: {e}") from e
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch_size),
                       ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if cfg.get(key, value) != value:
            raise ValueError(f"DeepSpeed config sets {key}={cfg[key]} but this run uses {value}; "
                             "leave it out of the JSON (the run fills it in)")
        cfg[key] = value
    if "train_batch_size" in cfg:
        raise ValueError("DeepSpeed config sets train_batch_size; leave it out (it follows from micro batch, "
                         "accumulation and world size)")
    if zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = zero_stage
    if gradient_clipping is not None:
        cfg["gradient_clipping"] = gradient_clipping
    return cfg


def zero_stage_of(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _check_optimizer_config(config: dict, optimizer: Optional[torch.optim.Optimizer]) -> None:
    zero = config.get("zero_optimization", {})
    if optimizer is None:
        if "optimizer" not in config:
            raise ValueError("give an optimizer or an 'optimizer' section in the DeepSpeed config")
        return
    if zero.get("stage", 0) > 0 and not config.get("zero_allow_untested_optimizer", False):
        raise ValueError(f"a client optimizer ({type(optimizer).__name__}) under ZeRO needs "
                         '"zero_allow_untested_optimizer": true in the DeepSpeed config')
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if offloaded and config.get("zero_force_ds_cpu_optimizer", True):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if not isinstance(optimizer, DeepSpeedCPUAdam):
            raise ValueError(f"optimizer offload with a client {type(optimizer).__name__} needs "
                             '"zero_force_ds_cpu_optimizer": false (or use deepspeed.ops.adam.DeepSpeedCPUAdam)')


def deepspeed_initialize(model: nn.Module, config: dict, optimizer: Optional[torch.optim.Optimizer] = None,
                         lr_scheduler: Optional[Any] = None) -> tuple[Any, Any, Any]:
    """``deepspeed.initialize`` for a ShiraModel; returns (engine, optimizer, lr_scheduler).

    Args:
        model: the ShiraModel (after :func:`sync_adapters`), the same on every rank.
        config: a dict from :func:`deepspeed_config`.
        optimizer: a client optimizer over the trainable parameters (e.g. torch AdamW), or
            None to build the one in ``config["optimizer"]`` over them.
        lr_scheduler: a client scheduler for ``optimizer``, or None.

    Training loop: ``loss = engine(**batch).loss; engine.backward(loss); engine.step()``.
    Save with :func:`save_adapter` (adapter only), never a full-model gather.
    """
    import deepspeed

    shira = unwrap_shira_model(model)
    if shira is not model:
        raise TypeError(f"deepspeed_initialize takes the ShiraModel itself, not a {type(model).__name__}")
    _check_optimizer_config(config, optimizer)
    shira.unfuse()  # the engine copies and partitions weights: W0, not a fused write
    trainable = [p for p in shira.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (load adapters with is_trainable=True)")
    engine, opt, _, sched = deepspeed.initialize(
        model=shira, optimizer=optimizer, model_parameters=trainable if optimizer is None else None,
        config=config, lr_scheduler=lr_scheduler)
    unlink_shm_buffer()
    return engine, opt, sched


def unlink_shm_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer.

    On the CPU accelerator, DeepSpeed's communication backend creates a 69 MB
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank and never
    unlinks it, so each job would leave them in memory (tmpfs) after it ends. Once every rank
    has mapped its peers' buffers (the barrier), the names are no longer needed: the mappings
    stay valid until the processes exit, and the memory is returned then. Collective; a no-op
    where no such file exists (GPU accelerators, ranks on different hosts).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    dist.barrier()
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass
