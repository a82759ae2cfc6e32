"""What the strategies share: small functions over plain arguments, and two mixins of methods
whose bodies would otherwise repeat in every strategy (no strategy derives from another).

    trainable_parameters(model)            the optimizer's parameters (an error if there are none)
    parameter_names(shira, params)         their names in the ShiraModel, in order
    clip_grad_norm(params, max_norm)       the global norm before clipping, the same on every rank
    sum_over_ranks(tensor, device)         an all-reduce; returned on the CPU
    adapter_tensors(model, name)           the adapter's tensors on rank 0 (SHiRA gathered; or PEFT's LoRA)
    adapters_in_sync(model)                rank 0's indices and values everywhere (blake2b digests)
    enable_gradient_checkpointing(model)   training.gradient_checkpointing: recompute each decoder layer
                                           in backward (every strategy calls it before wrapping/sharding)
    ensure_process_group(device)           a one-rank group for engines started by one process
    named_optimizer_state / load_named_optimizer_state
                                           by-name optimizer state (to_named / from_named), whole tensors:
                                           DTensor shards (FSDP2) are gathered and re-sharded
    StrategyBasics                         constructor, plain model construction and backward
    TorchOptimizerSteps                    clip, step, zero and by-name state of a torch optimizer
                                           (single, ddp, fsdp; DeepSpeed's engine steps itself)
    RankCollectives                        sums, barrier and replica check over the process group
                                           (ddp, fsdp, deepspeed)
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ...distributed import (MaskMismatchError, check_adapters_consistent, gather_adapter_state_dict,
                           rank_and_world)
from ...model import ShiraModel
from ..dist_env import barrier
from ..lora_baseline import lora_replicas_in_sync, lora_state_dict, unwrap_lora_model

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets; an error if there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the adapter has no trainable parameters (is the adapter in inference mode?)")
    return params


def parameter_names(shira: ShiraModel, params: list[Tensor]) -> list[str]:
    """The names of ``params`` in the ShiraModel, in order (the optimizer's index order)."""
    name_of = {id(p): n for n, p in shira.named_parameters()}
    return [name_of[id(p)] for p in params]


def clip_grad_norm(params: list[Tensor], max_norm: Optional[float]) -> float:
    """Clip to ``max_norm`` (None: no clipping); returns the global gradient norm before clipping, the same
    on every rank (DDP: from the all-reduced gradients; FSDP2: the DTensor norm, gathered here)."""
    limit = float("inf") if max_norm is None else max_norm
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def sum_over_ranks(tensor: Tensor, device: torch.device) -> Tensor:
    """Sum over ranks (on the collective's device); returned on the CPU."""
    reduced = tensor.to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def adapter_tensors(model: nn.Module, adapter_name: str) -> Optional[dict[str, Tensor]]:
    """The adapter's tensors under PEFT's keys on rank 0 (collective; None elsewhere). PEFT's LoRA
    baseline (adapter lora/dora, replicated strategies only) is copied from rank 0's own model."""
    if unwrap_lora_model(model) is None:
        return gather_adapter_state_dict(model, adapter_name)
    return lora_state_dict(model, adapter_name) if rank_and_world()[0] == 0 else None


def adapters_in_sync(model: nn.Module) -> bool:
    """Indices and (gathered) values bit-identical on every rank (True without a process group)."""
    if unwrap_lora_model(model) is not None:
        return lora_replicas_in_sync(model)
    try:
        check_adapters_consistent(model, values=True)
    except MaskMismatchError:
        return False
    return True


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing per decoder layer: Hugging Face's own switch on the transformers model
    inside ``model`` (its GradientCheckpointingLayer blocks), non-reentrant.

    transformers checkpoints each layer's ``forward``, not its ``__call__``: the layer's own hooks
    stay outside the checkpoint, as with torch's checkpoint_wrapper applied before fully_shard, so
    FSDP2 gathers a layer once for its forward and once (pre-backward) for its recomputation and
    backward. Non-reentrant (use_reentrant=False) because: gradients reach the SHiRA values inside
    a layer whose input does not require grad (frozen base, frozen embeddings); the recomputation
    runs the hooks of the modules inside the layer again, which DeepSpeed ZeRO-3 needs (they gather
    the partitioned weights again); and it is the mode torch recommends, and supports with DDP and
    FSDP2 (reentrant checkpointing would also need every layer input to require grad). The module tree and parameter names stay as they are (a wrapper
    module would rename every checkpointed tensor, hence every checkpoint key). Called before any
    wrapping or sharding. SHiRA's fused mode writes the same W0 + s*values again in the
    recomputation (no optimizer step lies between a forward and its backward), so the gradients are
    those of the run without checkpointing (tests/training/test_gradient_checkpointing.py)."""
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None or not hf.supports_gradient_checkpointing:
        what = type(hf if hf is not None else model).__name__
        raise ValueError(f"training.gradient_checkpointing=true: {what} does not support activation checkpointing "
                         "(supports_gradient_checkpointing is False); set training.gradient_checkpointing=false")
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def ensure_process_group(device: torch.device) -> None:
    """A one-rank group when the launcher started a single process (engines need one)."""
    if not dist.is_initialized():
        for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads them from the environment
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str], is_main: bool) -> Optional[dict]:
    """The optimizer's state by parameter name on rank 0 (None elsewhere), with whole tensors.

    Collective when moments are DTensor shards (FSDP2): every rank must call it."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in s.items()}
                      for i, s in sorted(state["state"].items())}
    return to_named(state, names) if is_main else None


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, names: list[str]) -> None:
    """Load a saved state (by name, or torch's own form); every rank keeps its own shard of a sharded moment."""
    loaded = from_named(state, names, optimizer.param_groups) if is_named(state) else state
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, entry in loaded["state"].items():
        p = params[index]
        if not isinstance(p, DTensor):
            continue
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.shape == p.shape:
                entry[key] = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
    optimizer.load_state_dict(loaded)


