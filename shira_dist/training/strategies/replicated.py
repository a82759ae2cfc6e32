"""Strategies where every rank holds the whole model: ``single`` and ``ddp``.

    single   one process: plain autograd and optimizer
    ddp      torch DDP over the ShiraModel: rank 0's adapters are broadcast before wrapping
             (sync_adapters; a mask drawn with random_seed=None, or a data-driven one, differs
             per rank otherwise), then gradients are averaged; only SHiRA values and
             modules_to_save copies are trainable
             (adapter lora/dora: PEFT's LoRA model, rank 0's A/B/magnitudes broadcast)
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

from torch import Tensor, nn

from ...distributed import sync_adapters
from ...model import ShiraModel
from ..lora_baseline import broadcast_lora, unwrap_lora_model
from .common import OptimizerFactory, RankCollectives, StrategyBasics, TorchOptimizerSteps, trainable_parameters


class SingleStrategy(StrategyBasics, TorchOptimizerSteps):
    """One process: plain autograd and optimizer."""

    name = "single"
    steps_in_engine = False
    builds_partitioned = False

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        self.shira: ShiraModel = model
        self.checkpoint_activations(model)
        self.model: nn.Module = model
        self.params = trainable_parameters(model)
        self.optimizer = make_optimizer(self.params)

    def no_sync(self) -> ContextManager:
        return contextlib.nullcontext()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def replicas_in_sync(self) -> bool:
        return True


class DdpStrategy(StrategyBasics, TorchOptimizerSteps, RankCollectives):
    """torch DDP over the ShiraModel: every rank holds the whole model, gradients are averaged."""

    name = "ddp"
    steps_in_engine = False
    builds_partitioned = False

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.checkpoint_activations(model)
        if unwrap_lora_model(model) is not None:  # PEFT's LoRA baseline: no mask, rank 0's A and B
            broadcast_lora(model, self.device)
        else:
            sync_adapters(model, broadcast=True)
        self.shira: ShiraModel = model
        self.params = trainable_parameters(model)
        self.optimizer = make_optimizer(self.params)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model: nn.Module = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False,
                                                        find_unused_parameters=False)

    def no_sync(self) -> ContextManager:
        return self.model.no_sync()
