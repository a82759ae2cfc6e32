"""Where a run starts: the checkpoint to resume from, or a clean slate.

    resume=auto    the newest checkpoints/step-<N> whose three files all load (each read in
                   full); newer broken ones are named and set aside as broken-step-<N>
    resume=never   a fresh start: an earlier run's checkpoints, final/ and metrics.json go
    resume=<dir>   that checkpoint, which must load

A completed run (metrics.json "completed" and final/ written) is recognised, so preflight can
refuse to train it again by accident (:func:`check_resume`, which only reads). At start, rank 0
claims output_dir and every rank learns the resume point (:func:`claim_output_dir`); then each
rank restores the optimizer, scheduler, its RNG and the loop state, or starts fresh
(:func:`start_state`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoint import read_adapter_tensors
from ..io import atomic_write_bytes
from .checkpointing import (STATE_NAME, checkpoint_step, list_checkpoints, load_trainer_state, remove_leftovers,
                            set_rng_state)
from .config import config_to_yaml
from .dist_env import DistEnv
from .errors import ConfigError, RunFailed
from .loop import LoopState
from .lora_baseline import lora_resume_expectations
from .report import log
from .schema import RunConfig
from .strategies import TrainingStrategy


# ---- which checkpoint ------------------------------------------------------------------------------------
def checkpoint_problem(directory: str) -> Optional[str]:
    """Why ``directory`` cannot be resumed from (each of its files is read in full), or None."""
    config = os.path.join(directory, "adapter_config.json")
    try:
        with open(config) as f:
            json.load(f)
        read_adapter_tensors(directory)
        load_trainer_state(directory)
    except json.JSONDecodeError as e:
        return f"{config} is not valid JSON ({e})"
    except OSError as e:
        return f"{e.filename or directory}: {e.strerror or e}"
    except ValueError as e:  # read_adapter_tensors and load_trainer_state name the file
        return str(e)
    return None


@dataclass
class ResumePoint:
    directory: Optional[str]  # None: a fresh start
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (newer broken checkpoint, why)


def find_resume(output_dir: str, resume: str) -> ResumePoint:
    """resume='auto': the newest checkpoint in output_dir that loads completely (or none); 'never': none;
    else that directory, which must load completely."""
    if resume == "never":
        return ResumePoint(None)
    if resume == "auto":
        skipped = []
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return ResumePoint(path, skipped)
            skipped.append((path, problem))
        return ResumePoint(None, skipped)
    if not os.path.isfile(os.path.join(resume, STATE_NAME)):
        raise ConfigError(f"training.resume={resume!r} is not a checkpoint directory (no {STATE_NAME}); "
                          "allowed: auto, never, or a checkpoints/step-<N> directory")
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise ConfigError(f"training.resume={resume!r} cannot be resumed from: {problem}")
    return ResumePoint(resume)


def read_metrics(output_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(output_dir, "metrics.json")) as f:
            document = json.load(f)
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def completed_run(output_dir: str) -> Optional[dict]:
    """The metrics of a completed run in output_dir (status completed and final/ written), else None."""
    document = read_metrics(output_dir)
    final = os.path.join(output_dir, "final", "adapter_model.safetensors")
    if document is not None and document.get("status") == "completed" and os.path.isfile(final):
        return document
    return None


def check_resume_matches(directory: str, expected: list[tuple[str, object, str, object]]) -> None:
    """The checkpoint's adapter must be the one the config asks for (else resuming would
    silently train a different adapter than configured). ``expected``: (adapter_config.json key,
    the value needed, the config key, its value)."""
    with open(os.path.join(directory, "adapter_config.json")) as f:
        saved = json.load(f)
    for key, wanted, config_key, config_value in expected:
        if saved.get(key) != wanted:
            raise ValueError(f"{directory} holds an adapter with {key}={saved.get(key)!r}, but the config asks for "
                             f"{config_key}={config_value!r}; use another output_dir, or training.resume=never to "
                             "start over")


def check_resume(cfg: RunConfig) -> None:
    """Preflight: a completed run is not resumed (nor silently trained over); a resume point loads and fits."""
    tr, out = cfg.training, cfg.output_dir
    if tr.resume == "auto":
        done = completed_run(out)
        if done is not None:
            steps = (done.get("train") or {}).get("steps")
            raise ValueError(f"output_dir={out!r} holds a completed run ({steps} steps, final adapter in "
                             f"{os.path.join(out, 'final')}); to train again from scratch set training.resume=never "
                             "(replaces it), to train it further raise training.max_steps and set training.resume="
                             "<its last checkpoints/step-N>, or choose another output_dir")
    point = find_resume(out, tr.resume)
    if point.directory is None:
        return
    step: Optional[int] = checkpoint_step(point.directory)
    explicit = tr.resume != "auto"
    if step is not None and (step > tr.max_steps or explicit and step == tr.max_steps):
        raise ValueError(f"{point.directory} is at step {step}, training.max_steps={tr.max_steps}: nothing to train; "
                         "raise training.max_steps, or set training.resume=never to start over")
    if cfg.adapter != "shira":
        check_resume_matches(point.directory, lora_resume_expectations(cfg))
        return
    s = cfg.shira
    check_resume_matches(point.directory, [("peft_type", "SHIRA", "adapter", cfg.adapter)] + [
        (key, value, f"shira.{key}", value) for key, value in (
            ("r", s.r), ("mask_type", s.mask_type), ("random_seed", s.random_seed),
            ("target_modules", s.target_modules), ("modules_to_save", s.modules_to_save))])


# ---- claiming output_dir (rank 0) --------------------------------------------------------------------
def set_aside(paths: list[str]) -> list[str]:
    """Rename broken checkpoints to broken-step-<N> (kept for a look, never resumed or pruned)."""
    out = []
    for path in paths:
        target = os.path.join(os.path.dirname(path), "broken-" + os.path.basename(path))
        n = 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(os.path.dirname(path), f"broken-{os.path.basename(path)}.{n}")
        os.rename(path, target)
        out.append(target)
    return out


def prepare_output_dir(output_dir: str, resume: str) -> tuple[Optional[str], list[str]]:
    """At start (rank 0): remove leftovers, set broken checkpoints aside, pick the resume point, or clear
    an earlier run for a fresh start. Returns (the checkpoint to resume from or None, what was done)."""
    os.makedirs(output_dir, exist_ok=True)
    notes = []
    removed = remove_leftovers(output_dir)
    if removed:
        notes.append(f"removed what an interrupted save or prune left behind: {', '.join(removed)}")
    point = find_resume(output_dir, resume)
    for (path, why), moved in zip(point.skipped, set_aside([p for p, _ in point.skipped])):
        notes.append(f"warning: skipping checkpoint {path}: {why}; moved it to {moved}")
    if point.directory is None:
        cleared = clear_run(output_dir)
        if cleared:
            notes.append(f"starting over (training.resume={resume!r}): removed {len(cleared)} earlier output(s) "
                         "(checkpoints, final adapter, metrics)")
    return point.directory, notes


def clear_run(output_dir: str) -> list[str]:
    """A fresh start: remove an earlier run's checkpoints, final adapter and metrics (a later resume
    must not pick them up, nor a reader take them for this run's). Returns what was removed."""
    removed = []
    for name in ("metrics.json", "final"):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(path)
        elif os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    for path in list_checkpoints(output_dir):
        trash = tempfile.mkdtemp(prefix=f".trash-{os.path.basename(path)}-", dir=os.path.dirname(path))
        os.rename(path, os.path.join(trash, "old"))
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed


