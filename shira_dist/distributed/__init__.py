"""SHiRA under data parallelism and sharding engines: DDP, FSDP2 (and FSDP1), DeepSpeed ZeRO-2/3.

    model = get_peft_model(base, cfg)             # or PeftModel.from_pretrained(..., is_trainable=True)
    sync_adapters(model)                          # same indices/values on every rank (hash all-reduce)
    ├─ DDP      DDP(model, forward_sync_buffers=False)          values replicated, grads all-reduced
    │                                                           (indices never change: no buffer sync)
    ├─ FSDP2    shard_fsdp2(model)                              base + values sharded DTensors
    ├─ FSDP1    shard_fsdp1(model)                              use_orig_params=True
    └─ ZeRO     deepspeed_initialize(model, deepspeed_config(json, micro_batch_size=...), optimizer)
    ... train on data_parallel_slice(...) of each global batch ...
    save_adapter(model_or_engine, out_dir)        # gathers the adapter only; rank 0 writes PEFT files

The training job's strategies (``shira_dist.training.strategies``) are built from these.
Every strategy saves the same files, so any run resumes under any other by loading the
adapter before sharding: ``PeftModel.from_pretrained(base, dir, is_trainable=True)``.
Any engine applied directly (``DDP``, ``fully_shard``, ``deepspeed.initialize``, Accelerate)
trains correctly too: these helpers add checks and the adapter-only gathers.
Masks, data-driven ones included, are computed before sharding (``get_peft_model``), then
``sync_adapters`` makes every rank use rank 0's where they may differ.
"""

from .adapter_io import gather_adapter_state_dict, is_zero3_partitioned, save_adapter
from .common import data_parallel_slice, rank_and_world, unwrap_shira_model
from .consistency import MaskMismatchError, broadcast_adapters, check_adapters_consistent, sync_adapters
from .fsdp import decoder_layers, shard_fsdp1, shard_fsdp2
from .zero import deepspeed_config, deepspeed_initialize, unlink_shm_buffer, zero_stage_of

__all__ = [
    "MaskMismatchError",
    "broadcast_adapters",
    "check_adapters_consistent",
    "sync_adapters",
    "shard_fsdp2",
    "shard_fsdp1",
    "decoder_layers",
    "deepspeed_config",
    "deepspeed_initialize",
    "unlink_shm_buffer",
    "zero_stage_of",
    "gather_adapter_state_dict",
    "save_adapter",
    "is_zero3_partitioned",
    "unwrap_shira_model",
    "data_parallel_slice",
    "rank_and_world",
]
