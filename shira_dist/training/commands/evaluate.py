"""``shira-dist eval``: the held-out metrics of a saved adapter, as the training job computes them.

    run config (--config, else the run's resolved_config.yaml beside the adapter) + key=value
        ─► the job's base model and tokenizer (models.load_base_model: the same weights, an inline
           model from the same seed) ─► the job's data (data.load_data: the held-out split, cached)
        ─► the adapter on the base as the job loads a checkpoint (models.build_adapter: SHiRA, or
           PEFT's LoRA/DoRA for adapter: lora|dora), the base quantized if model.quantization says
           so (quantize.quantize_base) ─► loop.evaluate, the function the job reports eval_after with

The numbers equal metrics.json's "eval_after" for the run's final adapter (same code, same
data order; only float summation order can differ). Like the job, a packaged data set
(data.prepare) is written under the config's output_dir/data and the tokenized cache lives
under output_dir/cache unless data.cache_dir says otherwise. One process, on CUDA when present.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from ...io import atomic_write_bytes
from ..batches import ExampleEncoder, Objective, label_token_ids
from ..config import load_run_config
from ..data import check_data_files, load_data
from ..dist_env import DistEnv, pick_device
from ..loop import LoopContext, evaluate
from ..models import build_adapter, check_model_source, load_base_model, model_directory
from ..prepare import check_prepare_source
from ..quantize import quantize_base
from ..report import NullTracker
from ..run import _autocast, resolve_num_threads, resolve_precision  # the job's own choices, so numbers match
from ..schema import RunConfig
from .common import CommandError, check_adapter_dir, check_fits, does_not_fit

RESOLVED_CONFIG = "resolved_config.yaml"  # what the job writes into its output_dir
PEFT_TYPES = {"shira": "SHIRA", "lora": "LORA", "dora": "LORA"}  # the run config's adapter -> the saved peft_type


@dataclass
class EvalArgs:
    adapter: str
    config: Optional[str] = None  # None: the run's resolved_config.yaml (adapter in final/ or checkpoints/step-N)
    overrides: list[str] = field(default_factory=list)
    output: Optional[str] = None  # a JSON file for the result


@dataclass
class _OneProcess:
    """What :func:`loop.evaluate` asks of a training strategy, for one process that only scores."""

    model: nn.Module

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor


def find_run_config(adapter: str) -> str:
    """The resolved_config.yaml of the run an adapter came from (<run>/final, <run>/checkpoints/step-N)."""
    here = os.path.abspath(adapter)
    for run_dir in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        path = os.path.join(run_dir, RESOLVED_CONFIG)
        if os.path.isfile(path):
            return path
    raise CommandError(f"no --config given, and no {RESOLVED_CONFIG} of a run beside --adapter={adapter!r} (looked "
                       "in its parent and grandparent); pass --config CONFIG (the run config it was trained with)")


def load_config(path: str, overrides: list[str]) -> RunConfig:
    """The run config, checked as the job's preflight checks the model and data it reads."""
    cfg = load_run_config(path, overrides)
    check_model_source(cfg.model)
    if cfg.data.prepare is not None:
        check_prepare_source(cfg.data.prepare)
    elif not cfg.data.eval_files:
        raise CommandError("the run config has no held-out data (data.eval_files is empty and data.prepare is not "
                           "set); set data.eval_files=[...] to score the adapter on")
    check_data_files(cfg.data)
    return cfg


def _load_adapter(base: nn.Module, where: str, args: EvalArgs, adapter_config: dict, cfg: RunConfig,
                  objective: Objective) -> nn.Module:
    """The saved adapter on ``base`` as the job resumes one (then the base quantized, as the job trains it)."""
    remedy = "pass the run config it was trained with (--config; its model section names the base)"
    if cfg.adapter == "shira":
        check_fits(base, where, args.adapter, adapter_config, remedy)
    try:
        model = build_adapter(base, cfg, args.adapter, None, objective)
    except (ValueError, RuntimeError) as e:  # the checkpoint's checks; PEFT's size mismatches (RuntimeError)
        raise does_not_fit(args.adapter, adapter_config, where, str(e), remedy) from None
    if cfg.model.quantization is not None:
        quantize_base(model, cfg.model.quantization)
    return model


def evaluate_adapter(args: EvalArgs) -> dict:
    """{"adapter", "config", "eval": the job's held-out metrics}; written to args.output when given."""
    adapter_config = check_adapter_dir(args.adapter, tuple(sorted(set(PEFT_TYPES.values()))))
    config_path = args.config or find_run_config(args.adapter)
    cfg = load_config(config_path, args.overrides)
    if adapter_config["peft_type"] != PEFT_TYPES[cfg.adapter]:
        raise CommandError(f"--adapter={args.adapter!r} holds a {adapter_config['peft_type']} adapter, but the run "
                           f"config says adapter={cfg.adapter!r}; pass the config it was trained with")
    threads = resolve_num_threads(cfg.training.num_threads)
    if threads:
        torch.set_num_threads(threads)
    env = DistEnv()
    device = pick_device(env)
    directory = model_directory(cfg.model)
    try:
        base, tokenizer = load_base_model(cfg, directory)
    except (OSError, ValueError) as e:  # no weights or tokenizer there, a vocabulary the embedding cannot hold
        raise CommandError(f"the run config's model ({directory or 'model.inline_config'}) does not load: "
                           f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    objective = Objective.for_model(cfg.task.type, base, label_token_ids(cfg.task, tokenizer))
    data = load_data(cfg, ExampleEncoder(cfg.task, tokenizer), env)
    where = directory or f"the run config's model.inline_config (model_type {cfg.model.inline_config['model_type']})"
    model = _load_adapter(base, where, args, adapter_config, cfg, objective).to(device)
    # Fields evaluate() does not read (the optimizer's schedule, the batch plan, checkpoints) stay None.
    ctx = LoopContext(cfg=cfg, env=env, device=device, strategy=_OneProcess(model), scheduler=None,
                      objective=objective, plan=None, train_data=data.train, eval_data=data.evaluation,
                      pad_id=tokenizer.pad_id, autocast=_autocast(resolve_precision(cfg.training.precision, device),
                                                                  device),
                      tracker=NullTracker(), save_checkpoint=None)
    result = {"adapter": os.path.abspath(args.adapter), "config": config_path, "eval": evaluate(ctx)}
    if args.output is not None:
        atomic_write_bytes(args.output, (json.dumps(result, indent=2) + "\n").encode())
    return result
