"""Fail-fast checks that look at the machine (files, packages, launcher), before any process group.

A bad config, a missing data file or model, an unavailable strategy or a launch that
does not fit the strategy stops here with one clear message, on every rank alike, so no
rank is left waiting in a rendezvous for a peer that already exited. The launcher
(``shira-launch``, also with ``--dry-run``) runs the same checks.

    strategy      available, fits the launch; the DeepSpeed JSON's content
    model         the source exists; shira.r fits every targeted layer (on a meta-device copy)
    tokenizer     label words are single tokens; the prompt template fits task.max_length
    data          files exist and are readable; their first rows (data_checks.py); enough examples
    output_dir    a completed run is not silently trained again; a resume point loads and matches

The tokenizer and model checks run where they are cheap (the byte tokenizer, a local model
or tokenizer directory, an inline config); a built-in model not yet converted is checked when
the job loads it, with the same one-line errors.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .checkpointing import checkpoint_step
from .data import check_data_files
from .data_checks import check_data_content
from .dist_env import DistEnv
from .models import check_adapter_fits, check_model_source, meta_model
from .prepare import check_prepare_source
from .resume import check_resume_matches, completed_run, find_resume
from .schema import RunConfig
from .strategy import check_strategy
from .tracking import check_tracking


class PreflightError(RuntimeError):
    """The run cannot start; the message says why and what to change."""


def preflight(cfg: RunConfig, env: DistEnv) -> None:
    try:
        check_strategy(cfg.distributed.strategy, env)
        _check_deepspeed_config(cfg)
        check_model_source(cfg.model)
        if cfg.data.prepare is not None:
            check_prepare_source(cfg.data.prepare)
        check_data_files(cfg.data)
        check_data_content(cfg, env.world_size)
        _check_task_and_adapter(cfg)
        check_tracking(cfg.tracking)
        if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
            raise FileExistsError(f"output_dir={cfg.output_dir!r} exists and is not a directory")
        _check_resume(cfg)
    except (ValueError, OSError, ImportError) as e:
        raise PreflightError(str(e)) from e


def _check_deepspeed_config(cfg: RunConfig) -> None:
    """distributed.deepspeed_config: a JSON object the job can complete (micro batch, accumulation,
    clipping are the job's; so are the optimizer and scheduler), with a ZeRO stage 0-3."""
    d = cfg.distributed
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
        owned = [k for k in ("optimizer", "scheduler") if k in data]
        if owned:
            raise ValueError(f"distributed.deepspeed_config={path!r} has {owned} section(s); the training job builds "
                             "the optimizer and learning-rate schedule from training.* — remove them")
    from ..distributed.strategies import job_deepspeed_config  # registers the engines; imports no DeepSpeed
    from ..distributed.zero import zero_stage_of

    stage = zero_stage_of(job_deepspeed_config(cfg))  # the per-run fields must agree with the JSON
    if d.zero_init is True and stage != 3:
        raise ValueError(f"distributed.zero_init=true needs ZeRO stage 3, but this run uses stage {stage} "
                         "(set distributed.zero_stage=3 or use configs/deepspeed/zero3*.json)")


def _cheap_tokenizer(cfg: RunConfig):
    """The run's tokenizer when it loads without converting a model, else None."""
    from .tokenizer import load_tokenizer

    m = cfg.model
    if m.tokenizer == "bytes":
        return load_tokenizer("bytes", None)
    directory = m.tokenizer or m.path
    if directory is None and m.builtin == "all-minilm-l6-v2":
        from .models import model_directory

        directory = model_directory(m)
    if directory is None:
        return None
    try:
        return load_tokenizer(m.tokenizer or "", directory)
    except (OSError, ValueError):  # no tokenizer files here: the job reports it when it loads the model
        return None


def _check_task_and_adapter(cfg: RunConfig) -> None:
    from .encoding import check_template_fits, label_token_ids

    tokenizer = _cheap_tokenizer(cfg)
    if tokenizer is not None:
        label_token_ids(cfg.task, tokenizer)
        check_template_fits(cfg.task, tokenizer)
    model = meta_model(cfg)
    if model is not None:
        check_adapter_fits(model, cfg.shira)


def _check_resume(cfg: RunConfig) -> None:
    """A completed run is not resumed (nor silently trained over); a resume point loads and fits."""
    tr, out = cfg.training, cfg.output_dir
    if tr.resume == "auto":
        done = completed_run(out)
        if done is not None:
            steps = (done.get("train") or {}).get("steps")
            raise ValueError(f"output_dir={out!r} holds a completed run ({steps} steps, final adapter in "
                             f"{os.path.join(out, 'final')}); to train again from scratch set training.resume=never "
                             "(replaces it), to train it further raise training.max_steps and set training.resume="
                             "<its last checkpoints/step-N>, or choose another output_dir")
    point = find_resume(out, tr.resume)
    if point.directory is None:
        return
    step: Optional[int] = checkpoint_step(point.directory)
    explicit = tr.resume != "auto"
    if step is not None and (step > tr.max_steps or explicit and step == tr.max_steps):
        raise ValueError(f"{point.directory} is at step {step}, training.max_steps={tr.max_steps}: nothing to train; "
                         "raise training.max_steps, or set training.resume=never to start over")
    s = cfg.shira
    check_resume_matches(point.directory, {"r": s.r, "mask_type": s.mask_type, "random_seed": s.random_seed,
                                           "target_modules": s.target_modules, "modules_to_save": s.modules_to_save})
