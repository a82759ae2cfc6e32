"""Fail-fast checks that look at the machine (files, packages, launcher), before any process group.

A bad config, a missing data file or model, an unavailable strategy or a launch that
does not fit the strategy stops here with one clear message, on every rank alike, so no
rank is left waiting in a rendezvous for a peer that already exited.
"""

from __future__ import annotations

import os

from .checkpointing import check_resume_matches, find_resume_dir
from .data import check_data_files
from .dist_env import DistEnv
from .models import check_model_source
from .prepare import check_prepare_source
from .schema import RunConfig
from .strategy import check_strategy
from .tracking import check_tracking


class PreflightError(RuntimeError):
    """The run cannot start; the message says why and what to change."""


def preflight(cfg: RunConfig, env: DistEnv) -> None:
    try:
        check_strategy(cfg.distributed.strategy, env)
        if cfg.distributed.strategy == "deepspeed" and cfg.distributed.deepspeed_config is not None \
                and not os.path.isfile(cfg.distributed.deepspeed_config):
            raise FileNotFoundError(f"distributed.deepspeed_config={cfg.distributed.deepspeed_config!r} does not exist")
        _check_zero_init(cfg)
        check_model_source(cfg.model)
        if cfg.data.prepare is not None:
            check_prepare_source(cfg.data.prepare)
        check_data_files(cfg.data)
        check_tracking(cfg.tracking)
        resume_dir = find_resume_dir(cfg.output_dir, cfg.training.resume)
        if resume_dir is not None:
            s = cfg.shira
            check_resume_matches(resume_dir, {"r": s.r, "mask_type": s.mask_type, "random_seed": s.random_seed,
                                              "target_modules": s.target_modules, "modules_to_save": s.modules_to_save})
        if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
            raise FileExistsError(f"output_dir={cfg.output_dir!r} exists and is not a directory")
    except (ValueError, OSError, ImportError) as e:
        raise PreflightError(str(e)) from e


def _check_zero_init(cfg: RunConfig) -> None:
    """distributed.zero_init=true needs ZeRO stage 3 in the config the run will use."""
    d = cfg.distributed
    if d.strategy != "deepspeed" or d.zero_init is not True:
        return
    from ..distributed.strategies import job_deepspeed_config  # registers the engines; imports no DeepSpeed
    from ..distributed.zero import zero_stage_of

    stage = zero_stage_of(job_deepspeed_config(cfg))
    if stage != 3:
        raise ValueError(f"distributed.zero_init=true needs ZeRO stage 3, but this run uses stage {stage} "
                         "(set distributed.zero_stage=3 or use configs/deepspeed/zero3*.json)")