class StrategyBasics:
    """Mixin: the constructor and the plain parts of a strategy (engines override what they own)."""

    def __init__(self, env, device: torch.device, cfg) -> None:
        self.env, self.device, self.cfg = env, device, cfg

    def model_construction(self) -> ContextManager:
        return contextlib.nullcontext()

    def checkpoint_activations(self, model: nn.Module) -> None:
        """training.gradient_checkpointing: switched on here, at the start of setup (before any wrapping)."""
        if self.cfg.training.gradient_checkpointing:
            enable_gradient_checkpointing(model)

    def backward(self, loss: Tensor) -> None:
        loss.backward()


class TorchOptimizerSteps:
    """Mixin for strategies that step a torch optimizer themselves. Uses ``self.shira``,
    ``self.model``, ``self.params``, ``self.optimizer`` and ``self.env``, set by ``setup``."""

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
        """The adapter's tensors under PEFT's keys on rank 0 (collective; None elsewhere)."""
        return adapter_tensors(self.model, adapter_name)

    def optimizer_state_dict(self) -> Optional[dict]:
        """Whole optimizer state by parameter name on rank 0 (collective: shards are gathered)."""
        return named_optimizer_state(self.optimizer, parameter_names(self.shira, self.params), self.env.is_main)

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Every rank loads the whole saved state and keeps its own shard of each tensor."""
        load_named_optimizer_state(self.optimizer, state, parameter_names(self.shira, self.params))


class RankCollectives:
    """Mixin for strategies over a process group. Uses ``self.device`` and ``self.model``."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return sum_over_ranks(tensor, self.device)

    def barrier(self) -> None:
        barrier()

    def replicas_in_sync(self) -> bool:
        return adapters_in_sync(self.model)

# ---- optimizer state by parameter name --------------------------------------------------
# torch's optimizer.state_dict()                     by name (what trainer_state.pt holds)
#   {"state": {0: {...}, 1: {...}},       to_named   {"format": NAMED_FORMAT,
#    "param_groups": [{..., "params": [0, 1]}]} ──►   "state": {"<param name>": {...}},
#                                         ◄──         "param_groups": [{..., "params": ["<name>", ...]}]}
#                                         from_named
# Names are the model's named_parameters() names, the same under DDP, FSDP2 and DeepSpeed;
# state tensors are whole CPU tensors, so a checkpoint resumes under any strategy (a ZeRO-3
# run as one process and the other way round) with Adam's moments intact.

NAMED_FORMAT = "shira_dist.optimizer_by_name/1"


def is_named(state: dict) -> bool:
    return state.get("format") == NAMED_FORMAT


def to_named(state: dict, names: list[str]) -> dict:
    """torch's index-keyed ``optimizer.state_dict()`` -> by-name; ``names[i]`` is parameter i."""
    index_to_name: dict[int, str] = {}
    groups = []
    for group in state["param_groups"]:
        for index in group["params"]:
            if index >= len(names):
                raise ValueError(f"optimizer parameter index {index} has no name (got {len(names)} names)")
            index_to_name[index] = names[index]
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[i] for i in group["params"]]})
    return {"format": NAMED_FORMAT, "param_groups": groups,
            "state": {index_to_name[i]: dict(s) for i, s in state["state"].items()}}


def from_named(named: dict, names: list[str], current_groups: list[dict[str, Any]]) -> dict:
    """By-name -> the index-keyed dict ``optimizer.load_state_dict`` takes.

    ``names``: this optimizer's parameters in order (``current_groups`` its param_groups,
    whose sizes must match the saved groups). Raises ValueError naming the first parameter
    the saved state lacks or has in excess (a different adapter or trainable set).
    """
    if not is_named(named):
        raise ValueError(f"optimizer state format {named.get('format')!r} is not {NAMED_FORMAT!r}")
    saved_names = [n for g in named["param_groups"] for n in g["params"]]
    missing = [n for n in names if n not in set(saved_names)]
    extra = [n for n in saved_names if n not in set(names)]
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which this run does not train"
        raise ValueError(f"the checkpoint's optimizer state {what} ({len(missing)} missing, {len(extra)} extra): "
                         "resume with the same adapter targets and modules_to_save")
    if len(named["param_groups"]) != len(current_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(named['param_groups'])} parameter groups, "
                         f"this run's has {len(current_groups)}")
    index = {n: i for i, n in enumerate(names)}
    groups = [{**{k: v for k, v in saved.items() if k != "params"}, "params": [index[n] for n in cur_names]}
              for saved, cur_names in zip(named["param_groups"], _group_names(current_groups, names))]
    return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def _group_names(groups: list[dict[str, Any]], names: list[str]) -> list[list[str]]:
    out, start = [], 0
    for group in groups:
        out.append(names[start:start + len(group["params"])])
        start += len(group["params"])
    return out
