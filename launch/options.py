"""Command-line options every launching subcommand shares, and their checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from .env_vars import is_secret
from .errors import LaunchError
from .run_dir import is_name, run_dir_path, timestamp_id
from .training import TrainingJob, check_run_config, training_job

# Characters that would end a line of a rendered script or record (or a C string) in the middle of a value.
_LINE_BREAKS = {"\n": "a newline", "\r": "a carriage return", "\0": "a NUL byte"}
# Parsed values that are not the user's text.
_NOT_TEXT = ("run", "argv", "command")


def add_common(parser: argparse.ArgumentParser) -> None:
    """--config, --name, --runs-dir, --run-id, --env, --dry-run and the trailing key=value overrides."""
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("--name", help="run name (default: the config file's stem)")
    parser.add_argument("--runs-dir", default="runs", help="parent of the run directories (default: ./runs)")
    parser.add_argument("--run-id", help="run id, the run directory's suffix (default: a timestamp)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the training processes (repeatable); values of "
                             "credential-like keys (*_KEY, *_TOKEN, *_SECRET, *PASSWORD*) are passed through "
                             "the environment only, never written into the run directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would run; create no directory and start nothing")
    parser.add_argument("--no-preflight", action="store_true",
                        help="skip the training job's machine checks here (model and data files, strategy); "
                             "for files that exist only on the compute nodes")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides passed to the training job, e.g. training.max_steps=3")


def check_one_line(what: str, value: str, shown: str | None = None) -> str:
    """Refuse a value with a newline, carriage return or NUL byte.

    Values end up in generated scripts (a newline in a path would start a new shell line there),
    in ``#SBATCH`` lines (which sbatch reads line by line) and in argv (which cannot hold NUL);
    quoting covers everything else, but no quoting keeps a line break inside one ``#SBATCH`` line.
    ``shown`` replaces the value in the message (a secret's value is never printed).
    """
    for char, name in _LINE_BREAKS.items():
        if char in value:
            raise LaunchError(f"{what}={shown or value!r}: contains {name}; paths, names and values must be "
                              f"one line (they are written into the run's scripts and records)")
    return value


def check_text_options(args: argparse.Namespace) -> None:
    """``check_one_line`` for every string the user gave (options, overrides, positional targets), before
    anything else looks at them; the error names the option, e.g. ``--runs-dir='/x\\n...': contains a newline``."""
    for dest, value in vars(args).items():
        if dest in _NOT_TEXT:
            continue
        what = "override" if dest == "overrides" else dest if dest == "target" else "--" + dest.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                key = item.partition("=")[0]
                shown = f"{key}=<value not shown>" if dest == "env" and is_secret(key) else None
                check_one_line(what, item, shown)


def positive(what: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise LaunchError(f"{what}={value}: must be >= {minimum}")
    return value


def job_and_run_dir(args: argparse.Namespace, world_size: int) -> tuple[TrainingJob, Path]:
    """Check config, overrides and (unless --no-preflight) the job's preflight for ``world_size`` processes,
    then name the run directory (created later, never on --dry-run)."""
    job = training_job(args.config, args.overrides)
    name = args.name or job.config.stem
    if args.name is None and not is_name(name):
        raise LaunchError(f"--config={args.config}: the file's stem {name!r} is the default run name but not a "
                          f"valid one (letters, digits, '.', '_' and '-'); pass --name")
    run_id = args.run_id or timestamp_id()
    run_dir = run_dir_path(args.runs_dir, name, run_id)
    check_run_config(job, run_dir, args.command, world_size, machine_checks=not args.no_preflight)
    return job, run_dir
