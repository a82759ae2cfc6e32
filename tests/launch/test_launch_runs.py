"""shira-launch end to end: real launchers train configs/tiny.yaml to completion on loopback only.

    local      torchrun --standalone, 2 processes (gloo), strategy ddp
    torchrun   two agents on 127.0.0.1, --nnodes 2 --node-rank 0/1, one c10d rendezvous
    deepspeed  the deepspeed runner with a one-host hostfile (localhost slots=2), strategy deepspeed
               (ZeRO-2, configs/deepspeed/zero2.json)
    slurm      a local SLURM cluster (tests/slurm) runs a 2-node job: srun + one torchrun agent per
               node, rendezvous at the head node's NodeAddr; or srun starting both ranks itself

Every run checks the launcher's exit status, the run directory's records and logs, the adapter
the training job saved there, and ``shira-launch status`` of the run directory. Every run passes a
secret (``--env WANDB_API_KEY=...``): no file of the run directory holds it, the directories are
private (0o700), and the training processes saw it (a ``sitecustomize`` on PYTHONPATH records the
argv and environment of every Python process the launch starts).

Hostile values (quotes, ``$(...)``, backticks, ``;``, ``#``, ``%``, spaces) in every free-text option
go through real sbatch and a real job with stub trainers (the quoting tests without SLURM are in
test_launch_safety.py, whose stub tools these tests reuse).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from shira_dist.launch.backends.slurm import JOB_ID_FILE
from shira_dist.launch.cli import main

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SHIRA_LAUNCH = str(Path(sys.executable).parent / "shira-launch")
TIMEOUT = 240
MAX_STEPS = 3
STEPS = f"training.max_steps={MAX_STEPS}"


def _load_by_path(path: Path, name: str):
    """A helper module by path (test directories are not packages here)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


