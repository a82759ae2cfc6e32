"""Command-line options every launching subcommand shares, and their checks."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .errors import LaunchError
from .run_dir import run_dir_path, timestamp_id
from .training import TrainingJob, check_run_config, training_job

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def add_common(parser: argparse.ArgumentParser) -> None:
    """--config, --name, --runs-dir, --run-id, --env, --dry-run and the trailing key=value overrides."""
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("--name", help="run name (default: the config file's stem)")
    parser.add_argument("--runs-dir", default="runs", help="parent of the run directories (default: ./runs)")
    parser.add_argument("--run-id", help="run id, the run directory's suffix (default: a timestamp)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the training processes (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would run; create no directory and start nothing")
    parser.add_argument("--no-preflight", action="store_true",
                        help="skip the training job's machine checks here (model and data files, strategy); "
                             "for files that exist only on the compute nodes")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides passed to the training job, e.g. training.max_steps=3")


def parse_env(items: list[str]) -> dict[str, str]:
    """``["A=1", "B=x=y"]`` -> ``{"A": "1", "B": "x=y"}``; keys must be shell variable names."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE with KEY a shell variable name, "
                              f"e.g. NCCL_DEBUG=INFO")
        env[key] = value
    return env


def positive(what: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise LaunchError(f"{what}={value}: must be >= {minimum}")
    return value


def job_and_run_dir(args: argparse.Namespace, world_size: int) -> tuple[TrainingJob, Path]:
    """Check config, overrides and (unless --no-preflight) the job's preflight for ``world_size`` processes,
    then name the run directory (created later, never on --dry-run)."""
    job = training_job(args.config, args.overrides)
    name = args.name or job.config.stem
    run_id = args.run_id or timestamp_id()
    run_dir = run_dir_path(args.runs_dir, name, run_id)
    check_run_config(job, run_dir, args.command, world_size, machine_checks=not args.no_preflight)
    return job, run_dir
