"""The training job's sharded strategies: ``distributed.strategy: fsdp | deepspeed``.

Importing ``shira_dist.distributed`` registers both with ``shira_dist.training``; the job
(``python -m shira_dist.train``) then drives them through the TrainingStrategy contract:

    setup       sync_adapters (rank 0's mask and values everywhere, hash-checked)
                fsdp:      shard_fsdp2 (one unit per decoder layer + root), AdamW over the
                           sharded values (created after sharding)
                deepspeed: deepspeed_initialize with the job's AdamW; gradient accumulation
                           is the loop's (``managed_gradient_accumulation: false``: each
                           backward accumulates, ``step()`` is the boundary)
    backward    loss.backward()              | engine.backward(loss, scale_wrt_gas=False)
    step        clip_grad_norm_ + step       | engine.step() (clips to gradient_clipping)
    save        gather_adapter_state_dict    -> rank 0 (adapter only, PEFT keys)
    optimizer   whole Adam moments by parameter name (optim_state.py): DTensor.full_tensor()
                | deepspeed.utils.safe_get_full_optimizer_state; any strategy resumes any other

Data-driven masks are computed by the job before setup (the model is whole then) and rank
0's is broadcast.
One process asking for fsdp/deepspeed gets a one-rank process group (no network).
"""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from ..masks import CALIBRATED_MASKS
from ..model import ShiraModel
from ..training import optim_state, register_strategy
from ..training.schema import RunConfig
from ..training.strategy import DdpStrategy, OptimizerFactory, SingleStrategy, trainable_parameters
from .adapter_io import gather_adapter_state_dict
from .consistency import MaskMismatchError, check_adapters_consistent, sync_adapters
from .fsdp import shard_fsdp2
from .zero import deepspeed_config, deepspeed_initialize, zero_stage_of

