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
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
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


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None if it is gone or there
    is no /proc. Recorded next to a PID so a later check is not fooled by the PID being reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may contain spaces
    except OSError:
        return None
    if fields[0] == "Z":  # exited, not yet reaped
        return None
    return int(fields[19])


def pid_running(pid: int, started: int | None) -> bool:
    """True while process ``pid`` runs and (when ``started`` is known) is the same process that was recorded."""
    now = process_start(pid)
    if now is not None:
        return started is None or now == started
    if Path("/proc/self/stat").exists():
        return False
    try:  # no /proc (macOS): signal 0 only asks whether the PID exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
