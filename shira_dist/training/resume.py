"""Where a run starts: the checkpoint to resume from, or a clean slate.

    resume=auto    the newest checkpoints/step-<N> whose three files all load (each read in
                   full); newer broken ones are named and set aside as broken-step-<N>
    resume=never   a fresh start: an earlier run's checkpoints, final/ and metrics.json go
    resume=<dir>   that checkpoint, which must load

A completed run (metrics.json "completed" and final/ written) is recognised, so preflight can
refuse to train it again by accident. Rank 0 calls :func:`claim_output_dir` at start; preflight
calls :func:`find_resume` on every rank (it only reads).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from ..checkpoint import read_adapter_tensors
from .checkpointing import STATE_NAME, list_checkpoints, load_trainer_state, remove_leftovers
from .config import ConfigError


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


def find_resume_dir(output_dir: str, resume: str) -> Optional[str]:
    return find_resume(output_dir, resume).directory


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


def claim_output_dir(output_dir: str, resume: str) -> tuple[Optional[str], list[str]]:
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


def check_resume_matches(directory: str, shira: dict) -> None:
    """The checkpoint's adapter must be the one the config asks for (else resuming would
    silently train a different adapter than configured)."""
    with open(os.path.join(directory, "adapter_config.json")) as f:
        saved = json.load(f)
    for key, wanted in shira.items():
        if saved.get(key) != wanted:
            raise ValueError(f"{directory} holds an adapter with {key}={saved.get(key)!r}, but the config asks for "
                             f"shira.{key}={wanted!r}; use another output_dir, or training.resume=never to start over")


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
