"""What the training-safety tests share: the tiny job run in-process, its metrics, a small tmpfs."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Iterator

import torch

from shira_dist.train import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SHORT = ["training.progress_bar=false", "training.eval_before_training=false", "training.max_steps=8",
         "training.save_every=2", "training.log_every=4", "training.keep_checkpoints=2"]


def run_tiny(out: Path, *overrides: str) -> int:
    """The tiny job in this process (8 steps, checkpoints every 2); returns its exit status."""
    threads = torch.get_num_threads()
    try:
        return main(["--config", TINY, f"output_dir={out}", *SHORT, *overrides])
    finally:
        torch.set_num_threads(threads)


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (a real full disk; CI runs as root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                   capture_output=True, text=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
