"""How the model is spread over processes: the contract the training loop talks to.

    strategy = make_strategy("ddp", env, device, cfg)  (cfg: the RunConfig)
    with strategy.model_construction(): base = ...  (ZeRO-3 builds it partitioned; others: as is)
    strategy.setup(shira_model, make_optimizer)     wrap the model, build the optimizer
    with strategy.no_sync(): ...                    accumulation micro-batches (no gradient sync)
    strategy.backward(loss); strategy.clip_and_step(max_norm); strategy.zero_grad()
    norm = strategy.clip_grad_norm(max_norm); strategy.optimizer_step()   the same, split: the loop
                                                    looks at the norm before the update (non-finite guard)
    strategy.adapter_state_dict()                   full adapter tensors on rank 0 (None elsewhere)
    strategy.optimizer_state_dict() / load_optimizer_state_dict(state)
    strategy.all_reduce_sum(t); strategy.barrier(); strategy.replicas_in_sync()

Built in: ``single`` and ``ddp`` (torch DDP over the ShiraModel; only SHiRA values and
modules_to_save copies are trainable). Sharded strategies (fsdp, deepspeed) plug in with
``register_strategy(name, factory)``: importing ``shira_dist.distributed`` registers them
(``factory(env, device, run_config) -> TrainingStrategy``); if that import fails, asking
for one fails before any process group starts.

A strategy that drives an engine clipping and stepping in one call exposes it as
``strategy.engine`` (DeepSpeed): the loop then cannot look at the gradient norm before the
update, nor drop accumulated gradients (see :func:`steps_inside_engine`).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, ContextManager, Iterable, Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import ShiraModel
from . import optim_state
from .dist_env import DistEnv
from .schema import RunConfig

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class TrainingStrategy(Protocol):
    name: str
    model: nn.Module  # what the loop calls forward on (may be a wrapper)
    optimizer: torch.optim.Optimizer

    def model_construction(self) -> ContextManager: ...  # around building the base model
    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None: ...
    def no_sync(self) -> ContextManager: ...
    def backward(self, loss: Tensor) -> None: ...
    def clip_and_step(self, max_norm: Optional[float]) -> float: ...
    def clip_grad_norm(self, max_norm: Optional[float]) -> float: ...  # global norm, every rank alike
    def optimizer_step(self) -> None: ...
    def zero_grad(self) -> None: ...
    def adapter_state_dict(self, adapter_name: str) -> Optional[dict[str, Tensor]]: ...
    def optimizer_state_dict(self) -> Optional[dict]: ...
    def load_optimizer_state_dict(self, state: dict) -> None: ...
    def all_reduce_sum(self, tensor: Tensor) -> Tensor: ...  # sum over ranks, returned on the CPU
    def barrier(self) -> None: ...
    def replicas_in_sync(self) -> bool: ...  # replicated adapter state is bit-identical on every rank


StrategyFactory = Callable[[DistEnv, torch.device, RunConfig], TrainingStrategy]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets; an error if there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the adapter has no trainable parameters (is the adapter in inference mode?)")
    return params


class SingleStrategy:
    """One process (or, as DdpStrategy's base, one replica): plain autograd and optimizer."""

    name = "single"

    def __init__(self, env: DistEnv, device: torch.device, cfg: RunConfig) -> None:
        self.env, self.device, self.cfg = env, device, cfg
        self.shira: Optional[ShiraModel] = None
        self.builds_partitioned = False  # True: the base model is built sharded (see model_construction)

    def model_construction(self) -> ContextManager:
        """Entered while the job builds the base model: every rank builds it whole."""
        return contextlib.nullcontext()

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        self.shira = model
        self.model = model
        self.params = trainable_parameters(model)
        self.optimizer = make_optimizer(self.params)

    def param_names(self) -> list[str]:
        """The optimizer's parameters' names in the ShiraModel, in optimizer (index) order."""
        name_of = {id(p): n for n, p in self.shira.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def no_sync(self) -> ContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: Optional[float]) -> float:
        """Clip to ``max_norm``; returns the global gradient norm before clipping, the same on every rank
        (DDP: computed from the all-reduced gradients; FSDP2: the DTensor norm, all-reduced here)."""
        limit = float("inf") if max_norm is None else max_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        full_tensor = getattr(norm, "full_tensor", None)  # a DTensor when the parameters are sharded
        return float(full_tensor() if full_tensor is not None else norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def clip_and_step(self, max_norm: Optional[float]) -> float:
        norm = self.clip_grad_norm(max_norm)
        self.optimizer_step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def adapter_state_dict(self, adapter_name: str) -> Optional[dict[str, Tensor]]:
        if not self.env.is_main:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in self.shira.adapter_state_dict(adapter_name).items()}

    def optimizer_state_dict(self) -> Optional[dict]:
        """By-name optimizer state on rank 0 (see optim_state.py), None elsewhere."""
        if not self.env.is_main:
            return None
        return optim_state.to_named(self.optimizer.state_dict(), self.param_names())

    def load_optimizer_state_dict(self, state: dict) -> None:
        if optim_state.is_named(state):
            state = optim_state.from_named(state, self.param_names(), self.optimizer.param_groups)
        self.optimizer.load_state_dict(state)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def replicas_in_sync(self) -> bool:
        return True


class DdpStrategy(SingleStrategy):
    """torch DDP over the ShiraModel: every rank holds the whole model, gradients are averaged.

    All ranks must start from identical adapters: rank 0's SHiRA indices and trainable
    tensors are broadcast before wrapping (a mask drawn with random_seed=None, or a
    data-driven one, differs per rank otherwise)."""

    name = "ddp"

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        from torch.nn.parallel import DistributedDataParallel

        with torch.no_grad():
            for _, layer in model.shira_layers():
                layer.unfuse()
                for adapter in layer.shira_weight:
                    layer.shira_indices.pattern(adapter).broadcast_(src=0, device=self.device)
            for tensor in self._trainable_tensors(model):
                dist.broadcast(tensor.data, src=0)
        super().setup(model, make_optimizer)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False,
                                             find_unused_parameters=False)

    @staticmethod
    def _trainable_tensors(model: ShiraModel) -> list[Tensor]:
        """SHiRA values of every adapter, then other trainable tensors (same order on every rank)."""
        out = [layer.shira_weight[adapter] for _, layer in model.shira_layers() for adapter in layer.shira_weight]
        seen = {id(t) for t in out}
        return out + [p for p in model.parameters() if p.requires_grad and id(p) not in seen]

    @classmethod
    def _adapter_tensors(cls, model: ShiraModel) -> list[Tensor]:
        """Every adapter's pattern buffers, then :meth:`_trainable_tensors` (for the replica check)."""
        patterns = [t for _, layer in model.shira_layers() for adapter in layer.shira_weight
                    for t in layer.shira_indices.pattern(adapter).tensors()]
        return patterns + cls._trainable_tensors(model)

    def no_sync(self) -> ContextManager:
        return self.model.no_sync()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over ranks (on the collective's device); returned on the CPU."""
        reduced = tensor.to(self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.cpu()

    def barrier(self) -> None:
        dist.barrier()

    def replicas_in_sync(self) -> bool:
        """Compare per-tensor checksums of every adapter tensor across ranks (exact equality)."""
        sums = []
        for t in self._adapter_tensors(self.shira):
            flat = t.detach().double().flatten()
            ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
            sums += [flat.sum(), (flat * ramp).sum()]
        mine = torch.stack(sums).to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        return all(torch.equal(g, gathered[0]) for g in gathered)


def steps_inside_engine(strategy: TrainingStrategy) -> bool:
    """True when an engine clips and steps in one call (``strategy.engine``, DeepSpeed): the gradient
    norm is known only after the update, and gradients it accumulated cannot be dropped."""
    return getattr(strategy, "engine", None) is not None


def engine_step(strategy: TrainingStrategy, max_norm: Optional[float]) -> tuple[float, bool]:
    """``clip_and_step`` through the engine: (gradient norm, whether the engine measured one; ZeRO-0
    and ``compute_grad_norm: false`` do not, and the norm then reads nan)."""
    norm = strategy.clip_and_step(max_norm)
    measure = getattr(strategy.engine, "get_global_grad_norm", None)
    return norm, measure is not None and measure() is not None


_REGISTRY: dict[str, StrategyFactory] = {"single": SingleStrategy, "ddp": DdpStrategy}
_PLUGIN_MODULE = "shira_dist.distributed"  # registers fsdp / deepspeed when it exists


def register_strategy(name: str, factory: StrategyFactory) -> None:
    """Make ``distributed.strategy: <name>`` available (used by shira_dist.distributed)."""
    _REGISTRY[name] = factory


_plugin_error: Optional[str] = None


def _load_plugins() -> None:
    global _plugin_error
    try:
        importlib.import_module(_PLUGIN_MODULE)
    except ImportError as e:
        _plugin_error = f"{type(e).__name__}: {e}"


def available_strategies() -> list[str]:
    """Built-in strategies plus those shira_dist.distributed registers (if installed)."""
    _load_plugins()
    return sorted(_REGISTRY)


def check_strategy(name: str, env: DistEnv) -> None:
    """Fail fast (no process group yet) on a strategy that cannot run in this environment."""
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        why = f"importing {_PLUGIN_MODULE} failed: {_plugin_error}" if _plugin_error \
            else f"importing {_PLUGIN_MODULE} did not register it"
        raise ValueError(f"distributed.strategy={name!r} is not available in this installation "
                         f"({why}); supported strategies: {available_strategies()}")
    if name == "single" and env.world_size > 1:
        raise ValueError(f"distributed.strategy='single' but the launcher started {env.world_size} processes "
                         f"({env.source}); use distributed.strategy=ddp (or fsdp/deepspeed)")


def make_strategy(name: str, env: DistEnv, device: torch.device, cfg: RunConfig) -> TrainingStrategy:
    check_strategy(name, env)
    if name == "ddp" and not env.distributed:
        name = "single"  # one process: DDP would only add a process group of one
    return _REGISTRY[name](env, device, cfg)
