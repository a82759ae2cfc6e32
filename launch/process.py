"""Run one launcher process in the foreground, copying its output to the console and a log file."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .errors import LaunchError


def shell_line(cmd: list[str]) -> str:
    """The command as one copy-pasteable shell line."""
    return shlex.join(cmd)


def require_tool(name: str, hint: str) -> str:
    """Absolute path of ``name`` on PATH, else a LaunchError with ``hint`` (how to get it)."""
    path = shutil.which(name)
    if path is None:
        raise LaunchError(f"{name} not found on PATH ({os.environ.get('PATH', '')}): {hint}")
    return path


def sibling_tool(name: str) -> str | None:
    """``name`` next to the running interpreter (a venv's ``bin/torchrun``), else on PATH, else None."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str]) -> int:
    """Run ``cmd`` with stdout+stderr going to the console and ``log_path``; return its exit code.

    The child runs in its own session, so a Ctrl-C reaches it once: the launcher passes SIGINT and
    SIGTERM on (torchrun and the deepspeed runner then stop their workers) and waits for it to exit.
    """
    with open(log_path, "ab") as log:
        log.write(f"$ {shell_line(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            raise LaunchError(f"cannot start {cmd[0]}: {exc}") from None
        previous = {s: signal.signal(s, lambda signum, _frame: proc.send_signal(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            assert proc.stdout is not None
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                log.write(chunk)
                log.flush()
            return proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
