"""``shira-launch status`` and ``cancel``: how a run is doing, whichever backend started it.

    shira-launch status runs/tiny-20250101-120000   # any run directory (local, torchrun, deepspeed, slurm)
    shira-launch status 12345                       # a SLURM job id
    shira-launch status                             # all your SLURM jobs (squeue --me)
    shira-launch cancel runs/tiny-20250101-120000   # SLURM runs (scancel); see below for the others

What a run directory's status says:

    slurm                      the job's queue state (squeue), or its final state once it left the queue (scontrol)
    local, torchrun, deepspeed the launcher process recorded in launch*.yaml (one per node for multi-node
                               torchrun): running, exited with code N, or gone without an exit code (killed);
                               a PID recorded on another host is not checked from here
    every backend              the training job's metrics.json (running/stopped/completed, step of max_steps)
                               and the last lines of the launcher's or SLURM's log

``cancel`` stops SLURM jobs only: a local, torchrun or deepspeed run stops with Ctrl-C in its
terminal (or ``kill PID``, the launcher's PID that status prints), which the launcher passes on.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

from .backends import slurm_queue
from .backends.slurm import JOB_ID_FILE
from .errors import LaunchError
from .process import pid_running
from .run_dir import read_launch_records

LOG_LINES = 10
SUPPORTED = ("run directories made by shira-launch (backends local, torchrun, deepspeed, slurm) "
             "or SLURM job ids")


def add_parsers(subparsers) -> None:
    st = subparsers.add_parser("status", help="how a run is doing (any backend), or all your SLURM jobs",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("target", nargs="?", help="run directory or SLURM job id (default: all your SLURM jobs)")
    st.set_defaults(run=status)
    ca = subparsers.add_parser("cancel", help="scancel a SLURM run's job",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ca.add_argument("target", help="SLURM run directory or job id")
    ca.set_defaults(run=cancel)


def status(args: argparse.Namespace) -> int:
    print(status_text(args.target), end="")
    return 0


def cancel(args: argparse.Namespace) -> int:
    target = args.target
    if target.isdigit() and not Path(target).is_dir():
        print(slurm_queue.cancel_job(target), end="")
        return 0
    run_dir, records = _run_records(target)
    backend = _backend(records)
    if backend != "slurm":
        pids = ", ".join(f"{r.get('pid')} on {r.get('host')}" for r in records.values())
        raise LaunchError(f"{target!r} is a {backend} run: cancel stops SLURM jobs only; stop this run with "
                          f"Ctrl-C where it runs or kill the launcher (PID {pids})")
    print(slurm_queue.cancel_job(slurm_queue.job_id_of_run(run_dir)), end="")
    return 0


def status_text(target: str | None) -> str:
    """What ``status`` prints for ``target`` (None: all your SLURM jobs)."""
    if target is None:
        return slurm_queue.my_jobs()
    if target.isdigit() and not Path(target).is_dir():
        return slurm_queue.job_status(target)
    run_dir, records = _run_records(target)
    if _backend(records) == "slurm":
        job_id = slurm_queue.job_id_of_run(run_dir)
        lines = [slurm_queue.job_status(job_id).rstrip("\n")]
        logs = [run_dir / "logs" / f"slurm-{job_id}.out"]
    else:
        lines = [_launcher_line(run_dir, name, record) for name, record in records.items()]
        logs = [run_dir / "logs" / (name.replace(".yaml", ".log")) for name in records]
    lines.append(_training_line(run_dir))
    for log in logs:
        lines += _log_tail(log, LOG_LINES if len(logs) == 1 else LOG_LINES // 2)
    return "\n".join(lines) + "\n"


def _run_records(target: str) -> tuple[Path, dict[str, dict]]:
    """The run directory and its launch records; a LaunchError saying what status supports otherwise."""
    run_dir = Path(target)
    if not run_dir.is_dir():
        raise LaunchError(f"{target!r}: neither a run directory nor a job id; status and cancel take {SUPPORTED}")
    records = read_launch_records(run_dir)
    if not records:
        if (run_dir / JOB_ID_FILE).is_file():
            return run_dir, {"launch.yaml": {"backend": "slurm"}}
        raise LaunchError(f"{target!r}: no launch.yaml in this directory; status and cancel take {SUPPORTED}")
    return run_dir, records


def _backend(records: dict[str, dict]) -> str:
    return next(iter(records.values())).get("backend", "unknown")


def _launcher_line(run_dir: Path, name: str, record: dict) -> str:
    """``tiny-1 (local, launch.yaml): running, launcher PID 123 on host h`` or exited / gone / elsewhere."""
    head = f"{run_dir.name} ({record.get('backend', 'unknown')}, {name}, started {record.get('created', '?')})"
    pid, host = record.get("pid"), record.get("host")
    if "exit_code" in record:
        code = record["exit_code"]
        outcome = "finished" if code == 0 else "FAILED"
        return f"{head}: {outcome}, launcher exited with code {code} at {record.get('finished', '?')}"
    if pid is None:
        return f"{head}: no launcher PID recorded; see the log"
    if host != socket.gethostname():
        return f"{head}: launcher PID {pid} on host {host}; run status there to see whether it still runs"
    if pid_running(int(pid), record.get("pid_start")):
        return f"{head}: running, launcher PID {pid} on host {host}"
    return f"{head}: not running; launcher PID {pid} is gone without recording an exit code (killed?)"


def _training_line(run_dir: Path) -> str:
    """The training job's own report: metrics.json's status and step (it writes it at checkpoints and at the end)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return "training: no metrics.json yet (the job writes it at each checkpoint and when it ends)"
    try:
        metrics = json.loads(path.read_text())
        steps = metrics.get("train", {}).get("steps", "?")
        return f"training: {metrics['status']}, step {steps} of {metrics.get('max_steps', '?')} ({path})"
    except (ValueError, KeyError, AttributeError) as exc:
        return f"training: {path} unreadable ({type(exc).__name__}: {exc})"


def _log_tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a log, indented, under a header naming it."""
    if not path.is_file():
        return [f"log {path}: not written yet"]
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64 * 1024))
        tail = f.read().decode(errors="replace").splitlines()[-lines:]
    return [f"log {path} (last {len(tail)} lines):", *(f"  | {line}" for line in tail)]
