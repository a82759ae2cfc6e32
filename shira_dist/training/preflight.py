"""Fail-fast checks that look at the machine (files, packages, launcher), before any process group.

A bad config, a missing data file or model, an unavailable strategy or a launch that
does not fit the strategy stops here with one clear message, on every rank alike, so no
rank is left waiting in a rendezvous for a peer that already exited. The launcher
(``shira-launch``, also with ``--dry-run``) runs the same checks.

    strategy      available, fits the launch; the DeepSpeed JSON's content
    model         the source exists; shira.r fits every targeted layer (on a meta-device copy)
    tokenizer     label words are single tokens; the prompt template fits task.max_length
    data          files exist and are readable; their first rows; enough examples
    output_dir    a completed run is not silently trained again; a resume point loads and matches

The tokenizer and model checks run where they are cheap (the byte tokenizer, a local model
or tokenizer directory, an inline config); a built-in model not yet converted is checked when
the job loads it, with the same one-line errors.
"""

from __future__ import annotations

import os

from .batches import check_template_fits, label_token_ids
from .data import check_data_content, check_data_files
from .dist_env import DistEnv
from .models import Tokenizer, check_adapter_fits, check_model_source, load_tokenizer, meta_model, model_directory
from .prepare import check_prepare_source
from .report import check_tracking
from .resume import check_resume
from .schema import RunConfig
from .strategies import check_strategy


class PreflightError(RuntimeError):
    """The run cannot start; the message says why and what to change."""


def preflight(cfg: RunConfig, env: DistEnv) -> None:
    try:
        check_strategy(cfg, env)
        check_model_source(cfg.model)
        if cfg.data.prepare is not None:
            check_prepare_source(cfg.data.prepare)
        check_data_files(cfg.data)
        check_data_content(cfg, env.world_size)
        _check_task_and_adapter(cfg)
        check_tracking(cfg.tracking)
        if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
            raise FileExistsError(f"output_dir={cfg.output_dir!r} exists and is not a directory")
        check_resume(cfg)
    except (ValueError, OSError, ImportError) as e:
        raise PreflightError(str(e)) from e


def _cheap_tokenizer(cfg: RunConfig) -> Tokenizer | None:
    """The run's tokenizer when it loads without converting a model, else None."""
    m = cfg.model
    if m.tokenizer == "bytes":
        return load_tokenizer("bytes", None)
    directory = m.tokenizer or m.path
    if directory is None and m.builtin == "all-minilm-l6-v2":
        directory = model_directory(m)
    if directory is None:
        return None
    try:
        return load_tokenizer(m.tokenizer or "", directory)
    except (OSError, ValueError):  # no tokenizer files here: the job reports it when it loads the model
        return None


def _check_task_and_adapter(cfg: RunConfig) -> None:
    tokenizer = _cheap_tokenizer(cfg)
    if tokenizer is not None:
        label_token_ids(cfg.task, tokenizer)
        check_template_fits(cfg.task, tokenizer)
    model = meta_model(cfg)
    if model is not None:
        check_adapter_fits(model, cfg.shira)
