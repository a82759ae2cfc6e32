"""Adapter-only checkpoints in PEFT's format, plus what an exact resume needs.

    <output_dir>/checkpoints/step-<N>/adapter_config.json        PEFT format: loads with
    <output_dir>/checkpoints/step-<N>/adapter_model.safetensors  (shira_dist|peft).PeftModel.from_pretrained
    <output_dir>/checkpoints/step-<N>/trainer_state.pt           step, optimizer, scheduler, RNG of
                                                                  every rank, loop state; written last:
                                                                  the marker of a whole checkpoint
    <output_dir>/final/                                          the adapter alone

Every rank gathers (the adapter, the optimizer state, the RNG states are collectives); only
rank 0 writes, and every rank then learns whether it worked (:func:`rank0_writes`). A kill at
any moment leaves either a whole checkpoint or none:

    save    write into checkpoints/.tmp-step-<N>-*/, then rename it to step-<N>
    prune   rename step-<N> to checkpoints/.trash-step-<N>-*/, then delete it
    final   write into .tmp-final-*/, then rename it to final/
    start   remove .tmp-* and .trash-* leftovers and step-* directories without trainer_state.pt

Which checkpoint a run resumes from is resume.py's business.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ShiraConfig
from ..checkpoint import write_adapter
from ..io import atomic_write_bytes
from .errors import RunFailed
from .loop import LoopState
from .report import RunRecord
from .strategies import TrainingStrategy

T = TypeVar("T")
STATE_NAME = "trainer_state.pt"
STATE_KEYS = ("step", "global_batch", "optimizer", "scheduler", "rng", "loop")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = (".tmp-", ".trash-")
# Test hook: "save:<N>" or "prune:<N>" stops the process (prints a line, then sleeps) in the
# middle of writing step-<N> or of pruning while step-<N> is saved, so a test can SIGKILL it there.
PAUSE_ENV = "SHIRA_DIST_TEST_PAUSE"


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


# ---- writing (rank 0) --------------------------------------------------------------------------------
def _pause_for_test(point: str, step: int) -> None:
    if os.environ.get(PAUSE_ENV) == f"{point}:{step}":
        print(f"[shira_dist] test pause: {point} at step {step}", flush=True)
        while True:
            time.sleep(60)


def _replace_dir(tmp: str, final: str) -> None:
    """Put the finished directory ``tmp`` at ``final``: an older ``final`` is renamed away first."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    trash = None
    if os.path.isdir(final):
        trash = tempfile.mkdtemp(prefix=f".trash-{os.path.basename(final)}-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(trash, "old"))
    os.rename(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def save_final_adapter(output_dir: str, tensors: dict[str, Tensor], config: ShiraConfig) -> str:
    """<output_dir>/final, written whole or not at all (rank 0 only)."""
    final = os.path.join(output_dir, "final")
    tmp = tempfile.mkdtemp(prefix=".tmp-final-", dir=output_dir)
    try:
        write_adapter(tmp, "default", tensors, config)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_checkpoint(output_dir: str, step: int, tensors: dict[str, Tensor], config: ShiraConfig,
                    state: dict, keep: Optional[int]) -> str:
    """Write step-<step> atomically (rank 0 only); prune to the newest ``keep``."""
    root = checkpoints_root(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root)
    try:
        write_adapter(tmp, "default", tensors, config)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(os.path.join(tmp, STATE_NAME), buffer.getvalue())
        _pause_for_test("save", step)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        prune_checkpoints(output_dir, keep, step)
    return final


def prune_checkpoints(output_dir: str, keep: int, step: int = -1) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints; each is renamed away before it is deleted."""
    old = list_checkpoints(output_dir)[:-keep]
    for path in old:
        trash = tempfile.mkdtemp(prefix=f".trash-{os.path.basename(path)}-", dir=os.path.dirname(path))
        os.rename(path, os.path.join(trash, "old"))
        os.remove(os.path.join(trash, "old", STATE_NAME))
        _pause_for_test("prune", step)
        shutil.rmtree(trash, ignore_errors=True)
    return old


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    """A non-finite adapter is never written: RunFailed naming the first bad tensor."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise RunFailed(f"the adapter holds non-finite values ({bad[0]}{more}): {what} is not written")


def remove_leftovers(output_dir: str) -> list[str]:
    """Remove what a killed save or prune left behind (rank 0, at start); returns the names removed."""
    removed = []
    root = checkpoints_root(output_dir)
    places = [(output_dir, False), (os.path.join(output_dir, "final"), False), (root, True)]
    for directory, is_root in places:
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            half_deleted = is_root and _STEP_DIR.match(name) and not os.path.isfile(os.path.join(path, STATE_NAME))
            if name.startswith(_LEFTOVER) or half_deleted:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
                removed.append(os.path.relpath(path, output_dir))
    return removed


# ---- reading -------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str) -> list[str]:
    """step-<N> directories holding a trainer_state.pt (the file a save writes last), oldest first."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_NAME)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def checkpoint_step(directory: str) -> Optional[int]:
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(directory)))
    return int(match.group(1)) if match else None


def load_trainer_state(directory: str) -> dict:
    path = os.path.join(directory, STATE_NAME)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's zip reader and unpickler raise many types, none naming the file
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a trainer state of this job")
    return state


# ---- RNG ---------------------------------------------------------------------------------------------------
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


# ---- every rank gathers, rank 0 writes ------------------------------------------------------------------
def rank0_writes(strategy: TrainingStrategy, is_main: bool, write: Callable[[], T], what: str) -> Optional[T]:
    """Rank 0 runs ``write``; then every rank learns whether it worked (an all-reduce), so a failed write
    stops all ranks together instead of leaving them waiting."""
    error: Optional[Exception] = None
    result = None
    if is_main:
        try:
            result = write()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = e
    failed = strategy.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64))
    if error is not None:
        raise error
    if float(failed[0]):
        raise RunFailed(f"rank 0 could not {what} (its log says why)")
    return result


@dataclass(kw_only=True)
class Checkpointer:
    """Writes this run's checkpoints and its final adapter (collective: every rank calls it)."""

    output_dir: str
    strategy: TrainingStrategy
    scheduler: torch.optim.lr_scheduler.LambdaLR
    adapter_config: ShiraConfig
    run_fields: dict  # strategy, world_size, precision, global_batch: kept in trainer_state.pt
    keep: Optional[int]  # training.keep_checkpoints
    record: RunRecord  # metrics.json is rewritten after each checkpoint
    is_main: bool

    def save(self, state: LoopState) -> str:
        """checkpoints/step-<state.step>; returns its path."""
        tensors = self.strategy.adapter_state_dict("default")  # collectives: every rank takes part
        optimizer = self.strategy.optimizer_state_dict()
        rng = gather_rng_states()

        def write() -> str:
            check_finite(tensors, f"checkpoint step-{state.step}")
            trainer_state = {"step": state.step, **self.run_fields, "optimizer": optimizer,
                             "scheduler": self.scheduler.state_dict(), "rng": rng, "loop": state.to_dict()}
            path = save_checkpoint(self.output_dir, state.step, tensors, self.adapter_config, trainer_state, self.keep)
            self.record.write("running")
            return path

        path = rank0_writes(self.strategy, self.is_main, write, f"save checkpoint step-{state.step}")
        return path or os.path.join(checkpoints_root(self.output_dir), f"step-{state.step}")

    def save_final(self) -> str:
        """<output_dir>/final; returns its path."""
        tensors = self.strategy.adapter_state_dict("default")

        def write() -> str:
            check_finite(tensors, "the final adapter")
            return save_final_adapter(self.output_dir, tensors, self.adapter_config)

        return rank0_writes(self.strategy, self.is_main, write, "write the final adapter") \
            or os.path.join(self.output_dir, "final")
