"""Start a launcher command on this machine: make the run directory, record the launch, run and log it."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from .env_vars import LaunchEnv, redact_argv
from .process import process_start, run_logged, shell_line
from .run_dir import SCRIPT, create_run_dir, update_launch_record, write_launch_record, write_text
from .training import TrainingJob


def run_foreground(backend: str, argv: list[str], job: TrainingJob, run_dir: Path, cmd: list[str],
                   env: LaunchEnv, tag: str = "", shared: bool = False,
                   extra_files: dict[str, str] | None = None) -> int:
    """Create ``run_dir`` (``shared``: may exist, other nodes write there too), write ``config.yaml``,
    ``launch{tag}.yaml``, ``command{tag}.sh`` and ``extra_files``, then run ``cmd`` with ``env`` added to
    this environment, logging to ``logs/launch{tag}.log``. Returns the command's exit code.

    Secret ``--env`` values go only into the child's environment (see ``env_vars``). launch.yaml records
    this launcher's PID (and start time, so a reused PID is not mistaken for it) for ``shira-launch
    status``, and the exit code once the command ended.
    """
    create_run_dir(run_dir, shared=shared)
    for name, text in (extra_files or {}).items():
        write_text(run_dir / name, text)
    write_text(run_dir / f"command{tag}.sh", f"#!/bin/bash\n{env.script_lines()}{shell_line(cmd)}\n", mode=SCRIPT)
    record_name = f"launch{tag}.yaml"
    record = {"backend": backend, "argv": redact_argv(argv), "command": cmd, "overrides": list(job.overrides),
              "env": env.record(), "pid": os.getpid(), "pid_start": process_start(os.getpid())}
    write_launch_record(run_dir, job.config, record, name=record_name)
    log = run_dir / "logs" / f"launch{tag}.log"
    print(f"[shira-launch] run directory: {run_dir}", flush=True)
    print(f"[shira-launch] $ {shell_line(cmd)}", flush=True)
    code = run_logged(cmd, log, {**os.environ, **env.all})
    update_launch_record(run_dir, record_name, exit_code=code,
                         finished=dt.datetime.now().isoformat(timespec="seconds"))
    status = "finished" if code == 0 else f"FAILED (exit {code})"
    print(f"[shira-launch] {backend} run {status}; log: {log}; outputs: {run_dir}", flush=True)
    return code
