"""``distributed.strategy: fsdp``: FSDP2 over the ShiraModel, one unit per decoder layer + root.

    setup       sync_adapters (rank 0's mask and values everywhere, hash-checked), then
                shard_fsdp2: frozen base and SHiRA values sharded (rows / world per rank);
                AdamW over the sharded values (created after sharding)
    no_sync     set_requires_gradient_sync(False) on the accumulation micro-batches
    save        gather_adapter_state_dict -> rank 0 (adapter only, PEFT keys)
    optimizer   whole Adam moments by parameter name: DTensor.full_tensor(), re-sharded on load

One process asking for fsdp gets a one-rank process group (no network).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Optional

import torch
from torch import Tensor, nn

from ...distributed import gather_adapter_state_dict, shard_fsdp2, sync_adapters
from ...model import ShiraModel
from ..dist_env import DistEnv, barrier
from ..schema import RunConfig
from .common import (OptimizerFactory, adapters_in_sync, clip_grad_norm, ensure_process_group,
                     load_named_optimizer_state, named_optimizer_state, parameter_names, sum_over_ranks,
                     trainable_parameters)


class FsdpStrategy:
    """FSDP2: frozen base and SHiRA values sharded per decoder layer."""

    name = "fsdp"
    steps_in_engine = False
    builds_partitioned = False

    def __init__(self, env: DistEnv, device: torch.device, cfg: RunConfig) -> None:
        self.env, self.device, self.cfg = env, device, cfg

    def model_construction(self) -> ContextManager:
        return contextlib.nullcontext()

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        ensure_process_group(self.device)
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
        return gather_adapter_state_dict(self.model, adapter_name)  # collective; None off rank 0

    def optimizer_state_dict(self) -> Optional[dict]:
        """Whole Adam moments by name on rank 0 (collective: every rank gathers its shards)."""
        return named_optimizer_state(self.optimizer, parameter_names(self.shira, self.params), self.env.is_main)

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Every rank loads the whole saved state and keeps its own shard of each moment."""
        load_named_optimizer_state(self.optimizer, state, parameter_names(self.shira, self.params))

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return sum_over_ranks(tensor, self.device)

    def barrier(self) -> None:
        barrier()

    def replicas_in_sync(self) -> bool:
        return adapters_in_sync(self.model)
