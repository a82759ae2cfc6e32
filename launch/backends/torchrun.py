"""``shira-launch torchrun``: one torchrun agent per node, joined by a c10d rendezvous.

Run the same command on every node, changing only ``--node-rank``; every node must use the same
``--run-id`` (it names the run directory and the rendezvous) and ``--rdzv-endpoint`` (an address
of the first node that all nodes reach, and a free port there):

    shira-launch torchrun --config configs/tiny.yaml --nnodes 2 --node-rank 0 \\
        --rdzv-endpoint 10.0.0.1:29400 --run-id exp1 distributed.strategy=ddp     # on node 0
    ... --node-rank 1 ...                                                        # on node 1

With ``--dry-run`` and no ``--node-rank`` it prints the torchrun command for every node.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LaunchError
from ..foreground import run_foreground
from ..env_vars import parse_env
from ..options import add_common, job_and_run_dir, positive
from ..process import shell_line
from ..training import TrainingJob
from .torchrun_cmd import Rendezvous, torchrun_prefix


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("torchrun", help="multi-node torchrun with c10d rendezvous (run once per node)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--nnodes", type=int, required=True, help="number of nodes")
    p.add_argument("--node-rank", type=int, help="this node's rank, 0..nnodes-1 (required unless --dry-run)")
    p.add_argument("--nproc-per-node", "--nproc", type=int, default=1, help="processes per node (default 1)")
    p.add_argument("--rdzv-endpoint", required=True, metavar="HOST:PORT",
                   help="rendezvous endpoint on the first node, reachable from all nodes")
    p.add_argument("--local-addr", help="this node's address as other nodes reach it (default: its hostname)")
    p.set_defaults(run=run)


def check_endpoint(endpoint: str) -> str:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"--rdzv-endpoint={endpoint!r}: expected HOST:PORT with PORT in 1..65535, "
                          f"e.g. 10.0.0.1:29400")
    return endpoint


def node_command(job: TrainingJob, run_dir: Path, rdzv: Rendezvous, nproc: int) -> list[str]:
    """``torchrun --nnodes=N --rdzv-backend=c10d --rdzv-endpoint=H:P --rdzv-id=ID ... -m shira_dist.train ...``."""
    return [*torchrun_prefix(), *rdzv.args(), f"--nproc-per-node={nproc}", "-m", *job.module_args(run_dir)]


def run(args: argparse.Namespace) -> int:
    nnodes = positive("--nnodes", args.nnodes)
    nproc = positive("--nproc-per-node", args.nproc_per_node)
    endpoint = check_endpoint(args.rdzv_endpoint)
    if args.node_rank is not None and not 0 <= args.node_rank < nnodes:
        raise LaunchError(f"--node-rank={args.node_rank}: must be in 0..{nnodes - 1} for --nnodes={nnodes}")
    if args.node_rank is None and not args.dry_run:
        raise LaunchError("--node-rank is required to start a node (or use --dry-run to print every node's command)")
    if nnodes > 1 and args.run_id is None and not args.dry_run:
        raise LaunchError(f"--run-id is required with --nnodes={nnodes}: every node must pass the same one "
                          f"(it names the shared run directory and the rendezvous)")
    job, run_dir = job_and_run_dir(args, world_size=nnodes * nproc)
    run_id = run_dir.name
    env = parse_env(args.env)
    ranks = [args.node_rank] if args.node_rank is not None else list(range(nnodes))
    commands = {r: node_command(job, run_dir, Rendezvous(nnodes, endpoint, run_id, r, args.local_addr),
                                nproc) for r in ranks}
    if args.dry_run:
        print(env.notes(), end="")
        for rank, cmd in commands.items():
            print(f"# node {rank}\n{env.shell_prefix()}{shell_line(cmd)}")
        return 0
    rank = args.node_rank
    return run_foreground("torchrun", args.argv, job, run_dir, commands[rank], env, tag=f"-node{rank}", shared=True)
