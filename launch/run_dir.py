"""One directory per launch: ``<runs_dir>/<name>-<run_id>/``.

    runs/tiny-20250101-120000/
        config.yaml            copy of the config as launched (the job adds resolved_config.yaml)
        launch.yaml            backend, command line, overrides, time, host, SLURM job id
        sbatch.sh | command.sh the rendered script / exact command
        hostfile               deepspeed backend only
        logs/                  launcher and SLURM output
        checkpoints/ final/ metrics.json   written by the training job (output_dir=<run dir>)
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
from pathlib import Path

import yaml

from shira_dist.io import atomic_write_bytes

from .errors import LaunchError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def timestamp_id() -> str:
    """A run id from the local time, e.g. ``20250101-120000``."""
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def check_name(what: str, value: str) -> str:
    """Names become directory names and SLURM job names: letters, digits, ``.``, ``_``, ``-``."""
    if not _NAME.match(value):
        raise LaunchError(f"{what}={value!r}: use letters, digits, '.', '_' and '-', "
                          f"starting with a letter or digit")
    return value


def run_dir_path(runs_dir: str | Path, name: str, run_id: str) -> Path:
    """Where a run with this name and id lives (absolute; nothing is created)."""
    return (Path(runs_dir).expanduser() / f"{check_name('--name', name)}-{check_name('--run-id', run_id)}").resolve()


def create_run_dir(path: Path, shared: bool = False) -> Path:
    """Create the run directory and its ``logs/``.

    A fresh launch must not reuse a directory (``FileExistsError`` becomes a LaunchError); with
    ``shared=True`` (every node of a multi-node torchrun/deepspeed launch names the same run id)
    an existing directory is expected.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(exist_ok=shared)
    except FileExistsError:
        raise LaunchError(f"run directory {path} already exists; pick another --name or --run-id") from None
    (path / "logs").mkdir(exist_ok=True)
    return path


def write_text(path: Path, text: str, mode: int | None = None) -> Path:
    """Atomically write ``text`` (temp file, fsync, rename); ``mode`` e.g. 0o755 for scripts."""
    atomic_write_bytes(path, text.encode())
    if mode is not None:
        os.chmod(path, mode)
    return path


def write_launch_record(run_dir: Path, config: Path, record: dict, name: str = "launch.yaml") -> None:
    """Copy the config into the run directory and write ``name`` (what was launched, when, from where)."""
    write_text(run_dir / "config.yaml", config.read_text())
    full = {"created": dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
            "cwd": str(Path.cwd()), "config": str(config), **record}
    write_text(run_dir / name, yaml.safe_dump(full, sort_keys=False))
