"""Strategies where every rank holds the whole model: ``single`` and ``ddp``.

    single   one process: plain autograd and optimizer
    ddp      torch DDP over the ShiraModel: rank 0's adapters are broadcast before wrapping
             (sync_adapters; a mask drawn with random_seed=None, or a data-driven one, differs
             per rank otherwise), then gradients are averaged; only SHiRA values and
             modules_to_save copies are trainable
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
from torch import Tensor, nn

from ...distributed import gather_adapter_state_dict, sync_adapters
from ...model import ShiraModel
from ..dist_env import DistEnv, barrier
from ..schema import RunConfig
from .common import (OptimizerFactory, adapters_in_sync, clip_grad_norm, load_named_optimizer_state,
                     named_optimizer_state, parameter_names, sum_over_ranks, trainable_parameters)


class SingleStrategy:
    """One process: plain autograd and optimizer."""

    name = "single"
    steps_in_engine = False
    builds_partitioned = False

    def __init__(self, env: DistEnv, device: torch.device, cfg: RunConfig) -> None:
        self.env, self.device, self.cfg = env, device, cfg

    def model_construction(self) -> ContextManager:
        return contextlib.nullcontext()

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        self.shira: ShiraModel = model
        self.model: nn.Module = model
        self.params = trainable_parameters(model)
        self.optimizer = make_optimizer(self.params)

    def no_sync(self) -> ContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: Optional[float]) -> float:
        return clip_grad_norm(self.params, max_norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def clip_and_step(self, max_norm: Optional[float]) -> Optional[float]:
        norm = self.clip_grad_norm(max_norm)
        self.optimizer_step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def adapter_state_dict(self, adapter_name: str) -> Optional[dict[str, Tensor]]:
        return gather_adapter_state_dict(self.model, adapter_name)

    def optimizer_state_dict(self) -> Optional[dict]:
        return named_optimizer_state(self.optimizer, parameter_names(self.shira, self.params), self.env.is_main)

    def load_optimizer_state_dict(self, state: dict) -> None:
        load_named_optimizer_state(self.optimizer, state, parameter_names(self.shira, self.params))

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def replicas_in_sync(self) -> bool:
        return True


class DdpStrategy:
    """torch DDP over the ShiraModel: every rank holds the whole model, gradients are averaged."""

    name = "ddp"
    steps_in_engine = False
    builds_partitioned = False

    def __init__(self, env: DistEnv, device: torch.device, cfg: RunConfig) -> None:
        self.env, self.device, self.cfg = env, device, cfg

    def model_construction(self) -> ContextManager:
        return contextlib.nullcontext()

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        from torch.nn.parallel import DistributedDataParallel

        sync_adapters(model, broadcast=True)
        self.shira: ShiraModel = model
        self.params = trainable_parameters(model)
        self.optimizer = make_optimizer(self.params)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model: nn.Module = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False,
                                                        find_unused_parameters=False)

    def no_sync(self) -> ContextManager:
        return self.model.no_sync()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: Optional[float]) -> float:
        return clip_grad_norm(self.params, max_norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def clip_and_step(self, max_norm: Optional[float]) -> Optional[float]:
        norm = self.clip_grad_norm(max_norm)
        self.optimizer_step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def adapter_state_dict(self, adapter_name: str) -> Optional[dict[str, Tensor]]:
        return gather_adapter_state_dict(self.model, adapter_name)

    def optimizer_state_dict(self) -> Optional[dict]:
        return named_optimizer_state(self.optimizer, parameter_names(self.shira, self.params), self.env.is_main)

    def load_optimizer_state_dict(self, state: dict) -> None:
        load_named_optimizer_state(self.optimizer, state, parameter_names(self.shira, self.params))

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return sum_over_ranks(tensor, self.device)

    def barrier(self) -> None:
        barrier()

    def replicas_in_sync(self) -> bool:
        return adapters_in_sync(self.model)