def _from_rank0(env: DistEnv, value):
    """Rank 0's ``value`` on every rank (a broadcast when there is a process group)."""
    if not env.distributed or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def claim_output_dir(cfg: RunConfig, env: DistEnv) -> Optional[str]:
    """Rank 0 prepares output_dir (:func:`prepare_output_dir`, then resolved_config.yaml) and tells every
    rank the checkpoint to resume from (None: a fresh start)."""
    decision: tuple[Optional[str], Optional[str]] = (None, None)  # (resume dir, rank 0's error)
    if env.is_main:
        try:
            directory, notes = prepare_output_dir(cfg.output_dir, cfg.training.resume)
            for note in notes:
                log(env, note)
            atomic_write_bytes(os.path.join(cfg.output_dir, "resolved_config.yaml"), config_to_yaml(cfg).encode())
            decision = (directory, None)
        except Exception as e:
            _from_rank0(env, (None, str(e)))
            raise
    directory, error = _from_rank0(env, decision)
    if error is not None:
        raise RunFailed(f"rank 0 failed while preparing output_dir: {error}")
    return directory


# ---- the loop's starting state ---------------------------------------------------------------------------
def _restore(directory: str, strategy: TrainingStrategy, scheduler, env: DistEnv, run_fields: dict) -> LoopState:
    """Optimizer, scheduler, this rank's RNG and the loop state of a checkpoint (the adapter is already loaded)."""
    saved = load_trainer_state(directory)
    strategy.load_optimizer_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    global_batch = run_fields["global_batch"]
    if saved["global_batch"] != global_batch:
        log(env, f"warning: the checkpoint used global batch {saved['global_batch']}, this run {global_batch}: "
                 "the data order after the resume differs from an uninterrupted run")
    if len(saved["rng"]) == env.world_size:
        set_rng_state(saved["rng"][env.rank])
    else:
        log(env, f"warning: the checkpoint has RNG states of {len(saved['rng'])} ranks, this run has "
                 f"{env.world_size}: random streams restart")
    state = LoopState.from_dict(saved["loop"])
    changes = [f"{key} {saved[key]} -> {value}" for key, value in run_fields.items()
               if saved.get(key) is not None and saved[key] != value]
    log(env, f"resumed from {directory} at step {state.step}"
             + (f"; what changes: {', '.join(changes)}" if changes else ""))
    return state


def start_state(resume_dir: Optional[str], strategy: TrainingStrategy, scheduler, cfg: RunConfig, env: DistEnv,
                run_fields: dict) -> LoopState:
    """The checkpoint's loop state (with its optimizer, scheduler and RNG restored), or a fresh one; either
    way with a new segment for this process's run. ``run_fields``: strategy, world_size, precision,
    global_batch."""
    if resume_dir is not None:
        state = _restore(resume_dir, strategy, scheduler, env, run_fields)
    else:
        seed = cfg.training.seed
        torch.manual_seed(seed + 1 + env.rank)  # the model was built from `seed` on every rank alike
        random.seed(seed + 1 + env.rank)
        state = LoopState()
    state.segments.append({**run_fields, "start_step": state.step, "end_step": state.step})
    return state
