"""The training job behind ``python -m shira_dist.train`` / ``shira-dist train``.

    schema.py       the run config (dataclasses, one comment per field)
    config.py       YAML + key=value overrides -> checked RunConfig
    preflight.py    fail-fast checks before any process group
    dist_env.py     rank/world from torchrun/deepspeed/srun variables; process group
    builtin_models.py, models.py, tokenizer.py     the base model, tokenizer and adapter
    prepare.py, data.py, encoding.py, batches.py   data: packaged sets, files, tokens, batches
    objective.py    loss/accuracy per task
    strategy.py     single / ddp (+ registered fsdp / deepspeed)
    schedule.py, loop.py, evaluate.py, checkpointing.py, tracking.py, progress.py, report.py
    data_checks.py  data files' content, checked in preflight (file, line, field)
    resume.py       where a run starts: the newest whole checkpoint, or a clean slate
    outcome.py      how it ends: metrics.json status (failed/interrupted too), signals
    errors.py       the job's own errors (one line, an exit status each)
    run.py          one run, start to finish
"""

from .config import ConfigError, load_run_config
from .schema import RunConfig
from .strategy import TrainingStrategy, available_strategies, register_strategy

__all__ = ["ConfigError", "load_run_config", "RunConfig", "TrainingStrategy", "available_strategies",
           "register_strategy"]
