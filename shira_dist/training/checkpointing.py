"""Adapter-only checkpoints in PEFT's format, plus what an exact resume needs.

    <output_dir>/checkpoints/step-<N>/adapter_config.json        PEFT format: loads with
    <output_dir>/checkpoints/step-<N>/adapter_model.safetensors  (shira_dist|peft).PeftModel.from_pretrained
    <output_dir>/checkpoints/step-<N>/trainer_state.pt           step, optimizer, scheduler, RNG of
                                                                  every rank, metrics so far
    <output_dir>/final/                                          the adapter alone

A checkpoint is written into a hidden temp directory and renamed into place, so every
``step-<N>`` directory that exists is complete. Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import shutil
import tempfile
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ShiraConfig
from ..checkpoint import write_adapter_tensors
from ..io import atomic_write_bytes

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def save_adapter(directory: str, tensors: dict[str, Tensor], config: ShiraConfig) -> None:
    """adapter_config.json + adapter_model.safetensors (what ShiraModel.save_pretrained writes)."""
    write_adapter_tensors(directory, tensors)
    dataclasses.replace(config, inference_mode=True).save_pretrained(directory)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: all ranks must call it)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def save_checkpoint(output_dir: str, step: int, tensors: dict[str, Tensor], config: ShiraConfig,
                    state: dict, keep: Optional[int]) -> str:
    """Write step-<step> atomically (rank 0 only); prune to the newest ``keep``."""
    root = checkpoints_root(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root)
    try:
        save_adapter(tmp, tensors, config)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(os.path.join(tmp, STATE_NAME), buffer.getvalue())
        os.chmod(tmp, 0o755)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete step-<N> directories, oldest first."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_NAME)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def find_resume_dir(output_dir: str, resume: str) -> Optional[str]:
    """resume='auto': the latest checkpoint in output_dir (or None); 'never': None; else that directory."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume, STATE_NAME)):
        raise FileNotFoundError(f"training.resume={resume!r} is not a checkpoint directory (no {STATE_NAME}); "
                                "allowed: auto, never, or a checkpoints/step-<N> directory")
    return resume


def check_resume_matches(directory: str, shira: dict) -> None:
    """The checkpoint's adapter must be the one the config asks for (else resuming would
    silently train a different adapter than configured)."""
    with open(os.path.join(directory, "adapter_config.json")) as f:
        saved = json.load(f)
    for key, wanted in shira.items():
        if saved.get(key) != wanted:
            raise ValueError(f"{directory} holds an adapter with {key}={saved.get(key)!r}, but the config asks for "
                             f"shira.{key}={wanted!r}; use another output_dir, or training.resume=never to start over")


def clear_checkpoints(output_dir: str) -> list[str]:
    """Remove step-<N> directories of an earlier run (a fresh start must not resume from them later)."""
    found = list_checkpoints(output_dir)
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def load_trainer_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_NAME), map_location="cpu", weights_only=True)
