"""Start a launcher command on this machine: make the run directory, record the launch, run and log it."""

from __future__ import annotations

import os
from pathlib import Path

from .process import run_logged, shell_line
from .run_dir import create_run_dir, write_launch_record, write_text
from .training import TrainingJob


def run_foreground(backend: str, argv: list[str], job: TrainingJob, run_dir: Path, cmd: list[str],
                   env: dict[str, str], tag: str = "", shared: bool = False,
                   extra_files: dict[str, str] | None = None) -> int:
    """Create ``run_dir`` (``shared``: may exist, other nodes write there too), write ``config.yaml``,
    ``launch{tag}.yaml``, ``command{tag}.sh`` and ``extra_files``, then run ``cmd`` with ``env`` added to
    this environment, logging to ``logs/launch{tag}.log``. Returns the command's exit code."""
    create_run_dir(run_dir, shared=shared)
    for name, text in (extra_files or {}).items():
        write_text(run_dir / name, text)
    exports = "".join(f"export {k}={shell_line([v])}\n" for k, v in env.items())
    write_text(run_dir / f"command{tag}.sh", f"#!/bin/bash\n{exports}{shell_line(cmd)}\n", mode=0o755)
    record = {"backend": backend, "argv": argv, "command": cmd, "overrides": list(job.overrides), "env": env}
    write_launch_record(run_dir, job.config, record, name=f"launch{tag}.yaml")
    log = run_dir / "logs" / f"launch{tag}.log"
    print(f"[shira-launch] run directory: {run_dir}", flush=True)
    print(f"[shira-launch] $ {shell_line(cmd)}", flush=True)
    code = run_logged(cmd, log, {**os.environ, **env})
    status = "finished" if code == 0 else f"FAILED (exit {code})"
    print(f"[shira-launch] {backend} run {status}; log: {log}; outputs: {run_dir}", flush=True)
    return code
