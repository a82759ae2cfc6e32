"""shira-launch with hostile input: quoting, secrets, private run directories, status, --dry-run.

The launcher runs for real (in this process, through ``cli.main``), and so do the scripts it writes
(bash, with stub ``srun``, ``scontrol``, ``sbatch``, ``torchrun``, ``python`` and ``deepspeed`` first on
PATH or beside the interpreter). Each stub records its argv, environment and working directory, so
a test sees exactly what a real tool would have been given. The same checks against a real SLURM
cluster and real training runs are in test_launch_runs.py.

Hostile values carry command substitutions, backticks, ``;``, ``|``, ``&&``, redirections, quotes,
``#``, ``%``, globs and backslashes; each would create a ``PWNED-<tag>`` file if any shell ran it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from shira_dist.launch.cli import main
from shira_dist.launch.env_vars import REDACTED, is_secret, parse_env, redact_argv
from shira_dist.launch.sbatch_script import sbatch_quote

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
REAL_PYTHON = sys.executable
SECRET = "sekrit123"


def hostile(tag: str) -> str:
    """A value that creates ``PWNED-<tag>`` (relative to the shell's working directory) if a shell runs it."""
    canary = f"PWNED-{tag}"
    return (f"{tag} $(touch {canary}) `touch {canary}` ; touch {canary} | touch {canary} && touch {canary} "
            f"> {canary} ' \" # %j * ~ !x {{a,b}} \\ end")


def no_canaries(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("PWNED-*")]


def files_with(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- stub tools --------------------------------------------------------------------------------------------

_RECORD = """#!/bin/bash
# stub {name}: record argv, environment and working directory, then act like the tool just enough
log={log}/{name}.$$.$RANDOM
printf '%s\\0' "$@" > "$log.argv"
env -0 > "$log.env"
pwd > "$log.cwd"
"""
_ACTIONS = {
    # srun: drop its own options, then run the command as task 0 on node n1
    "srun": 'while [[ $# -gt 0 && $1 == --* ]]; do shift; done\nexport SLURMD_NODENAME=n1 SLURM_PROCID=0\nexec "$@"\n',
    "scontrol": 'case "$1 $2" in\n  "show hostnames") echo n1 ;;\n'
                '  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=localhost" ;;\nesac\n',
    "sbatch": "echo 777\n",
    "squeue": "exit 0\n",
}
# torchrun, python, deepspeed: the training side; optionally wait for a file, then exit with $STUB_EXIT.
_TRAINER = ('if [[ -n ${STUB_WAIT:-} ]]; then while [[ ! -e $STUB_WAIT ]]; do sleep 0.05; done; fi\n'
            'exit "${STUB_EXIT:-0}"\n')


@dataclass
class Call:
    argv: list[str]
    env: dict[str, str]
    cwd: str


class Stubs:
    """A directory of stub tools (with a space in its path) and the calls they recorded."""

    def __init__(self, root: Path):
        self.bin = root / "stub bin"
        self.log = root / "stub log"
        self.bin.mkdir()
        self.log.mkdir()
        for name in ("srun", "scontrol", "sbatch", "squeue", "torchrun", "python", "deepspeed"):
            path = self.bin / name
            path.write_text(_RECORD.format(name=name, log=shlex.quote(str(self.log))) + _ACTIONS.get(name, _TRAINER))
            path.chmod(0o755)

    @property
    def python(self) -> str:
        return str(self.bin / "python")

    def path(self) -> str:
        return f"{self.bin}:{os.environ['PATH']}"

    def calls(self, name: str) -> list[Call]:
        out = []
        for argv in sorted(self.log.glob(f"{name}.*.argv")):
            stem = str(argv)[: -len(".argv")]
            env = dict(kv.split("=", 1) for kv in Path(stem + ".env").read_text().split("\0") if "=" in kv)
            out.append(Call(argv.read_text().split("\0")[:-1], env, Path(stem + ".cwd").read_text().rstrip("\n")))
        return out

    def all_calls(self) -> list[Path]:
        return sorted(self.log.iterdir())


@pytest.fixture
def stubs(tmp_path, monkeypatch) -> Stubs:
    """Stub tools; the launcher in this process finds torchrun/deepspeed beside its 'interpreter' (the stub
    python) and sbatch/srun/squeue on PATH, so nothing real starts."""
    s = Stubs(tmp_path)
    monkeypatch.setattr(sys, "executable", s.python)
    monkeypatch.setenv("PATH", s.path())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_"))]:
        monkeypatch.delenv(key)
    return s


def launch(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- sbatch's #SBATCH tokenizer --------------------------------------------------------------------------------

def sbatch_words(line: str) -> list[str]:
    """The words sbatch reads from one ``#SBATCH`` line: a transcription of ``_get_argument`` in SLURM's
    src/sbatch/opt.c (22.05): whitespace separates words, '...' or "..." group, a backslash escapes the
    next character (inside quotes too), an unescaped, unquoted '#' ends the line."""
    assert line.startswith("#SBATCH")
    rest, i, words = line[len("#SBATCH"):], 0, []
    while True:
        while i < len(rest) and rest[i] in " \t\v\f":
            i += 1
        if i == len(rest):
            return words
        word, quote, escape = [], None, False
        while i < len(rest) and (quote or rest[i] not in " \t\v\f"):
            c = rest[i]
            i += 1
            if escape:
                escape = False
            elif c == "\\":
                escape = True
                continue
            elif quote:
                if c == quote:
                    quote = None
                    continue
            elif c in "\"'":
                quote = c
                continue
            elif c == "#":
                return words + (["".join(word)] if word else [])
            word.append(c)
        assert quote is None, f"sbatch: unmatched {quote} in {line!r}"
        words.append("".join(word))


def directives(script: str) -> dict[str, str]:
    """``{"--chdir": "/a b", ...}`` as sbatch reads the script's ``#SBATCH`` lines."""
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            words = sbatch_words(line)
            assert len(words) == 1, (line, words)
            option, _, value = words[0].partition("=")
            out[option] = value
    return out


@pytest.mark.parametrize("value", ["/plain/path-1_2.x", "/a b", "it's", 'say "hi"', "a#b", "back\\slash",
                                   "\\\"#'", "", "100%j", hostile("q")])
def test_sbatch_quote_is_read_back_as_one_word(value):
    assert sbatch_words(f"#SBATCH --comment={sbatch_quote(value)}") == [f"--comment={value}"]
    assert subprocess.run(["bash", "-n"], input=f"#SBATCH --comment={sbatch_quote(value)}\ntrue\n",
                          text=True).returncode == 0


# --- 1. quoting: the rendered sbatch script, run under bash with stubs ----------------------------------------

def hostile_slurm_launch(tmp_path: Path, monkeypatch, launcher: str) -> tuple[list[str], dict[str, object]]:
    """Arguments for ``shira-launch slurm`` with a hostile value in every option that takes free text, run
    from a hostile working directory; and what each value must arrive as."""
    cwd = tmp_path / f"cwd {hostile('cwd')}"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = cwd / f"cfg {hostile('config')}.yaml"
    shutil.copy(TINY, config)
    runs = tmp_path / f"runs {hostile('runs').replace(chr(92), '')}"  # sbatch's --output cannot hold a backslash
    expect = {"cwd": str(cwd), "config": str(config), "run_dir": str(runs / f"hostile-{launcher}"),
              "env": hostile("env"), "comment": hostile("comment"), "override": f"tracking.run_name={hostile('ovr')}"}
    argv = ["slurm", "--config", config, "--name", "hostile", "--run-id", launcher, "--runs-dir", runs,
            "--launcher", launcher, "--partition", "debug", "--time", "10", "--env", f"MSG={expect['env']}",
            "--env", f"WANDB_API_KEY={SECRET}", "--env", "NCCL_DEBUG=INFO",
            f"--sbatch-arg=--comment={expect['comment']}", expect["override"]]
    return [str(a) for a in argv], expect


def run_script(script: Path, stubs: Stubs, secret: bool) -> subprocess.CompletedProcess:
    env = {"PATH": stubs.path(), "HOME": os.environ["HOME"], "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n1"}
    if secret:
        env["WANDB_API_KEY"] = SECRET  # what sbatch --export=ALL hands the job
    return subprocess.run(["bash", str(script)], cwd=script.parent, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_hostile_values_reach_srun_and_the_job_as_single_arguments(capsys, tmp_path, monkeypatch, stubs, launcher):
    argv, expect = hostile_slurm_launch(tmp_path, monkeypatch, launcher)
    code, script, err = launch(capsys, *argv, "--dry-run")
    assert code == 0, err
    assert SECRET not in script and "export NCCL_DEBUG=INFO" in script
    job = tmp_path / "job"
    job.mkdir()
    (job / "sbatch.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(job / "sbatch.sh")]).returncode == 0

    # What sbatch reads from the #SBATCH lines (real sbatch: test_launch_runs.py).
    assert directives(script) == {
        "--job-name": f"hostile-{launcher}", "--nodes": "1", "--ntasks-per-node": "1", "--partition": "debug",
        "--time": "10", "--output": expect["run_dir"].replace("%", "%%") + "/logs/slurm-%j.out",
        "--chdir": expect["cwd"], "--comment": expect["comment"]}
    # Comment lines carry the run directory only shell-quoted.
    comments = [line for line in script.splitlines() if line.startswith("# ") and "sbatch " in line]
    assert comments and shlex.split(comments[0].split("sbatch ", 1)[1]) == [expect["run_dir"] + "/sbatch.sh"]

    # Without the secret in its environment the job stops before starting anything, naming the variable.
    proc = run_script(job / "sbatch.sh", stubs, secret=False)
    assert proc.returncode != 0 and "WANDB_API_KEY must be in the job environment" in proc.stderr
    assert stubs.all_calls() == []

    proc = run_script(job / "sbatch.sh", stubs, secret=True)
    assert proc.returncode == 0, proc.stderr
    assert no_canaries(tmp_path) == []
    module_args = ["-m", "shira_dist.train", "--config", expect["config"], f"output_dir={expect['run_dir']}",
                   expect["override"]]
    [srun] = stubs.calls("srun")
    trainer = stubs.calls("torchrun" if launcher == "torchrun" else "python")
    assert len(trainer) == 1
    if launcher == "torchrun":
        assert srun.argv[:5] == ["--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
        assert srun.argv[6:8] == ["torchrun-agent", str(stubs.bin / "torchrun")]
        port = str(20000 + 4242 % 20000)
        assert trainer[0].argv == ["--nnodes=1", "--nproc-per-node=1", "--rdzv-backend=c10d",
                                   f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=4242", *module_args]
        assert trainer[0].env["PET_LOCAL_ADDR"] == "127.0.0.1"
    else:
        assert srun.argv == ["--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1", stubs.python, *module_args]
        assert trainer[0].argv == module_args
    assert {k: trainer[0].env.get(k) for k in ("MSG", "WANDB_API_KEY", "NCCL_DEBUG", "MASTER_ADDR")} == {
        "MSG": expect["env"], "WANDB_API_KEY": SECRET, "NCCL_DEBUG": "INFO", "MASTER_ADDR": "127.0.0.1"}
    assert [c.argv for c in stubs.calls("scontrol")][:2] == [["show", "hostnames", "n1"], ["show", "node", "n1"]]


@pytest.mark.parametrize("option, value", [
    ("--runs-dir", "/x/runs\ntouch PWNED\n#"), ("--name", "a\nb"), ("--run-id", "1\n2"), ("--config", "c\n.yaml"),
    ("--partition", "gpu\nx"), ("--time", "10\n"), ("--job-name", "j\nk"), ("--template", "t\n.j2"),
    ("--sbatch-arg", "--comment=a\nb"), ("--env", "A=b\nc"), ("override", "training.seed=1\nx"),
    ("--runs-dir", "/x\rruns"), ("--runs-dir", "/x\0runs"),
])
def test_line_breaks_are_refused_naming_the_option(capsys, tmp_path, monkeypatch, stubs, option, value):
    monkeypatch.chdir(tmp_path)
    args = [value] if option == "override" else [f"{option}={value}"]
    code, out, err = launch(capsys, "slurm", "--config", TINY, *args)
    assert code == 2
    assert err.startswith(f"shira-launch slurm: error: {option}={value!r}: contains a "), err
    assert not (tmp_path / "runs").exists() and stubs.all_calls() == []


def test_line_breaks_refused_in_every_backend_and_a_secret_is_not_echoed(capsys, tmp_path, monkeypatch, stubs):
    monkeypatch.chdir(tmp_path)
    for argv in (["local"], ["deepspeed", "--master-addr", "a\nb"], ["torchrun", "--nnodes", 1, "--node-rank", 0,
                                                                     "--rdzv-endpoint", "h:1\n"]):
        code, _, err = launch(capsys, *argv, "--config", TINY, "--env", f"HF_TOKEN={SECRET}\nx")
        assert code == 2 and "contains a newline" in err and SECRET not in err, err
    code, _, err = launch(capsys, "local", "--config", TINY, "--env", f"HF_TOKEN={SECRET}\n")
    assert code == 2 and "--env='HF_TOKEN=<value not shown>': contains a newline" in err
    code, _, err = launch(capsys, "status", "runs/a\nb")
    assert code == 2 and "target='runs/a\\nb': contains a newline" in err


def test_working_directory_with_a_line_break_is_refused_for_slurm(capsys, tmp_path, monkeypatch, stubs):
    cwd = tmp_path / "a\nb"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, _, err = launch(capsys, "slurm", "--config", TINY, "--runs-dir", tmp_path / "runs", "--dry-run")
    assert code == 2 and f"working directory={str(cwd)!r}: contains a newline" in err, err


@pytest.mark.parametrize("argv, message", [
    (["--name", "x; touch PWNED"], "--name='x; touch PWNED': use letters"),
    (["--run-id", "$(touch PWNED)"], "--run-id='$(touch PWNED)': use letters"),
    (["--job-name", "a b"], "--job-name='a b': use letters"),
    (["--partition", "gpu;x"], "--partition='gpu;x': letters, digits"),
    (["--time", "1 hour"], "--time='1 hour': use minutes"),
    (["--env", "A;B=1"], "--env 'A;B=1': expected KEY=VALUE"),
    (["--sbatch-arg", "--mem 0"], "--sbatch-arg='--mem 0': one sbatch long option per flag"),
    (["--sbatch-arg", "-A proj"], "--sbatch-arg='-A proj': one sbatch long option per flag"),
    (["--runs-dir", "/tmp/a\\b"], "--runs-dir: the run directory '/tmp/a\\\\b/tiny-1' contains a backslash"),
    (["--env", f"WANDB_API_KEY={SECRET}", "--sbatch-arg=--export=NONE"],
     "--sbatch-arg='--export=NONE': the job would not see WANDB_API_KEY"),
])
def test_values_sbatch_cannot_take_are_refused(capsys, tmp_path, monkeypatch, stubs, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = launch(capsys, "slurm", "--config", TINY, "--run-id", 1, *argv)
    assert code == 2 and message in err, err
    assert not (tmp_path / "runs").exists() and SECRET not in err


def test_config_stem_that_is_no_run_name_asks_for_name(capsys, tmp_path, monkeypatch, stubs):
    config = tmp_path / "my config.yaml"
    shutil.copy(TINY, config)
    code, _, err = launch(capsys, "local", "--config", config, "--dry-run")
    assert code == 2 and "the file's stem 'my config' is the default run name but not a valid one" in err
    assert "pass --name" in err


# --- 2. secrets: never in a file of the run directory, always in the started process's environment ------------

def test_secret_keys():
    for key in ("WANDB_API_KEY", "HF_TOKEN", "hf_token", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "my_password_x",
                "GITHUB_TOKEN", "CLIENT_SECRET", "KEY", "GOOGLE_APPLICATION_CREDENTIALS"):
        assert is_secret(key), key
    for key in ("NCCL_DEBUG", "TOKENIZERS_PARALLELISM", "KEYBOARD", "MONKEY", "OMP_NUM_THREADS", "HF_HOME"):
        assert not is_secret(key), key
    env = parse_env(["NCCL_DEBUG=INFO", f"HF_TOKEN={SECRET}", "B=x=y"])
    assert env.plain == {"NCCL_DEBUG": "INFO", "B": "x=y"} and env.secret == {"HF_TOKEN": SECRET}
    assert env.record() == {"NCCL_DEBUG": "INFO", "B": "x=y", "HF_TOKEN": REDACTED}
    assert redact_argv(["x", "--env", f"HF_TOKEN={SECRET}", f"--env=WANDB_API_KEY={SECRET}", f"--e=A_KEY={SECRET}",
                        "NCCL_DEBUG=INFO", "training.api_key=1"]) == [
        "x", "--env", f"HF_TOKEN={REDACTED}", f"--env=WANDB_API_KEY={REDACTED}", f"--e=A_KEY={REDACTED}",
        "NCCL_DEBUG=INFO", "training.api_key=1"]


def assert_private(run_dir: Path, scripts: tuple[str, ...]) -> None:
    """0o700 directories, 0o600 files, 0o700 scripts; nothing readable by group or others."""
    assert mode(run_dir) == 0o700 and mode(run_dir / "logs") == 0o700
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert mode(path) == (0o700 if path.name in scripts else 0o600), path


BACKENDS = {
    "local": ["local", "--nproc-per-node", 1],
    "torchrun": ["torchrun", "--nnodes", 1, "--node-rank", 0, "--rdzv-endpoint", "127.0.0.1:29999"],
    "deepspeed": ["deepspeed", "--hosts", "localhost:1"],
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_foreground_backends_pass_secrets_only_through_the_environment(capsys, tmp_path, monkeypatch, stubs, backend):
    monkeypatch.chdir(tmp_path)
    env_args = ["--env", f"WANDB_API_KEY={SECRET}", "--env", "NCCL_DEBUG=INFO", "--env", f"MSG={hostile('env')}"]
    argv = [*BACKENDS[backend], "--config", TINY, "--runs-dir", tmp_path / "runs", "--run-id", "s", *env_args]
    code, out, _ = launch(capsys, *argv, "--dry-run")
    assert code == 0 and SECRET not in out and "# WANDB_API_KEY: passed to the run through the environment" in out
    assert not (tmp_path / "runs").exists() and stubs.all_calls() == []

    code, out, err = launch(capsys, *argv)
    assert code == 0, out + err
    run_dir = tmp_path / "runs" / "tiny-s"
    tool = "deepspeed" if backend == "deepspeed" else "torchrun"
    [call] = stubs.calls(tool)
    assert (call.env["WANDB_API_KEY"], call.env["NCCL_DEBUG"], call.env["MSG"]) == (SECRET, "INFO", hostile("env"))
    assert files_with(run_dir, SECRET) == []
    tag = "-node0" if backend == "torchrun" else ""
    record = yaml.safe_load((run_dir / f"launch{tag}.yaml").read_text())
    assert record["env"] == {"NCCL_DEBUG": "INFO", "MSG": hostile("env"), "WANDB_API_KEY": REDACTED}
    assert f"WANDB_API_KEY={REDACTED}" in record["argv"] and record["exit_code"] == 0
    assert_private(run_dir, scripts=(f"command{tag}.sh",))

    # command.sh re-runs the same command: the secret must come from the environment again.
    script = run_dir / f"command{tag}.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bare = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]}
    proc = subprocess.run([str(script)], env=bare, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "WANDB_API_KEY must be set in the environment" in proc.stderr
    assert len(stubs.calls(tool)) == 1
    proc = subprocess.run([str(script)], env={**bare, "WANDB_API_KEY": SECRET}, cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    [rerun] = [c for c in stubs.calls(tool) if "PYTEST_CURRENT_TEST" not in c.env]  # not the launcher's call
    assert rerun.argv == call.argv
    assert (rerun.env["WANDB_API_KEY"], rerun.env["NCCL_DEBUG"], rerun.env["MSG"]) == (SECRET, "INFO", hostile("env"))
    assert no_canaries(tmp_path) == []


def test_slurm_passes_secrets_in_sbatch_environment(capsys, tmp_path, monkeypatch, stubs):
    monkeypatch.chdir(tmp_path)
    code, out, err = launch(capsys, "slurm", "--config", TINY, "--runs-dir", tmp_path / "runs", "--run-id", "s",
                            "--env", f"WANDB_API_KEY={SECRET}", "--env", "NCCL_DEBUG=INFO")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "tiny-s"
    [sbatch] = stubs.calls("sbatch")
    assert sbatch.argv == ["--parsable", "--export=ALL", str(run_dir / "sbatch.sh")]
    assert sbatch.env["WANDB_API_KEY"] == SECRET and sbatch.cwd == str(tmp_path)
    assert files_with(run_dir, SECRET) == []
    assert "export NCCL_DEBUG=INFO" in (run_dir / "sbatch.sh").read_text()
    record = yaml.safe_load((run_dir / "launch.yaml").read_text())
    assert record["env"] == {"NCCL_DEBUG": "INFO", "WANDB_API_KEY": REDACTED}
    assert_private(run_dir, scripts=("sbatch.sh",))

    def sbatch_call(run_id: str) -> Call:
        script = str(tmp_path / "runs" / f"tiny-{run_id}" / "sbatch.sh")
        [call] = [c for c in stubs.calls("sbatch") if c.argv[-1] == script]
        return call

    # A user's own --export must pass the secret on; naming it is enough.
    code, _, err = launch(capsys, "slurm", "--config", TINY, "--runs-dir", tmp_path / "runs", "--run-id", "t",
                          "--env", f"WANDB_API_KEY={SECRET}", "--sbatch-arg=--export=NIL,WANDB_API_KEY")
    assert code == 0, err
    assert sbatch_call("t").argv[:-1] == ["--parsable"] and sbatch_call("t").env["WANDB_API_KEY"] == SECRET
    assert "#SBATCH --export=NIL,WANDB_API_KEY" in (tmp_path / "runs" / "tiny-t" / "sbatch.sh").read_text()
    # Without secrets sbatch is called as before (its own --export default applies).
    code, _, _ = launch(capsys, "slurm", "--config", TINY, "--runs-dir", tmp_path / "runs", "--run-id", "u")
    assert code == 0 and sbatch_call("u").argv[:-1] == ["--parsable"]


# --- 3. status for every backend --------------------------------------------------------------------------------

def start_launcher(stubs: Stubs, tmp_path: Path, run_id: str, **env: str) -> subprocess.Popen:
    """``shira-launch local`` in its own process, finding the stub torchrun beside its 'interpreter'."""
    argv = ["local", "--config", str(TINY), "--runs-dir", str(tmp_path / "runs"), "--run-id", run_id]
    code = (f"import sys; sys.executable = {stubs.python!r}; from shira_dist.launch.cli import main; "
            f"sys.exit(main({argv!r}))")
    return subprocess.Popen([REAL_PYTHON, "-c", code], cwd=tmp_path, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def status_of(capsys, run_dir: Path) -> str:
    code, out, err = launch(capsys, "status", run_dir)
    assert code == 0, err
    return out


def test_status_of_a_local_run_running_finished_failed_killed(capsys, tmp_path, monkeypatch, stubs):
    release = tmp_path / "release"
    run_dir = tmp_path / "runs" / "tiny-live"
    proc = start_launcher(stubs, tmp_path, "live", STUB_WAIT=str(release))
    try:
        wait_for(lambda: stubs.calls("torchrun"), "the stub torchrun to start")
        out = status_of(capsys, run_dir)
        assert f"tiny-live (local, launch.yaml, started " in out
        assert f"running, launcher PID {proc.pid} on host " in out, out
        assert "training: no metrics.json yet" in out
        assert f"log {run_dir / 'logs' / 'launch.log'} (last 1 lines):" in out and "  | $ " in out
    finally:
        release.touch()
        assert proc.wait(60) == 0, proc.stderr.read()
    out = status_of(capsys, run_dir)
    assert "tiny-live (local, launch.yaml" in out and "finished, launcher exited with code 0 at " in out, out

    failed = start_launcher(stubs, tmp_path, "failed", STUB_EXIT="3")
    assert failed.wait(60) == 3
    assert "FAILED, launcher exited with code 3" in status_of(capsys, tmp_path / "runs" / "tiny-failed")

    release.unlink()
    killed = start_launcher(stubs, tmp_path, "killed", STUB_WAIT=str(release))
    try:
        wait_for(lambda: len(stubs.calls("torchrun")) == 3, "the third stub torchrun to start")
        killed.send_signal(signal.SIGKILL)
        killed.wait(60)
        out = status_of(capsys, tmp_path / "runs" / "tiny-killed")
        assert f"not running; launcher PID {killed.pid} is gone without recording an exit code (killed?)" in out
    finally:
        release.touch()  # the orphaned stub torchrun exits too

    # A PID recorded on another host is not looked up here.
    record = yaml.safe_load((run_dir / "launch.yaml").read_text())
    record.pop("exit_code")
    record["host"] = "elsewhere.example"
    (run_dir / "launch.yaml").write_text(yaml.safe_dump(record))
    assert "on host elsewhere.example; run status there" in status_of(capsys, run_dir)


def test_status_and_cancel_say_what_they_support(capsys, tmp_path, stubs):
    code, _, err = launch(capsys, "status", tmp_path)
    assert code == 2 and "no launch.yaml in this directory; status and cancel take run directories made by " \
                         "shira-launch (backends local, torchrun, deepspeed, slurm) or SLURM job ids" in err
    code, _, err = launch(capsys, "status", tmp_path / "missing")
    assert code == 2 and "neither a run directory nor a job id" in err
    run_dir = tmp_path / "runs" / "tiny-c"
    proc = start_launcher(stubs, tmp_path, "c")
    assert proc.wait(60) == 0
    code, _, err = launch(capsys, "cancel", run_dir)
    assert code == 2 and "is a local run: cancel stops SLURM jobs only" in err
    assert "kill the launcher (PID" in err and stubs.calls("scancel") == []


# --- 4. --dry-run changes nothing ------------------------------------------------------------------------------

def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.mark.parametrize("argv", [
    ["local", "--nproc-per-node", 2, "distributed.strategy=ddp"],
    ["torchrun", "--nnodes", 2, "--rdzv-endpoint", "h:1", "distributed.strategy=ddp"],
    ["deepspeed", "--hosts", "localhost:2", "distributed.strategy=ddp"],
    ["slurm", "--nodes", 2, "distributed.strategy=ddp"],
], ids=lambda a: a[0] if isinstance(a, list) else None)
def test_dry_run_creates_nothing_and_starts_nothing(capsys, tmp_path, monkeypatch, stubs, argv):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    runs = tmp_path / f"runs {hostile('runs').replace(chr(92), '')}"
    before = tree(tmp_path)
    code, out, err = launch(capsys, *argv, "--config", TINY, "--runs-dir", runs, "--env", f"HF_TOKEN={SECRET}",
                            "--env", f"MSG={hostile('env')}", "--dry-run")
    assert code == 0, err
    assert tree(tmp_path) == before  # no run directory, no logs, nothing in HOME or the working directory
    assert stubs.all_calls() == []  # no sbatch, srun, torchrun or deepspeed
    assert SECRET not in out + err
    assert "HF_TOKEN" in out  # named (a comment), not its value
