"""One directory per launch: ``<runs_dir>/<name>-<run_id>/``.

    runs/tiny-20250101-120000/
        config.yaml            copy of the config as launched (the job adds resolved_config.yaml)
        launch.yaml            backend, command line, overrides, --env (secrets redacted), time, host,
                               launcher PID and, once it ended, its exit code
        sbatch.sh | command.sh the rendered script / exact command
        hostfile               deepspeed backend only
        slurm_job_id           slurm backend only
        logs/                  launcher and SLURM output
        checkpoints/ final/ metrics.json   written by the training job (output_dir=<run dir>)

The directory and logs/ are private to their owner (0o700), its files 0o600 (scripts 0o700):
configs, command lines and logs often name private paths, hosts and data.
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

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
SCRIPT = 0o700  # owner may read and run it; nobody else may read it


def timestamp_id() -> str:
    """A run id from the local time, e.g. ``20250101-120000``."""
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def is_name(value: str) -> bool:
    """Names become directory names and SLURM job names: letters, digits, ``.``, ``_``, ``-``."""
    return _NAME.match(value) is not None


def check_name(what: str, value: str) -> str:
    """``value`` if ``is_name``, else a LaunchError naming ``what`` and what is allowed."""
    if not is_name(value):
        raise LaunchError(f"{what}={value!r}: use letters, digits, '.', '_' and '-', "
                          f"starting with a letter or digit")
    return value


def run_dir_path(runs_dir: str | Path, name: str, run_id: str) -> Path:
    """Where a run with this name and id lives (absolute; nothing is created)."""
    return (Path(runs_dir).expanduser() / f"{check_name('--name', name)}-{check_name('--run-id', run_id)}").resolve()


def _private_dir(path: Path, exist_ok: bool) -> None:
    """mkdir with mode 0o700; a directory made here gets exactly 0o700 whatever the umask."""
    try:
        path.mkdir(mode=PRIVATE_DIR)
    except FileExistsError:
        if not exist_ok or not path.is_dir():
            raise
        return
    os.chmod(path, PRIVATE_DIR)


def create_run_dir(path: Path, shared: bool = False) -> Path:
    """Create the run directory and its ``logs/``, both 0o700 (the parent ``--runs-dir`` keeps the umask's mode).

    A fresh launch must not reuse a directory (``FileExistsError`` becomes a LaunchError); with
    ``shared=True`` (every node of a multi-node torchrun/deepspeed launch names the same run id)
    an existing directory is expected.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _private_dir(path, exist_ok=shared)
    except FileExistsError:
        raise LaunchError(f"run directory {path} already exists; pick another --name or --run-id") from None
    _private_dir(path / "logs", exist_ok=True)
    return path


def write_text(path: Path, text: str, mode: int = PRIVATE_FILE) -> Path:
    """Atomically write ``text`` (temp file, fsync, rename), then set ``mode`` (0o600; 0o700 for scripts)."""
    atomic_write_bytes(path, text.encode())
    os.chmod(path, mode)
    return path


def write_launch_record(run_dir: Path, config: Path, record: dict, name: str = "launch.yaml") -> None:
    """Copy the config into the run directory and write ``name`` (what was launched, when, from where)."""
    write_text(run_dir / "config.yaml", config.read_text())
    full = {"created": dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
            "cwd": str(Path.cwd()), "config": str(config), **record}
    write_text(run_dir / name, yaml.safe_dump(full, sort_keys=False))


def update_launch_record(run_dir: Path, name: str, **fields) -> None:
    """Add ``fields`` to an existing launch record, e.g. the exit code once the launched command ended."""
    path = run_dir / name
    record = yaml.safe_load(path.read_text()) or {}
    write_text(path, yaml.safe_dump({**record, **fields}, sort_keys=False))


def read_launch_records(run_dir: Path) -> dict[str, dict]:
    """``{"launch.yaml": {...}}``, or one record per node (``launch-node0.yaml``, ...) for multi-node runs."""
    return {path.name: yaml.safe_load(path.read_text()) or {} for path in sorted(run_dir.glob("launch*.yaml"))}
