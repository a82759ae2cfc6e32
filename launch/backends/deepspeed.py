"""``shira-launch deepspeed``: the ``deepspeed`` runner with an MPI-style hostfile.

    shira-launch deepspeed --config configs/x.yaml --hosts localhost:2 distributed.strategy=deepspeed
    shira-launch deepspeed --config configs/x.yaml --hostfile /job/hostfile --master-addr 10.0.0.1

The hostfile (``HOST slots=N`` per line) is written into, or copied to, the run directory. On more
than one host the runner starts the other nodes over ssh (pdsh by default, ``--ds-launcher`` picks
another); ``--node-rank K`` instead starts only this node (the runner's ``--no_ssh`` mode: run the
same command on every node). One local host needs no ssh. The runner passes LOCAL_RANK in the
environment, not as ``--local_rank`` (``--no_local_rank``): the training job takes only its own flags.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import socket
import sys
from pathlib import Path

from ..errors import LaunchError
from ..foreground import run_foreground
from ..env_vars import parse_env
from ..options import add_common, job_and_run_dir, positive
from ..process import shell_line, sibling_tool
from ..training import TrainingJob

LOCAL_HOSTS = ("localhost", "127.0.0.1")
DS_LAUNCHERS = ("pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi")
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # one hostfile line per host: no spaces


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("deepspeed", help="the deepspeed runner with a hostfile",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hosts", default="localhost:1", metavar="HOST:SLOTS[,HOST:SLOTS...]",
                       help="hosts and processes per host, written as the hostfile (default localhost:1)")
    where.add_argument("--hostfile", help="an existing MPI-style hostfile (HOST slots=N per line)")
    p.add_argument("--master-addr", help="address of the first host (required for several hosts)")
    p.add_argument("--master-port", type=int, help="port on the first host (default: a free port for one "
                   "local host, else 29500)")
    p.add_argument("--node-rank", type=int, help="start only this node (runner --no_ssh); run on every node")
    p.add_argument("--ds-launcher", choices=DS_LAUNCHERS, default="pdsh", help="how the runner reaches other hosts")
    p.set_defaults(run=run)


def parse_hosts(spec: str) -> dict[str, int]:
    """``"n1:2,n2:2"`` -> ``{"n1": 2, "n2": 2}``."""
    hosts: dict[str, int] = {}
    for item in spec.split(","):
        host, sep, slots = item.strip().partition(":")
        if not _HOST.match(host) or not sep or not slots.isdigit() or int(slots) < 1 or host in hosts:
            raise LaunchError(f"--hosts={spec!r}: expected distinct HOST:SLOTS entries with SLOTS >= 1 and "
                              f"HOST a host name or address (letters, digits, '.', '_', '-'), "
                              f"e.g. localhost:2 or n1:4,n2:4")
        hosts[host] = int(slots)
    return hosts


def parse_hostfile(text: str, where: str) -> dict[str, int]:
    """The runner's hostfile format: ``HOST slots=N`` lines; ``#`` comments and blank lines ignored."""
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOST_LINE.match(line)
        if match is None or int(match.group(2)) < 1 or match.group(1) in hosts:
            raise LaunchError(f"{where} line {number} {raw!r}: expected 'HOST slots=N' (N >= 1, each host once)")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise LaunchError(f"{where}: no 'HOST slots=N' lines")
    return hosts


def hostfile_text(hosts: dict[str, int]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


def check_hosts(hosts: dict[str, int], master_addr: str | None, node_rank: int | None) -> None:
    if master_addr is None and len(hosts) > 1:
        raise LaunchError(f"--master-addr is required with {len(hosts)} hosts ({', '.join(hosts)}): "
                          f"the first host's address that every host reaches")
    if node_rank is not None and not 0 <= node_rank < len(hosts):
        raise LaunchError(f"--node-rank={node_rank}: must be in 0..{len(hosts) - 1} for hosts {', '.join(hosts)}")


def runner_prefix() -> list[str]:
    """``deepspeed`` beside this interpreter, else ``python -m deepspeed.launcher.runner``."""
    if importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(f"deepspeed is not installed in {sys.executable}: pip install -e '.[dist]'")
    exe = sibling_tool("deepspeed")
    return [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(job: TrainingJob, run_dir: Path, hosts: dict[str, int], master_addr: str | None,
                      master_port: int, node_rank: int | None, ds_launcher: str) -> list[str]:
    """``deepspeed --hostfile RUN/hostfile --no_local_rank --master_port P ... --module shira_dist.train ...``."""
    single_local = len(hosts) == 1 and next(iter(hosts)) in LOCAL_HOSTS
    cmd = [*runner_prefix(), f"--hostfile={run_dir / 'hostfile'}", "--no_local_rank", f"--master_port={master_port}",
           f"--master_addr={master_addr or '127.0.0.1'}"]
    if single_local:
        cmd.append("--no_ssh_check")  # one local host: the runner starts it directly, no ssh needed
    elif node_rank is not None:
        cmd += ["--no_ssh", f"--node_rank={node_rank}"]
    else:
        cmd.append(f"--launcher={ds_launcher}")
    return [*cmd, "--module", *job.module_args(run_dir)]


def run(args: argparse.Namespace) -> int:
    if args.hostfile:
        path = Path(args.hostfile)
        if not path.is_file():
            raise LaunchError(f"--hostfile={args.hostfile}: file not found")
        hosts = parse_hostfile(path.read_text(), f"--hostfile={args.hostfile}")
    else:
        hosts = parse_hosts(args.hosts)
    check_hosts(hosts, args.master_addr, args.node_rank)
    single_local = len(hosts) == 1 and next(iter(hosts)) in LOCAL_HOSTS
    default_port = free_port() if single_local else 29500
    port = default_port if args.master_port is None else positive("--master-port", args.master_port)
    job, run_dir = job_and_run_dir(args, world_size=sum(hosts.values()))
    env = parse_env(args.env)
    cmd = deepspeed_command(job, run_dir, hosts, args.master_addr, port, args.node_rank, args.ds_launcher)
    if args.dry_run:
        print(f"# hostfile ({run_dir / 'hostfile'}):\n{hostfile_text(hosts)}", end="")
        print(env.notes() + env.shell_prefix() + shell_line(cmd))
        return 0
    tag = f"-node{args.node_rank}" if args.node_rank is not None else ""
    return run_foreground("deepspeed", args.argv, job, run_dir, cmd, env, tag=tag, shared=args.node_rank is not None,
                          extra_files={"hostfile": hostfile_text(hosts)})