# Used when distributed.deepspeed_config is not given (zero_stage picks the stage, default 2).
DEFAULT_DEEPSPEED_CONFIG = {"zero_optimization": {"stage": 2, "overlap_comm": False},
                            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
_JOB_OWNED = ("optimizer", "scheduler")  # the job builds these from training.*
_MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-entry state


def job_deepspeed_config(run_cfg: RunConfig) -> dict:
    """The DeepSpeed config a training run uses: ``distributed.deepspeed_config`` (or the default)
    with the run's micro batch, accumulation, clipping and ``distributed.zero_stage`` filled in."""
    opts, training = run_cfg.distributed, run_cfg.training
    source = opts.deepspeed_config if opts.deepspeed_config is not None else DEFAULT_DEEPSPEED_CONFIG
    # max_grad_norm and accumulation are the job's: DeepSpeed clips at step(), and each
    # backward only accumulates (the loop scales the loss itself).
    cfg = deepspeed_config(source, micro_batch_size=training.micro_batch_size,
                           gradient_accumulation_steps=training.gradient_accumulation_steps,
                           zero_stage=opts.zero_stage, gradient_clipping=training.max_grad_norm or 0.0)
    owned = [k for k in _JOB_OWNED if k in cfg]
    if owned:
        raise ValueError(f"distributed.deepspeed_config={source!r} has {owned} sections; the training job builds "
                         "the optimizer and learning-rate schedule from training.* — remove them")
    cfg["managed_gradient_accumulation"] = False
    return cfg


def _ensure_process_group(device: torch.device) -> None:
    """A one-rank group when the launcher started a single process (engines need one)."""
    if not dist.is_initialized():
        for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads them from the environment
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


class _ShardedBase(DdpStrategy):
    """Collectives, barrier and the replica check shared by the sharded strategies."""

    def _start(self, model: ShiraModel) -> None:
        _ensure_process_group(self.device)
        sync_adapters(model)
        self.shira = model

    def adapter_state_dict(self, adapter_name: str) -> Optional[dict[str, Tensor]]:
        return gather_adapter_state_dict(self.model, adapter_name)  # collective; None off rank 0

    def replicas_in_sync(self) -> bool:
        """Indices and (gathered) values bit-identical on every rank."""
        try:
            check_adapters_consistent(self.model, values=True)
        except MaskMismatchError:
            return False
        return True


class FsdpStrategy(_ShardedBase):
    """FSDP2: frozen base and SHiRA values sharded per decoder layer (rows / world per rank)."""

    name = "fsdp"

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        self._start(model)
        fsdp = self.cfg.distributed.fsdp
        shard_fsdp2(model, reshard_after_forward=fsdp.reshard_after_forward, cpu_offload=fsdp.cpu_offload)
        SingleStrategy.setup(self, model, make_optimizer)  # the optimizer over the sharded values

    @contextlib.contextmanager
    def no_sync(self) -> ContextManager:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def clip_and_step(self, max_norm: Optional[float]) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, float("inf") if max_norm is None else max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        return float(norm)

    def optimizer_state_dict(self) -> Optional[dict]:
        """Whole Adam moments by name on rank 0 (collective: every rank gathers its shards)."""
        state = self.optimizer.state_dict()
        state["state"] = {i: {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in s.items()}
                          for i, s in sorted(state["state"].items())}
        return optim_state.to_named(state, self.param_names()) if self.env.is_main else None

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Every rank loads the whole saved state and keeps its own shard of each moment."""
        names = self.param_names()
        loaded = optim_state.from_named(state, names, self.optimizer.param_groups) if optim_state.is_named(state) \
            else state
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for index, entry in sorted(loaded["state"].items()):
            p = params[index]
            for key, value in entry.items():
                if isinstance(p, DTensor) and isinstance(value, Tensor) and value.shape == p.shape:
                    entry[key] = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
        self.optimizer.load_state_dict(loaded)


class DeepSpeedStrategy(_ShardedBase):
    """DeepSpeed ZeRO stage 0-3 (optimizer offload as the JSON says) over the ShiraModel."""

    name = "deepspeed"

    def model_construction(self) -> ContextManager:
        """Under ZeRO-3 (``distributed.zero_init``) the base model is built partitioned.

        transformers builds a model under ``deepspeed.zero.Init`` (and loads pretrained weights
        one gathered parameter at a time) while an ``HfDeepSpeedConfig`` is alive; it is kept for
        the whole run, as the HF Trainer does, since transformers holds it by a weak reference.
        ``auto`` applies it to weights loaded from a directory: a random-init inline model is
        drawn differently under zero.Init, and is built whole so every engine and resume agree.
        """
        if not self._zero_init():
            return contextlib.nullcontext()
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _ensure_process_group(self.device)
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_deepspeed_config = HfDeepSpeedConfig(self._config())
        self.builds_partitioned = True
        return contextlib.nullcontext()

    def _zero_init(self) -> bool:
        setting, stage = self.cfg.distributed.zero_init, zero_stage_of(self._config())
        if setting is True and stage != 3:
            raise ValueError(f"distributed.zero_init=true needs ZeRO stage 3; the DeepSpeed config gives stage {stage} "
                             "(set distributed.zero_stage=3 or use configs/deepspeed/zero3*.json)")
        if setting == "auto":  # weights loaded from a directory, whose mask needs no whole-model scores
            return stage == 3 and self.cfg.model.inline_config is None and \
                self.cfg.shira.mask_type not in CALIBRATED_MASKS
        return setting

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self._start(model)
        config = self._config()
        trainable = trainable_parameters(model)
        client = make_optimizer(trainable)
        self.engine, _, _ = deepspeed_initialize(model, config, optimizer=client)
        self.model = self.engine
        self.stage = zero_stage_of(config)
        # The scheduler drives the client optimizer's param_groups, which ZeRO steps with.
        self.optimizer = client
        self.params = trainable

    def _config(self) -> dict:
        return job_deepspeed_config(self.cfg)

    def no_sync(self) -> ContextManager:
        return contextlib.nullcontext()  # backward only accumulates; step() is the boundary

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_and_step(self, max_norm: Optional[float]) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def zero_grad(self) -> None:
        pass  # the engine clears its gradient buffers in step()

    def optimizer_state_dict(self) -> Optional[dict]:
        """Whole Adam moments by name on rank 0 (collective: ZeRO partitions are gathered)."""
        state: dict[int, dict] = {}
        step = torch.tensor(float(self._step_count()))
        for i, p in enumerate(self.params):
            moments = {key: self._full_moment(p, key) for key in _MOMENTS}
            if all(m is not None for m in moments.values()):
                state[i] = {"step": step.clone(), **moments}
        hyper = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        groups = [{**hyper, "params": list(range(len(self.params)))}]
        return optim_state.to_named({"state": state, "param_groups": groups}, self.param_names()) \
            if self.env.is_main else None

    def load_optimizer_state_dict(self, state: dict) -> None:
        if not optim_state.is_named(state):
            raise ValueError("this checkpoint's optimizer state is not keyed by parameter name, so DeepSpeed cannot "
                             "load it; resume with training.resume=never or from a newer checkpoint")
        loaded = optim_state.from_named(state, self.param_names(), [{"params": self.params}])
        if self.stage > 0:
            self._create_zero_moments()
        for index, entry in loaded["state"].items():
            for key in _MOMENTS:
                self._set_full_moment(self.params[index], entry[key], key)
        steps = [float(e["step"]) for e in loaded["state"].values()]
        if steps:
            for entry in self.optimizer.state.values():  # ZeRO's flat partitions share one step count
                if "step" in entry:
                    entry["step"] = torch.tensor(max(steps)) if isinstance(entry["step"], Tensor) else int(max(steps))
        self.optimizer.param_groups[0].update({k: v for k, v in loaded["param_groups"][0].items() if k != "params"})

    def param_names(self) -> list[str]:
        name_of = {id(p): n for n, p in self.shira.named_parameters()}
        return [name_of[id(p)] for p in self.params]

    def _create_zero_moments(self) -> None:
        """Allocate AdamW's state on ZeRO's flat fp32 partitions (torch creates it lazily at
        the first step, and DeepSpeed links parameters to it only then) so it can be filled."""
        zero = self.engine.optimizer
        flats = getattr(zero, "single_partition_of_fp32_groups", None)  # stages 1-2
        if flats is None:
            flats = getattr(zero, "fp32_partitioned_groups_flat", None)  # stage 3
        if flats is None:
            raise RuntimeError(f"cannot restore optimizer state into {type(zero).__name__}: no flat fp32 partitions")
        for flat in flats:
            entry = self.optimizer.state[flat]
            if not entry:
                entry.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()

    def _step_count(self) -> int:
        for entry in self.optimizer.state.values():
            if "step" in entry:
                return int(entry["step"])
        return 0

    def _full_moment(self, p: Tensor, key: str) -> Optional[Tensor]:
        """The whole ``key`` moment of parameter p on the CPU (None before the first step)."""
        if self.stage == 0:
            value = self.optimizer.state.get(p, {}).get(key)
        else:
            from deepspeed.utils import safe_get_full_optimizer_state

            value = safe_get_full_optimizer_state(p, key)
        shape = getattr(p, "ds_shape", p.shape)
        return None if value is None else value.detach().to("cpu", torch.float32).reshape(shape).clone()

    def _set_full_moment(self, p: Tensor, value: Tensor, key: str) -> None:
        if self.stage == 0:
            self.optimizer.state.setdefault(p, {})[key] = value.to(p.device, p.dtype).reshape(p.shape).clone()
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(p, value.to(self.device, torch.float32).reshape(getattr(p, "ds_shape", p.shape)),
                                      key)


register_strategy("fsdp", FsdpStrategy)
register_strategy("deepspeed", DeepSpeedStrategy)
