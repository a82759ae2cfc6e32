"""``distributed.strategy: deepspeed``: DeepSpeed ZeRO stage 0-3 over the ShiraModel.

    config      distributed.deepspeed_config (or DEFAULT_DEEPSPEED_CONFIG) with the run's micro
                batch, accumulation, clipping and distributed.zero_stage filled in; its optimizer
                and scheduler are the job's (built from training.*)
    build       ZeRO-3 with distributed.zero_init: the base model is built partitioned
    setup       sync_adapters, then deepspeed_initialize with the job's AdamW; gradient
                accumulation is the loop's (``managed_gradient_accumulation: false``: each
                backward accumulates, ``step()`` is the boundary)
    step        engine.step() clips to gradient_clipping and steps in one call: the loop sees the
                gradient norm only afterwards (``steps_in_engine``)
    optimizer   whole Adam moments by parameter name, through deepspeed.utils'
                safe_get/set_full_optimizer_state, so any strategy resumes any other

DeepSpeed is imported only here, inside the functions that need it, with its accelerator named
first on a CPU (it warns when it has to guess). One process gets a one-rank process group.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import ContextManager, Optional

import torch
from torch import Tensor, nn

from ...distributed import deepspeed_config, deepspeed_initialize, gather_adapter_state_dict, sync_adapters
from ...distributed import zero_stage_of
from ...masks import CALIBRATED_MASKS
from ...model import ShiraModel
from ..schema import RunConfig
from .common import (OptimizerFactory, RankCollectives, StrategyBasics, ensure_process_group, from_named, is_named,
                     parameter_names, to_named, trainable_parameters)

# Used when distributed.deepspeed_config is not given (zero_stage picks the stage, default 2).
DEFAULT_DEEPSPEED_CONFIG = {"zero_optimization": {"stage": 2, "overlap_comm": False},
                            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
_JOB_OWNED = ("optimizer", "scheduler")  # the job builds these from training.*
_MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-entry state


# ---- the config ---------------------------------------------------------------------------------
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


def builds_partitioned(run_cfg: RunConfig) -> bool:
    """Whether the base model is built under ZeRO-3 zero.Init (``distributed.zero_init``).

    ``auto`` applies it to weights loaded from a directory whose mask needs no whole-model scores: a
    random-init inline model is drawn differently under zero.Init, and is built whole so every engine
    and resume agree. ``true`` with a stage other than 3 is a ValueError."""
    setting, stage = run_cfg.distributed.zero_init, zero_stage_of(job_deepspeed_config(run_cfg))
    if setting is True and stage != 3:
        raise ValueError(f"distributed.zero_init=true needs ZeRO stage 3, but this run uses stage {stage} "
                         "(set distributed.zero_stage=3 or use configs/deepspeed/zero3*.json)")
    if setting == "auto":
        return stage == 3 and run_cfg.model.inline_config is None and \
            run_cfg.shira.mask_type not in CALIBRATED_MASKS
    return setting


def check_deepspeed_config(run_cfg: RunConfig) -> None:
    """Preflight: distributed.deepspeed_config is a JSON object the job can complete (micro batch,
    accumulation, clipping are the job's; so are the optimizer and scheduler), with a ZeRO stage 0-3,
    and distributed.zero_init fits it. Imports no DeepSpeed."""
    d = run_cfg.distributed
    if d.strategy != "deepspeed":
        return
    path = d.deepspeed_config
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"distributed.deepspeed_config={path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"distributed.deepspeed_config={path!r} is not valid JSON: line {e.lineno} column "
                                 f"{e.colno}: {e.msg}") from None
        if not isinstance(data, dict):
            raise ValueError(f"distributed.deepspeed_config={path!r} holds a JSON {type(data).__name__}; expected an "
                             'object, e.g. {"zero_optimization": {"stage": 2}}')
        zero = data.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ValueError(f"distributed.deepspeed_config={path!r}: zero_optimization={zero!r} is invalid; expected "
                             'an object, e.g. {"stage": 2}')
        stage = zero.get("stage", 0)
        if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            raise ValueError(f"distributed.deepspeed_config={path!r}: zero_optimization.stage={stage!r} is invalid; "
                             "allowed: 0, 1, 2, 3 (or set distributed.zero_stage)")
        owned = [k for k in _JOB_OWNED if k in data]
        if owned:
            raise ValueError(f"distributed.deepspeed_config={path!r} has {owned} section(s); the training job builds "
                             "the optimizer and learning-rate schedule from training.* — remove them")
    builds_partitioned(run_cfg)  # the per-run fields must agree with the JSON


def _name_cpu_accelerator(device: torch.device) -> None:
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# ---- the strategy -------------------------------------------------------------------------------
class DeepSpeedStrategy(StrategyBasics, RankCollectives):
    """DeepSpeed ZeRO stage 0-3 (optimizer offload as the JSON says) over the ShiraModel."""

    name = "deepspeed"
    steps_in_engine = True

    def __init__(self, env, device: torch.device, cfg: RunConfig) -> None:
        super().__init__(env, device, cfg)
        self.config = job_deepspeed_config(cfg)
        self.stage = zero_stage_of(self.config)
        self.builds_partitioned = False  # True once model_construction applies zero.Init

    def model_construction(self) -> ContextManager:
        """Under ZeRO-3 (``distributed.zero_init``) the base model is built partitioned.

        transformers builds a model under ``deepspeed.zero.Init`` (and loads pretrained weights
        one gathered parameter at a time) while an ``HfDeepSpeedConfig`` is alive; it is kept for
        the whole run, as the HF Trainer does, since transformers holds it by a weak reference.
        """
        if not builds_partitioned(self.cfg):
            return contextlib.nullcontext()
        _name_cpu_accelerator(self.device)
        ensure_process_group(self.device)
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_deepspeed_config = HfDeepSpeedConfig(self.config)
        self.builds_partitioned = True
        return contextlib.nullcontext()

    def setup(self, model: ShiraModel, make_optimizer: OptimizerFactory) -> None:
        _name_cpu_accelerator(self.device)
        self.checkpoint_activations(model)
        ensure_process_group(self.device)
        sync_adapters(model)
        self.shira: ShiraModel = model
        self.params = trainable_parameters(model)
        # The scheduler drives the client optimizer's param_groups, which ZeRO steps with.
        self.optimizer = make_optimizer(self.params)
        self.engine, _, _ = deepspeed_initialize(model, self.config, optimizer=self.optimizer)
        self.model: nn.Module = self.engine

    def no_sync(self) -> ContextManager:
        return contextlib.nullcontext()  # backward only accumulates; step() is the boundary

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: Optional[float]) -> float:
        raise RuntimeError("DeepSpeed clips and steps inside its engine: use clip_and_step")

    def optimizer_step(self) -> None:
        raise RuntimeError("DeepSpeed clips and steps inside its engine: use clip_and_step")

    def clip_and_step(self, max_norm: Optional[float]) -> Optional[float]:
        """engine.step() (clipping to gradient_clipping); the gradient norm it measured, or None when it
        measured none (ZeRO-0, ``compute_grad_norm: false``)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def zero_grad(self) -> None:
        pass  # the engine clears its gradient buffers in step()

    def adapter_state_dict(self, adapter_name: str) -> Optional[dict[str, Tensor]]:
        return gather_adapter_state_dict(self.model, adapter_name)  # collective; None off rank 0

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
        names = parameter_names(self.shira, self.params)
        return to_named({"state": state, "param_groups": groups}, names) if self.env.is_main else None

    def load_optimizer_state_dict(self, state: dict) -> None:
        if not is_named(state):
            raise ValueError("this checkpoint's optimizer state is not keyed by parameter name, so DeepSpeed cannot "
                             "load it; resume with training.resume=never or from a newer checkpoint")
        loaded = from_named(state, parameter_names(self.shira, self.params), [{"params": self.params}])
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
