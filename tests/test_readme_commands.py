"""The README's shell commands run as written, in the order a reader meets them, and do what
the text says. The first block (``make run`` / ``make test``) is what CI itself runs; every
other ```bash block is run here, line by line, from a scratch directory that sees the repo's
configs (so ``runs/`` lands there), with the project's virtualenv first on PATH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Every command of every ```bash block but the first, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README lost its command blocks"
    commands = []
    for block in blocks[1:]:
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command:
                commands.append(command)
    return commands


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict:
    """Run every command once, in order: {command: (exit code, output)}; the scratch directory."""
    work = tmp_path_factory.mktemp("readme")
    (work / "configs").symlink_to(REPO / "configs")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    results = {}
    for command in readme_commands():
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        results[command] = (proc.returncode, proc.stdout + proc.stderr)
    return {"work": work, "results": results}


def _metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def test_every_readme_command_exits_0(ran):
    failed = {c: out[-3000:] for c, (code, out) in ran["results"].items() if code != 0}
    assert not failed, "\n\n".join(f"$ {c}\n{out}" for c, out in failed.items())


@pytest.mark.parametrize("run_dir,strategy,world", [("runs/tiny-single", "single", 1), ("runs/tiny-ddp", "ddp", 2),
                                                    ("runs/tiny-fsdp", "fsdp", 2), ("runs/tiny-zero3-demo", "deepspeed", 2)])
def test_the_training_lines_train_as_described(ran, run_dir, strategy, world):
    metrics = _metrics(ran["work"] / run_dir)
    assert metrics["status"] == "completed"
    assert metrics["strategy"] == strategy and metrics["world_size"] == world
    assert (ran["work"] / run_dir / "final" / "adapter_model.safetensors").is_file()


def test_status_reports_the_launched_run(ran):
    (code, out), = [v for c, v in ran["results"].items() if c.startswith("shira-launch status")]
    assert code == 0 and "completed" in out


def test_the_slurm_line_renders_a_script_and_starts_nothing(ran):
    (code, out), = [v for c, v in ran["results"].items() if c.startswith("shira-launch slurm")]
    assert code == 0 and "#SBATCH --nodes=2" in out and "srun" in out
    assert not any(p.name.startswith("default") for p in (ran["work"] / "runs").iterdir())
