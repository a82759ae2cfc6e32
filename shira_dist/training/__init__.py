"""The training job behind ``python -m shira_dist.train`` / ``shira-dist train``.

    schema.py         the run config (dataclasses, one comment per field)
    config.py         YAML + key=value overrides -> checked RunConfig
    errors.py         the job's own errors (one line, an exit status each), signals, a full disk
    dist_env.py       rank/world from torchrun/deepspeed/srun variables; process group
    preflight.py      fail-fast checks before any process group
    models.py         the base model (local, built-in, inline), tokenizers, the SHiRA adapter
    prepare.py        packaged data sets written as local files
    data.py           data files: formats, rows checked, loaded and tokenized (cached)
    batches.py        fields a task reads, token ids, the batch plan, padding, the objective
    strategies/       single / ddp / fsdp / deepspeed behind one Protocol, in a plain dict;
                      optimizer state by parameter name (any strategy resumes any other)
    loop.py           step (with the non-finite guard), schedule, logging, evaluation
    checkpointing.py  checkpoints and the final adapter, written whole or not at all
    resume.py         where a run starts: the newest whole checkpoint, or a clean slate
    report.py         log lines, progress bar, W&B, metrics.json (one function builds it)
    run.py            one run, start to finish

run.py alone knows the whole sequence; strategies/ is built on shira_dist.distributed, which
(like the core) never imports this package.
"""

from .config import ConfigError, load_run_config
from .schema import RunConfig

__all__ = ["ConfigError", "load_run_config", "RunConfig"]
