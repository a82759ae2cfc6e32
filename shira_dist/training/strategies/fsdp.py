"""``distributed.strategy: fsdp``: FSDP2 over the ShiraModel, one unit per decoder layer + root.

    setup       training.gradient_checkpointing: each decoder layer's forward checkpointed (before
                fully_shard, so FSDP2's hooks stay outside it: common.enable_gradient_checkpointing);
                sync_adapters (rank 0's mask and values everywhere, hash-checked), then
                shard_fsdp2: frozen base and SHiRA values sharded (rows / world per rank);
                AdamW over the sharded values (created after sharding)
    no_sync     set_requires_gradient_sync(False) on the accumulation micro-batches
    save        gather_adapter_state_dict -> rank 0 (adapter only, PEFT keys)
    optimizer   whole Adam moments by parameter name: DTensor.full_tensor(), re-sharded on load

One process asking for fsdp gets a one-rank process group (no network).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ...distributed import shard_fsdp2, sync_adapters
from ...model import ShiraModel
from .common import OptimizerFactory, RankCollectives, StrategyBasics, TorchOptimizerSteps, ensure_process_group, trainable_parameters


class FsdpStrategy(StrategyBasics, TorchOptimizerSteps, RankCollectives):
    """FSDP2: frozen base and SHiRA values sharded per decoder layer."""

    name = "fsdp"
    steps_in_engine = False
    builds_partitioned = False

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        ensure_process_group(self.device)
        self.checkpoint_activations(model)
        sync_adapters(model)
        options = self.cfg.distributed.fsdp
        shard_fsdp2(model, reshard_after_forward=options.reshard_after_forward, cpu_offload=options.cpu_offload)
        self.shira: ShiraModel = model
        self.model: nn.Module = model  # fully_shard keeps the object
        self.params = trainable_parameters(model)  # the sharded values: sharding replaced the parameters
        self.optimizer = make_optimizer(self.params)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)
