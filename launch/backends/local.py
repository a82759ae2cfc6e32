"""``shira-launch local``: N processes on this machine under ``torchrun --standalone``.

    shira-launch local --config configs/tiny.yaml --nproc-per-node 2 distributed.strategy=ddp
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..foreground import run_foreground
from ..env_vars import parse_env
from ..options import add_common, job_and_run_dir, positive
from ..process import shell_line
from ..training import TrainingJob
from .torchrun_cmd import torchrun_prefix


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("local", help="N processes on this machine (torchrun --standalone)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--nproc-per-node", "--nproc", type=int, default=1, help="processes to start (default 1)")
    p.set_defaults(run=run)


def local_command(job: TrainingJob, run_dir: Path, nproc: int) -> list[str]:
    """``torchrun --standalone --nnodes=1 --nproc-per-node=N -m shira_dist.train ...``.

    ``--standalone`` runs the rendezvous on this machine at a free port: no endpoint to choose.
    """
    return [*torchrun_prefix(), "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}", "-m",
            *job.module_args(run_dir)]


def run(args: argparse.Namespace) -> int:
    nproc = positive("--nproc-per-node", args.nproc_per_node)
    job, run_dir = job_and_run_dir(args, world_size=nproc)
    env = parse_env(args.env)
    cmd = local_command(job, run_dir, nproc)
    if args.dry_run:
        print(env.notes() + env.shell_prefix() + shell_line(cmd))
        return 0
    return run_foreground("local", args.argv, job, run_dir, cmd, env)
