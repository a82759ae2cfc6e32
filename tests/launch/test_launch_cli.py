"""shira-launch without starting training: rendered scripts and commands, hostfiles, and fail-fast errors.

Each error case checks the exit status, the message (what was wrong and what is allowed) and that
no run directory was created.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from shira_dist.launch.backends.deepspeed import hostfile_text, parse_hostfile, parse_hosts
from shira_dist.launch.cli import main
from shira_dist.launch.errors import LaunchError
from shira_dist.launch.sbatch_script import default_template

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
VENV_BIN = Path(sys.executable).parent


def launch(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- slurm --dry-run -------------------------------------------------------------------------------

def test_slurm_dry_run_renders_directives_and_torchrun_line(capsys, tmp_path):
    code, script, _ = launch(capsys, "slurm", "--config", TINY, "--nodes", 2, "--gpus-per-node", 4, "--partition",
                             "gpu", "--time", "01:30:00", "--cpus-per-task", 8, "--env", "NCCL_DEBUG=INFO",
                             "--env", "MSG=a b", "--sbatch-arg=--account=proj", "--runs-dir", tmp_path,
                             "--run-id", "r1", "--dry-run", "training.max_steps=3", "distributed.strategy=ddp")
    assert code == 0
    run_dir = tmp_path / "tiny-r1"
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=tiny-r1",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=01:30:00",
        f"#SBATCH --output={run_dir}/logs/slurm-%j.out",
        f"#SBATCH --chdir={Path.cwd()}",
        "#SBATCH --account=proj",
    ]
    assert "export NCCL_DEBUG=INFO" in lines and "export MSG='a b'" in lines
    # The rendezvous address is the head node's NodeAddr, not its (possibly unresolvable) name.
    assert 'MASTER_ADDR=$(node_addr "$head_node")' in script
    assert "scontrol show node" in script and "NodeAddr=" in script
    flat = script.replace("\\\n", " ")
    assert "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1" in flat
    torchrun = flat[flat.index("torchrun --nnodes"):].split("\n")[0].split()
    assert torchrun[:5] == ["torchrun", "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                            '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"']
    assert torchrun[-7:] == ["-m", "shira_dist.train", "--config", str(TINY), f"output_dir={run_dir}",
                             "training.max_steps=3", "distributed.strategy=ddp"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell
    assert not tmp_path.joinpath("tiny-r1").exists()  # --dry-run creates nothing


def test_slurm_dry_run_srun_launcher_starts_every_rank(capsys, tmp_path):
    code, script, _ = launch(capsys, "slurm", "--config", TINY, "--nodes", 3, "--nproc-per-node", 2, "--launcher",
                             "srun", "--rdzv-port", 29123, "--runs-dir", tmp_path, "--run-id", "s", "--dry-run",
                             "distributed.strategy=ddp")
    assert code == 0
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --nodes=3" in script
    assert "--gpus-per-node" not in script and "--partition" not in script and "--time" not in script
    assert "export MASTER_PORT=29123" in script
    flat = script.replace("\\\n", " ")
    srun = flat[flat.index("srun --nodes"):].split("\n")[0].split()
    assert srun[:4] == ["srun", "--nodes=3", "--ntasks-per-node=2", "--kill-on-bad-exit=1"]
    assert srun[4:8] == [sys.executable, "-m", "shira_dist.train", "--config"]
    assert "torchrun" not in flat.split("srun --nodes")[1]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_custom_template(capsys, tmp_path):
    template = tmp_path / "t.sh.j2"
    template.write_text("#!/bin/bash\n#SBATCH --nodes={{ nodes }}\necho {{ module_args | qjoin }}\n")
    code, script, _ = launch(capsys, "slurm", "--config", TINY, "--nodes", 1, "--template", template,
                             "--runs-dir", tmp_path, "--run-id", "c", "--dry-run", "tracking.run_name=my run")
    assert code == 0
    assert script == (f"#!/bin/bash\n#SBATCH --nodes=1\necho shira_dist.train --config {TINY} "
                      f"output_dir={tmp_path / 'tiny-c'} 'tracking.run_name=my run'\n")
    template.write_text("{{ no_such_setting }}")
    code, _, err = launch(capsys, "slurm", "--config", TINY, "--template", template, "--dry-run")
    assert code == 2 and "no_such_setting" in err


def test_packaged_template_is_read_from_the_package():
    text = default_template()
    assert text == (REPO / "launch" / "templates" / "sbatch.sh.j2").read_text()
    assert "#SBATCH --nodes={{ nodes }}" in text


# --- local / torchrun / deepspeed --dry-run ----------------------------------------------------------------

def test_local_dry_run_is_torchrun_standalone(capsys, tmp_path):
    code, out, _ = launch(capsys, "local", "--config", TINY, "--nproc-per-node", 2, "--runs-dir", tmp_path,
                          "--name", "exp", "--run-id", "1", "--dry-run", "distributed.strategy=ddp")
    assert code == 0
    cmd = shlex.split(out)
    assert Path(cmd[0]).name == "torchrun"
    assert cmd[1:] == ["--standalone", "--nnodes=1", "--nproc-per-node=2", "-m", "shira_dist.train", "--config",
                       str(TINY), f"output_dir={tmp_path / 'exp-1'}", "distributed.strategy=ddp"]
    assert not (tmp_path / "exp-1").exists()


def test_torchrun_dry_run_prints_one_command_per_node(capsys, tmp_path):
    code, out, _ = launch(capsys, "torchrun", "--config", TINY, "--nnodes", 2, "--rdzv-endpoint", "10.1.2.3:29400",
                          "--runs-dir", tmp_path, "--run-id", "mn", "--dry-run", "distributed.strategy=ddp")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "# node 0" and lines[2] == "# node 1"
    for rank, line in ((0, lines[1]), (1, lines[3])):
        cmd = shlex.split(line)
        assert cmd[1:7] == ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.1.2.3:29400", "--rdzv-id=tiny-mn",
                            f"--node-rank={rank}", "--nproc-per-node=1"]
        assert cmd[-2:] == [f"output_dir={tmp_path / 'tiny-mn'}", "distributed.strategy=ddp"]


def test_deepspeed_dry_run_writes_hostfile_command(capsys, tmp_path):
    code, out, _ = launch(capsys, "deepspeed", "--config", TINY, "--hosts", "n1:2,n2:2", "--master-addr", "10.0.0.1",
                          "--master-port", 29555, "--runs-dir", tmp_path, "--run-id", "d", "--dry-run",
                          "distributed.strategy=ddp")
    assert code == 0
    run_dir = tmp_path / "tiny-d"
    lines = out.splitlines()
    assert lines[:3] == [f"# hostfile ({run_dir / 'hostfile'}):", "n1 slots=2", "n2 slots=2"]
    cmd = shlex.split(lines[3])
    assert Path(cmd[0]).name == "deepspeed"
    assert cmd[1:] == [f"--hostfile={run_dir / 'hostfile'}", "--no_local_rank", "--master_port=29555",
                       "--master_addr=10.0.0.1", "--launcher=pdsh", "--module", "shira_dist.train", "--config",
                       str(TINY), f"output_dir={run_dir}", "distributed.strategy=ddp"]
    # One node of a multi-host run without ssh, and one local host (no ssh needed at all):
    code, out, _ = launch(capsys, "deepspeed", "--config", TINY, "--hosts", "n1:2,n2:2", "--master-addr", "10.0.0.1",
                          "--node-rank", 1, "--dry-run", "distributed.strategy=ddp")
    assert code == 0 and "--no_ssh --node_rank=1 --module" in out and "--launcher" not in out
    code, out, _ = launch(capsys, "deepspeed", "--config", TINY, "--hosts", "localhost:2", "--dry-run",
                          "distributed.strategy=ddp")
    assert code == 0 and "localhost slots=2" in out and "--master_addr=127.0.0.1 --no_ssh_check --module" in out


def test_hostfile_parsing():
    assert parse_hosts("n1:4,n2:8") == {"n1": 4, "n2": 8}
    assert parse_hostfile("# cluster\n\nn1 slots=4\nn2   slots=8\n", "hf") == {"n1": 4, "n2": 8}
    assert hostfile_text({"n1": 4, "n2": 8}) == "n1 slots=4\nn2 slots=8\n"
    for bad in ("n1", "n1:0", "n1:2,n1:2", "n1:x", ":2"):
        with pytest.raises(LaunchError, match="--hosts"):
            parse_hosts(bad)
    with pytest.raises(LaunchError, match=r"hf line 2 'n2 slot=4'"):
        parse_hostfile("n1 slots=4\nn2 slot=4\n", "hf")
    with pytest.raises(LaunchError, match="no 'HOST slots=N' lines"):
        parse_hostfile("# empty\n", "hf")


# --- fail fast: exit 2, a message naming the problem, no run directory -------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["slurm", "--config", "missing.yaml"], "--config=missing.yaml: file not found"),
    (["local", "--config", "missing.yaml"], "--config=missing.yaml: file not found"),
    (["torchrun", "--config", "missing.yaml", "--nnodes", "1", "--node-rank", "0", "--rdzv-endpoint", "h:1"],
     "--config=missing.yaml: file not found"),
    (["deepspeed", "--config", "missing.yaml"], "--config=missing.yaml: file not found"),
    (["local", "--config", TINY, "training.max_steps"], "expected dotted.key=value"),
    # the training job's own config loader runs first: a bad config fails here, not after a queue wait
    (["slurm", "--config", TINY, "training.no_such_key=1"], "unknown key 'training.no_such_key'"),
    (["local", "--config", TINY, "distributed.strategy=mpi"], "distributed.strategy='mpi' is invalid; allowed"),
    # ... and its preflight, as for the planned number of processes
    (["local", "--config", TINY, "--nproc-per-node", "2"], "preflight: distributed.strategy='single' but"),
    (["slurm", "--config", TINY, "--nodes", "2", "distributed.strategy=ddp", "model.inline_config=null",
      "model.path=/no/such/model"], "preflight: model.path='/no/such/model' is not a directory"),
    (["torchrun", "--config", TINY, "--nnodes", "1", "--node-rank", "0", "--rdzv-endpoint", "h:1", "data.prepare=null",
      "data.train_files=[/no/such.jsonl]"], "preflight: data.train_files: '/no/such.jsonl' does not exist"),
    (["local", "--config", TINY, "output_dir=/elsewhere"], "output_dir is set by the launcher"),
    (["local", "--config", TINY, "--nproc-per-node", "0"], "--nproc-per-node=0: must be >= 1"),
    (["local", "--config", TINY, "--env", "1BAD=x"], "--env '1BAD=x'"),
    (["local", "--config", TINY, "--name", "../up"], "--name='../up'"),
    (["slurm", "--config", TINY, "--time", "soon"], "--time='soon'"),
    (["slurm", "--config", TINY, "--nodes", "0"], "--nodes=0: must be >= 1"),
    (["slurm", "--config", TINY, "--sbatch-arg", "mem=0"], "--sbatch-arg='mem=0'"),
    (["torchrun", "--config", TINY, "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1", "--run-id", "x"],
     "--node-rank=2: must be in 0..1"),
    (["torchrun", "--config", TINY, "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "h:1"],
     "--run-id is required with --nnodes=2"),
    (["torchrun", "--config", TINY, "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "h", "--run-id", "x"],
     "--rdzv-endpoint='h': expected HOST:PORT"),
    (["deepspeed", "--config", TINY, "--hosts", "n1:2,n2:2"], "--master-addr is required with 2 hosts"),
    (["deepspeed", "--config", TINY, "--hostfile", "nope"], "--hostfile=nope: file not found"),
])
def test_bad_input_fails_before_anything_starts(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = launch(capsys, *argv, "--runs-dir", tmp_path / "runs")
    assert code == 2
    assert message in err, err
    assert err.startswith(f"shira-launch {argv[0]}: error: ")
    assert not (tmp_path / "runs").exists()


def test_no_preflight_leaves_machine_checks_to_the_job(capsys, tmp_path):
    code, out, _ = launch(capsys, "slurm", "--config", TINY, "--nodes", 2, "--no-preflight", "--dry-run",
                          "model.inline_config=null", "model.path=/only/on/compute/nodes", "distributed.strategy=ddp")
    assert code == 0 and "model.path=/only/on/compute/nodes" in out
    code, _, err = launch(capsys, "slurm", "--config", TINY, "--no-preflight", "--dry-run", "training.bogus=1")
    assert code == 2 and "unknown key 'training.bogus'" in err  # the config itself is always checked


def test_a_run_directory_is_never_reused(capsys, tmp_path):
    (tmp_path / "tiny-taken").mkdir()
    code, _, err = launch(capsys, "local", "--config", TINY, "--runs-dir", tmp_path, "--run-id", "taken")
    assert code == 2 and "already exists" in err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["slurm", "--config", str(TINY), "--nodes", "two"])
    assert exc.value.code == 2
    assert "invalid int value: 'two'" in capsys.readouterr().err


def _console(args: list[str], path: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")} | {"PATH": path}
    return subprocess.run([str(VENV_BIN / "shira-launch"), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_console_command_without_sbatch_on_path_fails_with_install_hint(tmp_path):
    """The real console script, with a PATH that has python and torchrun but no sbatch."""
    proc = _console(["slurm", "--config", str(TINY), "--nodes", "2", "--runs-dir", str(tmp_path / "runs"),
                     "distributed.strategy=ddp"], str(VENV_BIN), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "sbatch not found on PATH" in proc.stderr
    assert "apt-get install slurm-client" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "runs").exists()
    proc = _console(["status"], str(VENV_BIN), tmp_path)
    assert proc.returncode == 2 and "squeue not found on PATH" in proc.stderr


def test_console_command_with_missing_config(tmp_path):
    proc = _console(["local", "--config", "nope.yaml", "--nproc", "2"], f"{VENV_BIN}:/usr/bin:/bin", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"shira-launch local: error: --config=nope.yaml: file not found (cwd {tmp_path})"
    assert proc.stdout == "" and not (tmp_path / "runs").exists()
