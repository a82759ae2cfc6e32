"""``shira-launch status`` and ``cancel``: squeue / scontrol / scancel for a run directory or job id.

    shira-launch status runs/tiny-20250101-120000     # queue state, or final state once it left the queue
    shira-launch status                               # all your jobs
    shira-launch cancel runs/tiny-20250101-120000
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from ..errors import LaunchError
from ..process import require_tool
from .slurm import JOB_ID_FILE

NO_CLIENT = "status and cancel need SLURM's client commands (Debian/Ubuntu: apt-get install slurm-client)"


def job_id_of(target: str) -> str:
    """A job id given directly, or read from a run directory's ``slurm_job_id``."""
    if target.isdigit():
        return target
    path = Path(target) / JOB_ID_FILE
    if not path.is_file():
        raise LaunchError(f"{target!r}: neither a job id nor a run directory with {JOB_ID_FILE}")
    return path.read_text().strip()


def add_queue_parsers(subparsers) -> None:
    st = subparsers.add_parser("status", help="squeue for a run (or all your jobs); finished jobs via scontrol")
    st.add_argument("target", nargs="?", help="run directory or job id (default: all your jobs)")
    st.set_defaults(run=status)
    ca = subparsers.add_parser("cancel", help="scancel a run's job")
    ca.add_argument("target", help="run directory or job id")
    ca.set_defaults(run=cancel)


def status(args: argparse.Namespace) -> int:
    squeue = require_tool("squeue", NO_CLIENT)
    fmt = "%.10i %.9P %.30j %.10T %.10M %.6D %R"
    if args.target is None:
        proc = subprocess.run([squeue, "--me", "-o", fmt], capture_output=True, text=True)
        if proc.returncode != 0:
            raise LaunchError(f"squeue failed (exit {proc.returncode}): {proc.stderr.strip()}")
        print(proc.stdout, end="")
        return 0
    job_id = job_id_of(args.target)
    proc = subprocess.run([squeue, "-h", "-j", job_id, "-o", fmt], capture_output=True, text=True)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise LaunchError(f"squeue -j {job_id} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    if proc.returncode == 0 and proc.stdout.strip():
        print(proc.stdout, end="")
        return 0
    # Finished jobs leave squeue; scontrol still knows them for MinJobAge seconds.
    scontrol = require_tool("scontrol", NO_CLIENT)
    show = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True)
    fields = dict(kv.split("=", 1) for kv in show.stdout.split() if "=" in kv)
    if show.returncode != 0 or "JobState" not in fields:
        print(f"job {job_id}: not in the queue any more (finished; see its log in the run directory)")
        return 0
    print(f"job {job_id}: {fields['JobState']} exit={fields.get('ExitCode', '?')} nodes={fields.get('NodeList', '?')}")
    return 0


def cancel(args: argparse.Namespace) -> int:
    scancel = require_tool("scancel", NO_CLIENT)
    job_id = job_id_of(args.target)
    proc = subprocess.run([scancel, job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(f"scancel {job_id} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    print(f"[shira-launch] cancelled job {job_id}")
    return 0
