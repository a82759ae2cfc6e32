"""Start a 2-process job on this machine (CPU, gloo) the way users do: torchrun or the deepspeed launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(name: str, module: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def run_job(kind: str, script: Path, args: list[str], timeout_s: float) -> tuple[int | None, bool, str]:
    """Run ``script args`` on 2 local ranks with ``kind`` = "torchrun" | "deepspeed".

    Returns (exit code, timed out, combined output). The job runs in its own process group,
    so a hung job is killed whole. The DeepSpeed shared-memory op compiles once into
    <repo>/.cache/torch_extensions.
    """
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    if kind == "torchrun":
        cmd = _launcher("torchrun", "torch.distributed.run") + [
            "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port]
    elif kind == "deepspeed":
        cmd = _launcher("deepspeed", "deepspeed.launcher.runner") + [
            "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", port]
    else:
        raise ValueError(f"kind={kind!r}: use 'torchrun' or 'deepspeed'")
    proc = subprocess.Popen(cmd + [str(script), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, False, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return proc.returncode, True, output
