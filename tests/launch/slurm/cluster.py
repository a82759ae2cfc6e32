"""A throwaway SLURM cluster on localhost: munged + slurmctld + two emulated slurmd nodes.

    munged (private key + socket)      every daemon and client: AuthInfo=socket=<dir>/munge/munge.socket
    slurmctld                          SlurmctldHost=localhost, SlurmctldPort=<free port>
    slurmd -N n1, slurmd -N n2         NodeAddr=127.0.0.1, Port=<free port each>, partition "debug"
    sbatch/srun/squeue/sinfo/scontrol  SLURM_CONF=<dir>/slurm.conf

Everything (config, munge key and socket, state, spool, logs, the jobcomp file) lives in one
directory; every daemon runs in the foreground as our child and is stopped by its PID. Debian
packages (slurm 22.05 on Debian 12) are installed with ``--no-install-recommends`` when missing.

As a script:  ``python tests/launch/slurm/cluster.py up DIR``  (prints ``export SLURM_CONF=…``, leaves the
daemons running, PIDs in DIR/pids) and ``python tests/launch/slurm/cluster.py down DIR``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NEEDED_BINARIES = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"}
NODES = ("n1", "n2")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(binary: str) -> str | None:
    # slurmctld/slurmd/munged live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")


def ensure_installed() -> None:
    """Install Debian's slurm + munge packages if any binary is missing; raise with the reason if we cannot."""
    missing = sorted({pkg for binary, pkg in NEEDED_BINARIES.items() if _which(binary) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"SLURM packages missing ({', '.join(missing)}) and cannot install them here "
                           f"(need root and apt-get); run: apt-get install -y --no-install-recommends "
                           f"{' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    for cmd in (["apt-get", "update", "-qq"], install):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            output = proc.stdout[-2000:] + proc.stderr[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{output}")


@dataclass
class Cluster:
    """Paths and processes of one running local cluster."""

    root: Path
    partition: str = "debug"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def jobcomp(self) -> Path:
        """JobCompType=jobcomp/filetxt writes one line per finished job here (JobState=COMPLETED …)."""
        return self.root / "jobcomp.txt"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default os.environ) with SLURM_CONF pointing the clients at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc

    def logs(self, tail: int = 40) -> str:
        """The last ``tail`` lines of every daemon log, for error messages."""
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def job_state(self, job_id: str) -> str | None:
        """The final JobState recorded in the jobcomp file, or None while the job has not finished."""
        if not self.jobcomp.exists():
            return None
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if fields.get("JobId") == job_id:
                return fields.get("JobState")
        return None

    def wait_job(self, job_id: str, timeout: float) -> str:
        """Block until the job's final state is in the jobcomp file; return it (e.g. ``COMPLETED``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state is not None:
                return state
            time.sleep(0.5)
        squeue = self.run("squeue", "-h", "-j", job_id, "-o", "%i %T %R", check=False).stdout
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s (squeue: {squeue.strip()!r})\n"
                           f"{self.logs()}")


def write_config(root: Path, ctld_port: int, node_ports: dict[str, int], partition: str) -> Path:
    """slurm.conf for slurmctld on localhost and emulated nodes at 127.0.0.1 with distinct ports."""
    user = getpass.getuser()
    nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname=localhost Port={p} CPUs=2 State=UNKNOWN"
                      for n, p in node_ports.items())
    text = f"""\
ClusterName=shiratest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MailProg=/bin/true
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=30
{nodes}
PartitionName={partition} Nodes={','.join(node_ports)} Default=YES MaxTime=INFINITE State=UP
"""
    conf = root / "slurm.conf"
    conf.write_text(text)
    return conf


def _start(cluster: Cluster, name: str, cmd: list[str]) -> None:
    out = open(cluster.log_dir / f"{name}.stdout", "wb")
    proc = subprocess.Popen(cmd, env=cluster.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    cluster.procs[name] = proc
    with open(cluster.root / "pids", "a") as f:
        f.write(f"{name} {proc.pid}\n")


def _wait(cluster: Cluster, what: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n{cluster.logs()}"
                                   f"\n{_stdouts(cluster)}")
        if ready():
            return
        time.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{cluster.logs()}\n{_stdouts(cluster)}")


def _stdouts(cluster: Cluster) -> str:
    paths = sorted(cluster.log_dir.glob("*.stdout"))
    return "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-2000:]}" for p in paths)


def _controller_up(cluster: Cluster) -> bool:
    proc = cluster.run("scontrol", "ping", check=False, timeout=10)
    return proc.returncode == 0 and "UP" in proc.stdout


def _nodes_idle(cluster: Cluster) -> bool:
    proc = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
    states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
    return all(states.get(n) == "idle" for n in NODES)


def start(root: str | os.PathLike, timeout: float = 60.0) -> Cluster:
    """Install if needed, write the config, start munged, slurmctld and slurmd n1/n2; wait until both nodes are idle."""
    ensure_installed()
    root = Path(root).resolve()
    for sub in ("munge", "state", "spool/n1", "spool/n2", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    write_config(root, free_port(), {n: free_port() for n in NODES}, "debug")
    cluster = Cluster(root)
    try:
        _start(cluster, "munged", [_which("munged"), "-F", "--force", f"--socket={root}/munge/munge.socket",
                                   f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
                                   f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/munged.seed"])
        _wait(cluster, "munged socket", lambda: (root / "munge" / "munge.socket").exists(), 15)
        _start(cluster, "slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(cluster.conf)])
        _wait(cluster, "slurmctld to answer scontrol ping", lambda: _controller_up(cluster), timeout)
        for node in NODES:
            _start(cluster, f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(cluster.conf)])
        _wait(cluster, "nodes n1 and n2 idle in sinfo", lambda: _nodes_idle(cluster), timeout)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by a parent that is not us) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _kill_pid(pid: int, proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; reap it if it is our child."""
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def stop(cluster_or_root: Cluster | str | os.PathLike) -> None:
    """Cancel leftover jobs, then stop slurmd, slurmctld and munged by the PIDs recorded at start."""
    procs = cluster_or_root.procs if isinstance(cluster_or_root, Cluster) else {}
    root = Path(cluster_or_root.root if isinstance(cluster_or_root, Cluster) else cluster_or_root).resolve()
    pid_file = root / "pids"
    if not pid_file.exists():
        return
    lines = [line.split() for line in pid_file.read_text().splitlines() if line.strip()]
    entries = [(name, int(pid)) for name, pid in lines]
    if any(name == "slurmctld" for name, _ in entries) and _alive(dict(entries)["slurmctld"]):
        env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
        subprocess.run(["scancel", "--user", getpass.getuser()], env=env, capture_output=True, timeout=15)
    order = {"slurmctld": 1, "munged": 2}  # slurmd first, munged last (the others authenticate through it)
    for name, pid in sorted(entries, key=lambda e: order.get(e[0], 0)):
        proc = procs.get(name)
        _kill_pid(pid, proc if proc is not None and proc.pid == pid else None)
    pid_file.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("dir", help="directory for config, keys, state and logs")
    args = parser.parse_args(argv)
    if args.action == "down":
        stop(args.dir)
        return 0
    cluster = start(args.dir)
    print(f"export SLURM_CONF={cluster.conf}")
    print(f"# stop with: {sys.executable} {__file__} down {cluster.root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
