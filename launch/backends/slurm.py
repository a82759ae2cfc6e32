"""``shira-launch slurm``: render an sbatch script into the run directory and submit it.

    shira-launch slurm --config configs/tiny.yaml --nodes 2 --partition gpu --gpus-per-node 8 \\
        --time 04:00:00 distributed.strategy=ddp
    shira-launch slurm --config configs/tiny.yaml --nodes 2 --dry-run      # print the script only

The job runs ``srun`` with one torchrun agent per node (c10d rendezvous at the head node's
NodeAddr), or with ``--launcher srun`` one task per rank. Its output goes to
``<run dir>/logs/slurm-<jobid>.out``; ``shira-launch status|cancel <run dir or job id>`` follow it.

Secret ``--env`` values (``WANDB_API_KEY``, ``HF_TOKEN``, ...; see ``env_vars``) are not written
into sbatch.sh: they are set in the environment of the ``sbatch`` call, which runs with
``--export=ALL`` so the job inherits them (an ``--export`` of your own must pass them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..env_vars import LaunchEnv, parse_env, redact_argv
from ..errors import LaunchError
from ..options import add_common, job_and_run_dir, positive
from ..process import require_tool
from ..run_dir import SCRIPT, check_name, create_run_dir, write_launch_record, write_text
from ..sbatch_script import LAUNCHERS, SbatchSettings, read_template, render_sbatch
from .torchrun_cmd import torchrun_prefix

JOB_ID_FILE = "slurm_job_id"
NO_SBATCH = ("`shira-launch slurm` submits with SLURM's sbatch. Run it on a cluster login node, or install "
             "the SLURM client (Debian/Ubuntu: apt-get install slurm-client; it also needs the cluster's "
             "slurm.conf and munge), or add --dry-run to only print the script")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("slurm", help="render an sbatch script and submit it",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0: no GPU request)")
    p.add_argument("--nproc-per-node", type=int, help="training processes per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per task (default: partition default)")
    p.add_argument("--partition", help="partition (default: the cluster's default)")
    p.add_argument("--time", help="time limit, e.g. 30, 02:00:00, 1-00:00:00")
    p.add_argument("--job-name", help="SLURM job name (default: the run directory's name)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun",
                   help="torchrun: one agent per node (default); srun: srun starts every rank")
    p.add_argument("--rdzv-port", type=int, help="rendezvous port on the head node (default: 20000 + job id %% 20000)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="--OPTION=VALUE",
                   help="extra #SBATCH directive, e.g. --sbatch-arg=--account=proj (repeatable)")
    p.add_argument("--template", help="a Jinja2 sbatch template to use instead of the packaged one")
    p.set_defaults(run=run)


def export_args(directives: list[str], secret_keys: list[str]) -> list[str]:
    """sbatch options that hand the secret ``--env`` keys to the job through sbatch's environment.

    ``--export=ALL`` on the command line (it beats ``SBATCH_EXPORT``), unless an ``--sbatch-arg=--export=...``
    of the user's chooses the variables: then it must include ALL or name every secret key.
    """
    if not secret_keys:
        return []
    chosen = [d for d in directives if d.partition("=")[0] == "--export"]
    if not chosen:
        return ["--export=ALL"]
    items = set(chosen[-1].partition("=")[2].split(","))
    missing = [key for key in secret_keys if "ALL" not in items and key not in items]
    if missing:
        raise LaunchError(f"--sbatch-arg={chosen[-1]!r}: the job would not see {', '.join(missing)} (secret --env "
                          f"values reach it only through sbatch's environment); use --export=ALL or name them, "
                          f"e.g. --sbatch-arg=--export=NIL,{','.join(missing)}")
    return []


def submit(script: Path, workdir: Path, env: LaunchEnv, directives: list[str]) -> str:
    """``sbatch --parsable [--export=ALL] script`` with the secret ``--env`` values in its environment;
    returns the job id."""
    sbatch = require_tool("sbatch", NO_SBATCH)
    cmd = [sbatch, "--parsable", *export_args(directives, sorted(env.secret)), str(script)]
    proc = subprocess.run(cmd, cwd=workdir, env={**os.environ, **env.secret}, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = proc.stderr.strip() or proc.stdout.strip()
        raise LaunchError(f"sbatch {script} failed (exit {proc.returncode}): {reason}")
    return proc.stdout.strip().split(";")[0]


def run(args: argparse.Namespace) -> int:
    gpus = args.gpus_per_node
    nodes = positive("--nodes", args.nodes)
    nproc = positive("--nproc-per-node", args.nproc_per_node or max(gpus, 1))
    job, run_dir = job_and_run_dir(args, world_size=nodes * nproc)
    env = parse_env(args.env)
    export_args(args.sbatch_arg, sorted(env.secret))  # an --export that would drop a secret fails here
    settings = SbatchSettings(
        job_name=check_name("--job-name", args.job_name or run_dir.name), run_dir=str(run_dir),
        workdir=str(Path.cwd()), nodes=nodes, nproc_per_node=nproc,
        launcher=args.launcher, torchrun=torchrun_prefix(), python=sys.executable,
        module_args=job.module_args(run_dir), gpus_per_node=gpus, cpus_per_task=args.cpus_per_task,
        partition=args.partition, time=args.time, rdzv_port=args.rdzv_port,
        env=sorted(env.plain.items()), secret_env_keys=sorted(env.secret), extra_directives=list(args.sbatch_arg))
    script = render_sbatch(settings, read_template(args.template))
    if args.dry_run:
        print(script, end="")
        return 0
    require_tool("sbatch", NO_SBATCH)  # before the run directory: no sbatch, nothing created
    create_run_dir(run_dir)
    path = write_text(run_dir / "sbatch.sh", script, mode=SCRIPT)
    write_launch_record(run_dir, job.config, {"backend": "slurm", "argv": redact_argv(args.argv),
                                              "overrides": list(job.overrides), "env": env.record(),
                                              "script": str(path)})
    try:
        job_id = submit(path, Path.cwd(), env, list(args.sbatch_arg))
    except LaunchError as exc:
        raise LaunchError(f"{exc} (script kept in {run_dir})") from None
    write_text(run_dir / JOB_ID_FILE, job_id + "\n")
    print(f"[shira-launch] submitted job {job_id}; run directory: {run_dir}")
    print(f"[shira-launch] log: {run_dir / 'logs' / f'slurm-{job_id}.out'}")
    print(f"[shira-launch] follow: shira-launch status {run_dir}    stop: shira-launch cancel {run_dir}")
    return 0
