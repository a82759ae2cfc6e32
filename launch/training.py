"""What every backend launches: ``-m shira_dist.train --config CFG output_dir=RUN_DIR key=value ...``.

The backends differ only in what they put in front of these arguments (torchrun, the deepspeed
runner, srun + torchrun). Everything here is checked before any directory or process is created.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import LaunchError

TRAIN_MODULE = "shira_dist.train"
# Dotted config keys, e.g. ``training.max_steps`` or ``distributed.strategy``.
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")
# Set by the launcher itself: the run directory is the training job's output directory.
RESERVED_KEYS = ("output_dir",)


@dataclass(frozen=True)
class TrainingJob:
    """A validated request to run ``shira_dist.train``: an absolute config path and ``key=value`` overrides."""

    config: Path  # absolute path of the YAML run config
    overrides: tuple[str, ...]  # "key=value" strings, passed through unchanged

    def module_args(self, run_dir: Path) -> list[str]:
        """Arguments after ``-m`` / ``--module``: the module name, ``--config``, ``output_dir`` and the overrides."""
        return [TRAIN_MODULE, "--config", str(self.config), f"output_dir={run_dir}", *self.overrides]


def check_config(config: str | Path) -> Path:
    """The config file's absolute path (its contents are checked by ``check_run_config``)."""
    path = Path(config).expanduser()
    if not path.exists():
        raise LaunchError(f"--config={config}: file not found (cwd {Path.cwd()})")
    if not path.is_file():
        raise LaunchError(f"--config={config}: not a file")
    return path.resolve()


def check_overrides(overrides: list[str]) -> tuple[str, ...]:
    """Each override must be ``dotted.key=value``; ``output_dir`` is the launcher's (it is the run directory)."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not _KEY.match(key):
            raise LaunchError(f"override {item!r}: expected dotted.key=value, e.g. training.max_steps=3")
        if key in RESERVED_KEYS:
            raise LaunchError(f"override {item!r}: {key} is set by the launcher to the run directory; "
                              f"choose it with --runs-dir and --name instead")
    return tuple(overrides)


def check_train_module() -> None:
    """The training entry point must be importable by the processes we start."""
    if importlib.util.find_spec(TRAIN_MODULE) is None:
        raise LaunchError(f"module {TRAIN_MODULE} not found in {sys.executable}; install the project "
                          f"(pip install -e '.[train]') in the environment the launcher runs from")


def check_run_config(job: TrainingJob, run_dir: Path, backend: str, world_size: int, machine_checks: bool) -> None:
    """Run the training job's own checks here, before anything starts (and before a queue wait).

    The config loader (unknown keys, bad values, cross-field rules) always runs, with the overrides
    the job will get. With ``machine_checks`` the job's preflight runs too, as for ``world_size``
    processes: the model and data files exist, the strategy is available and fits the launch.
    """
    from shira_dist.training.config import ConfigError, load_run_config
    from shira_dist.training.dist_env import DistEnv
    from shira_dist.training.preflight import PreflightError, preflight

    try:
        cfg = load_run_config(str(job.config), [*job.overrides, f"output_dir={run_dir}"])
    except ConfigError as exc:
        raise LaunchError(f"--config={job.config}: {exc}") from None
    if not machine_checks:
        return
    try:
        preflight(cfg, DistEnv(world_size=world_size, source=f"shira-launch {backend}, {world_size} processes"))
    except PreflightError as exc:
        raise LaunchError(f"preflight: {exc} [checked on this machine; --no-preflight skips these checks, "
                          f"e.g. for files that exist only on the compute nodes]") from None


def training_job(config: str | Path, overrides: list[str]) -> TrainingJob:
    """Check the config file, overrides and entry point; raise LaunchError naming the first problem."""
    job = TrainingJob(check_config(config), check_overrides(overrides))
    check_train_module()
    return job
