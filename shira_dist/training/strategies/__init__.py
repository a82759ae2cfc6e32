"""How the model is spread over processes: the contract the training loop talks to.

    strategy = make_strategy("ddp", env, device, cfg)  (cfg: the RunConfig)
    with strategy.model_construction(): base = ...  (ZeRO-3 builds it partitioned; others: as is)
    strategy.setup(shira_model, make_optimizer)     wrap or shard the model, build the optimizer
    with strategy.no_sync(): ...                    accumulation micro-batches (no gradient sync)
    strategy.backward(loss)
    norm = strategy.clip_grad_norm(max_norm); strategy.optimizer_step()   the loop looks at the norm
                                                    before the update (non-finite guard)
    norm = strategy.clip_and_step(max_norm)         the same in one call; the only way when
                                                    strategy.steps_in_engine (DeepSpeed's engine
                                                    clips and steps together)
    strategy.zero_grad()
    strategy.adapter_state_dict(name)               full adapter tensors on rank 0 (None elsewhere)
    strategy.optimizer_state_dict() / load_optimizer_state_dict(state)   by name (common.to_named)
    strategy.all_reduce_sum(t); strategy.barrier(); strategy.replicas_in_sync()

    single      replicated.py   one process
    ddp         replicated.py   torch DDP (one process asking for ddp runs single)
    fsdp        fsdp.py         FSDP2, one unit per decoder layer
    deepspeed   deepspeed.py    ZeRO stage 0-3

Each is a flat class built on shira_dist.distributed's helpers (sync_adapters, shard_fsdp2,
deepspeed_initialize, gather_adapter_state_dict, check_adapters_consistent); what they share
is in common.py as functions.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional, Protocol

import torch
from torch import Tensor, nn

from ...model import ShiraModel
from ..dist_env import DistEnv
from ..schema import RunConfig
from .common import OptimizerFactory
from .deepspeed import DeepSpeedStrategy, check_deepspeed_config
from .fsdp import FsdpStrategy
from .replicated import DdpStrategy, SingleStrategy


class TrainingStrategy(Protocol):
    name: str
    model: nn.Module  # what the loop calls forward on (may be a wrapper)
    optimizer: torch.optim.Optimizer
    steps_in_engine: bool  # True: clip_and_step is the only step (the norm is known only after the update)
    builds_partitioned: bool  # True: model_construction built the base model sharded

    def model_construction(self) -> ContextManager: ...  # around building the base model
    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None: ...
    def no_sync(self) -> ContextManager: ...
    def backward(self, loss: Tensor) -> None: ...
    def clip_grad_norm(self, max_norm: Optional[float]) -> float: ...  # global norm, every rank alike
    def optimizer_step(self) -> None: ...
    def clip_and_step(self, max_norm: Optional[float]) -> Optional[float]: ...  # None: no norm measured
    def zero_grad(self) -> None: ...
    def adapter_state_dict(self, adapter_name: str) -> Optional[dict[str, Tensor]]: ...
    def optimizer_state_dict(self) -> Optional[dict]: ...
    def load_optimizer_state_dict(self, state: dict) -> None: ...
    def all_reduce_sum(self, tensor: Tensor) -> Tensor: ...  # sum over ranks, returned on the CPU
    def barrier(self) -> None: ...
    def replicas_in_sync(self) -> bool: ...  # replicated adapter state is bit-identical on every rank


STRATEGIES: dict[str, Callable[[DistEnv, torch.device, RunConfig], TrainingStrategy]] = {
    "single": SingleStrategy,
    "ddp": DdpStrategy,
    "fsdp": FsdpStrategy,
    "deepspeed": DeepSpeedStrategy,
}


def check_strategy(cfg: RunConfig, env: DistEnv) -> None:
    """Fail fast (no process group yet) on a strategy that cannot run in this environment."""
    name = cfg.distributed.strategy
    if name not in STRATEGIES:
        raise ValueError(f"distributed.strategy={name!r} is unknown; supported strategies: {sorted(STRATEGIES)}")
    if name == "single" and env.world_size > 1:
        raise ValueError(f"distributed.strategy='single' but the launcher started {env.world_size} processes "
                         f"({env.source}); use distributed.strategy=ddp (or fsdp/deepspeed)")
    check_deepspeed_config(cfg)


def make_strategy(env: DistEnv, device: torch.device, cfg: RunConfig) -> TrainingStrategy:
    check_strategy(cfg, env)
    name = cfg.distributed.strategy
    if name == "ddp" and not env.distributed:
        name = "single"  # one process: DDP would only add a process group of one
    return STRATEGIES[name](env, device, cfg)


__all__ = ["TrainingStrategy", "OptimizerFactory", "STRATEGIES", "check_strategy", "make_strategy",
           "SingleStrategy", "DdpStrategy", "FsdpStrategy", "DeepSpeedStrategy"]
