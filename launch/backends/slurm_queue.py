"""SLURM's side of ``shira-launch status`` and ``cancel``: squeue / scontrol / scancel for a job id.

``launch/status.py`` decides what a target is (run directory of any backend, or job id) and calls these
for SLURM runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import LaunchError
from ..process import require_tool
from .slurm import JOB_ID_FILE

NO_CLIENT = "status and cancel need SLURM's client commands (Debian/Ubuntu: apt-get install slurm-client)"
_FORMAT = "%.10i %.9P %.30j %.10T %.10M %.6D %R"


def job_id_of_run(run_dir: Path) -> str:
    """The job id a SLURM run directory recorded in ``slurm_job_id``."""
    path = run_dir / JOB_ID_FILE
    if not path.is_file():
        raise LaunchError(f"{str(run_dir)!r}: a slurm run without {JOB_ID_FILE} (sbatch failed or was not "
                          f"reached; see launch.yaml and sbatch.sh there)")
    return path.read_text().strip()


def my_jobs() -> str:
    """``squeue --me`` with the launcher's columns."""
    squeue = require_tool("squeue", NO_CLIENT)
    proc = subprocess.run([squeue, "--me", "-o", _FORMAT], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(f"squeue failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def job_status(job_id: str) -> str:
    """One line: the squeue row while the job is queued or running, else its final state from scontrol."""
    squeue = require_tool("squeue", NO_CLIENT)
    proc = subprocess.run([squeue, "-h", "-j", job_id, "-o", _FORMAT], capture_output=True, text=True)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise LaunchError(f"squeue -j {job_id} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout
    # Finished jobs leave squeue; scontrol still knows them for MinJobAge seconds.
    scontrol = require_tool("scontrol", NO_CLIENT)
    show = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True)
    fields = dict(kv.split("=", 1) for kv in show.stdout.split() if "=" in kv)
    if show.returncode != 0 or "JobState" not in fields:
        return f"job {job_id}: not in the queue any more (finished; see its log in the run directory)\n"
    exit_code, nodes = fields.get("ExitCode", "?"), fields.get("NodeList", "?")
    return f"job {job_id}: {fields['JobState']} exit={exit_code} nodes={nodes}\n"


def cancel_job(job_id: str) -> str:
    """``scancel JOB_ID``; returns the line to print."""
    scancel = require_tool("scancel", NO_CLIENT)
    proc = subprocess.run([scancel, job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(f"scancel {job_id} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return f"[shira-launch] cancelled job {job_id}\n"