slurm_cluster = _load_by_path(HERE / "slurm" / "fixture.py", "_shira_tests_slurm_fixture").slurm_cluster
safety = _load_by_path(HERE / "test_launch_safety.py", "_shira_tests_launch_safety")  # stub tools, hostile values
SECRET = safety.SECRET
SECRET_ENV = ["--env", f"WANDB_API_KEY={SECRET}", "--env", "NCCL_DEBUG=INFO"]
OBSERVER = """# Test observer: a Python process started with SHIRA_TEST_OBSERVE set records its argv and environment.
import json, os, sys
if os.environ.get("SHIRA_TEST_OBSERVE"):
    with open(os.path.join(os.environ["SHIRA_TEST_OBSERVE"], f"{os.getpid()}.json"), "w") as f:
        json.dump({"argv": sys.orig_argv, "env": dict(os.environ)}, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, loopback-only gloo, offline Hugging Face, no stray SLURM job variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_"))}
    env.update(GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", **(extra or {}))
    return env


@pytest.fixture
def observer(tmp_path_factory) -> Path:
    """A directory where every Python process of the launch records itself (see OBSERVER); the environment
    variables that switch it on are in ``observed_env(observer)``."""
    root = tmp_path_factory.mktemp("observer")
    (root / "site").mkdir()
    (root / "seen").mkdir()
    (root / "site" / "sitecustomize.py").write_text(OBSERVER)
    return root


def observed_env(observer: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return launch_env({"PYTHONPATH": str(observer / "site"), "SHIRA_TEST_OBSERVE": str(observer / "seen"),
                       **(extra or {})})


def training_processes(observer: Path) -> list[dict]:
    """The recorded ``python [-u] -m shira_dist.train ...`` processes (not torchrun agents or launchers)."""
    docs = [json.loads(p.read_text()) for p in (observer / "seen").glob("*.json")]
    return [d for d in docs if "shira_dist.train" in d["argv"][:4] and
            d["argv"][d["argv"].index("shira_dist.train") - 1] == "-m"]


def assert_secret_handled(run_dir: Path, observer: Path, processes: int) -> None:
    """The secret reached every training process and no file of the run directory; the directory is private."""
    seen = training_processes(observer)
    assert len(seen) == processes, [d["argv"] for d in seen]
    for doc in seen:
        assert (doc["env"].get("WANDB_API_KEY"), doc["env"].get("NCCL_DEBUG")) == (SECRET, "INFO"), doc["argv"]
    assert safety.files_with(run_dir, SECRET) == []
    assert safety.mode(run_dir) == 0o700 and safety.mode(run_dir / "logs") == 0o700


def status_of(run_dir: Path, slurm_conf: Path | None = None) -> str:
    """``shira-launch status RUN_DIR`` in this process (squeue/scontrol run for real for SLURM runs)."""
    with pytest.MonkeyPatch.context() as mp:
        if slurm_conf is not None:
            mp.setenv("SLURM_CONF", str(slurm_conf))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["status", str(run_dir)]) == 0
    return out.getvalue()


def assert_status_completed(run_dir: Path, launchers: list[str]) -> None:
    out = status_of(run_dir)
    for name in launchers:
        assert f"{run_dir.name} (" in out and f", {name}, started " in out, out
    assert out.count("finished, launcher exited with code 0 at ") == len(launchers), out
    assert f"training: completed, step {MAX_STEPS} of {MAX_STEPS} ({run_dir / 'metrics.json'})" in out, out


def shira_launch(*args, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([SHIRA_LAUNCH, *map(str, args)], env=env or launch_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT)
    return proc


def only_run_dir(runs: Path) -> Path:
    dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def assert_trained(run_dir: Path, strategy: str, world_size: int) -> None:
    """The job finished in the run directory: PEFT-format SHiRA adapter, a checkpoint, metrics, resolved config."""
    final = run_dir / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA"
    with safe_open(final / "adapter_model.safetensors", "pt") as f:
        values = [k for k in f.keys() if k.endswith(".shira_weight")]
        indices = [k for k in f.keys() if k.endswith(".shira_indices")]
        assert values and len(values) == len(indices), list(f.keys())
        for index_key, value_key in zip(sorted(indices), sorted(values)):
            assert f.get_tensor(index_key).shape == (2, f.get_tensor(value_key).numel())
    assert (run_dir / "checkpoints" / f"step-{MAX_STEPS}").is_dir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["train"]["steps"] == MAX_STEPS
    assert (metrics["strategy"], metrics["world_size"]) == (strategy, world_size)
    assert metrics["output_dir"] == str(run_dir)
    resolved = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    assert resolved["distributed"]["strategy"] == strategy and resolved["output_dir"] == str(run_dir)


def assert_launch_records(run_dir: Path, backend: str, tag: str = "") -> None:
    record = yaml.safe_load((run_dir / f"launch{tag}.yaml").read_text())
    assert record["backend"] == backend and record["config"] == str(TINY)
    assert (run_dir / "config.yaml").read_text() == TINY.read_text()


def test_local_two_processes_ddp(tmp_path, observer):
    proc = shira_launch("local", "--config", TINY, "--nproc-per-node", 2, "--runs-dir", tmp_path, *SECRET_ENV, STEPS,
                        "distributed.strategy=ddp", env=observed_env(observer))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert_launch_records(run_dir, "local")
    assert "--nproc-per-node=2" in (run_dir / "command.sh").read_text()
    log = (run_dir / "logs" / "launch.log").read_text()
    assert "[shira-launch]" in proc.stdout and log.strip()
    assert_trained(run_dir, "ddp", 2)
    assert_secret_handled(run_dir, observer, processes=2)
    assert_status_completed(run_dir, ["launch.yaml"])


def test_two_torchrun_agents_form_one_job(tmp_path, observer):
    """Multi-node on one machine: two `shira-launch torchrun` agents, node ranks 0 and 1, one rendezvous."""
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen([SHIRA_LAUNCH, "torchrun", "--config", str(TINY), "--nnodes", "2", "--node-rank",
                                str(rank), "--rdzv-endpoint", endpoint, "--local-addr", "127.0.0.1", "--run-id", "mn",
                                "--runs-dir", str(tmp_path), *SECRET_ENV, STEPS, "distributed.strategy=ddp"],
                               env=observed_env(observer), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
              for rank in (0, 1)]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=TIMEOUT)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-4000:]
    run_dir = tmp_path / "tiny-mn"
    for rank in (0, 1):
        assert_launch_records(run_dir, "torchrun", f"-node{rank}")
        assert (run_dir / "logs" / f"launch-node{rank}.log").read_text().strip()
    assert_trained(run_dir, "ddp", 2)
    assert_secret_handled(run_dir, observer, processes=2)
    assert_status_completed(run_dir, ["launch-node0.yaml", "launch-node1.yaml"])


def test_deepspeed_runner_with_local_hostfile(tmp_path, observer):
    proc = shira_launch("deepspeed", "--config", TINY, "--hosts", "localhost:2", "--runs-dir", tmp_path, *SECRET_ENV,
                        STEPS, "distributed.strategy=deepspeed",
                        f"distributed.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}",
                        env=observed_env(observer, {"DS_ACCELERATOR": "cpu",
                                                    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert (run_dir / "hostfile").read_text() == "localhost slots=2\n"
    assert_launch_records(run_dir, "deepspeed")
    assert "dist_world_size=2" in (run_dir / "logs" / "launch.log").read_text()
    assert_trained(run_dir, "deepspeed", 2)
    assert_secret_handled(run_dir, observer, processes=2)
    assert_status_completed(run_dir, ["launch.yaml"])


def submit(cluster, runs: Path, *args, env: dict[str, str] | None = None) -> tuple[Path, str]:
    proc = shira_launch("slurm", "--config", TINY, "--runs-dir", runs, *args, env=cluster.env(env or launch_env()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = only_run_dir(runs)
    job_id = (run_dir / JOB_ID_FILE).read_text().strip()
    assert f"submitted job {job_id}" in proc.stdout
    return run_dir, job_id


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_slurm_two_node_job_trains_to_completion(slurm_cluster, tmp_path, observer, launcher):
    run_dir, job_id = submit(slurm_cluster, tmp_path, "--nodes", 2, "--launcher", launcher, "--rdzv-port", free_port(),
                             *SECRET_ENV, STEPS, "distributed.strategy=ddp", env=observed_env(observer))
    state = slurm_cluster.wait_job(job_id, timeout=TIMEOUT)
    log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", f"{state}\n{log[-4000:]}\n{slurm_cluster.logs()}"
    assert f"[shira-launch] job {job_id} on n[1-2]; rendezvous 127.0.0.1:" in log  # NodeAddr, not a node name
    assert (run_dir / "sbatch.sh").read_text().startswith("#!/bin/bash")
    assert_launch_records(run_dir, "slurm")
    assert_trained(run_dir, "ddp", 2)
    assert_secret_handled(run_dir, observer, processes=2)
    out = status_of(run_dir, slurm_cluster.conf).splitlines()
    assert out[0] == f"job {job_id}: COMPLETED exit=0:0 nodes=n[1-2]"
    assert out[1] == f"training: completed, step {MAX_STEPS} of {MAX_STEPS} ({run_dir / 'metrics.json'})"
    assert out[2] == f"log {run_dir / 'logs' / f'slurm-{job_id}.out'} (last 10 lines):"


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_slurm_job_with_hostile_values_runs_only_the_intended_commands(slurm_cluster, tmp_path, monkeypatch, capsys,
                                                                       launcher):
    """Real sbatch reads the quoted #SBATCH lines, real slurmd runs the script in the hostile working directory
    and writes the log under the hostile run directory, real srun starts stub trainers on both nodes."""
    stubs = safety.Stubs(tmp_path)  # only the trainers: srun and scontrol are SLURM's
    monkeypatch.setattr(sys, "executable", stubs.python)
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_")) and k != "SLURM_CONF"]:
        monkeypatch.delenv(key)
    argv, expect = safety.hostile_slurm_launch(tmp_path, monkeypatch, launcher)
    code, out, err = safety.launch(capsys, *argv, "--nodes", 2, "distributed.strategy=ddp")
    assert code == 0, out + err
    run_dir = Path(expect["run_dir"])
    job_id = (run_dir / JOB_ID_FILE).read_text().strip()
    show = slurm_cluster.run("scontrol", "show", "job", job_id).stdout
    fields = {line.strip().split("=", 1)[0]: line.strip().split("=", 1)[1] for line in show.splitlines()
              if line.strip().startswith(("Comment=", "WorkDir="))}
    assert fields == {"Comment": expect["comment"], "WorkDir": expect["cwd"]}
    state = slurm_cluster.wait_job(job_id, timeout=TIMEOUT)
    log = run_dir / "logs" / f"slurm-{job_id}.out"  # the run directory has a literal %j: written %%j in --output
    assert state == "COMPLETED", f"{state}\n{log.read_text() if log.exists() else ''}\n{slurm_cluster.logs()}"
    assert f"[shira-launch] job {job_id} on n[1-2]" in log.read_text()

    module_args = ["-m", "shira_dist.train", "--config", expect["config"], f"output_dir={run_dir}", expect["override"],
                   "distributed.strategy=ddp"]
    trainers = stubs.calls("torchrun" if launcher == "torchrun" else "python")
    assert len(trainers) == 2  # one per node
    for call in trainers:
        if launcher == "torchrun":
            assert call.argv[:3] == ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
            assert call.argv[4:] == [f"--rdzv-id={job_id}", *module_args]
        else:
            assert call.argv == module_args
        assert (call.env["MSG"], call.env["WANDB_API_KEY"], call.env["NCCL_DEBUG"]) == (expect["env"], SECRET, "INFO")
        assert call.cwd == expect["cwd"]
    assert safety.no_canaries(tmp_path) == []
    assert safety.files_with(run_dir, SECRET) == []
    assert safety.mode(run_dir) == 0o700 and safety.mode(run_dir / "sbatch.sh") == 0o700
    assert status_of(run_dir).startswith(f"job {job_id}: COMPLETED exit=0:0 nodes=n[1-2]\n")


def queue_command(cluster, *argv) -> tuple[int, str]:
    """``shira-launch status|cancel`` in this process (squeue/scontrol/scancel still run for real)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(cluster.conf))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main([*map(str, argv)])
    return code, out.getvalue()


def test_slurm_status_and_cancel(slurm_cluster, tmp_path):
    # A job that may not begin for an hour stays pending: status shows it, cancel ends it.
    run_dir, job_id = submit(slurm_cluster, tmp_path, "--sbatch-arg=--begin=now+1hour", STEPS)
    code, out = queue_command(slurm_cluster, "status", run_dir)
    assert code == 0 and out.split()[:4] == [job_id, "debug", run_dir.name, "PENDING"], out
    code, out = queue_command(slurm_cluster, "status")  # all of this user's jobs
    assert code == 0 and out.split()[0] == "JOBID" and job_id in out.split()
    assert queue_command(slurm_cluster, "cancel", job_id) == (0, f"[shira-launch] cancelled job {job_id}\n")
    assert slurm_cluster.wait_job(job_id, timeout=60) == "CANCELLED"
    code, out = queue_command(slurm_cluster, "status", job_id)
    assert code == 0 and out.startswith(f"job {job_id}: CANCELLED")
