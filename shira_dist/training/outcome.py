"""How a run ends: metrics.json's status, signals, and writes every rank learns the outcome of.

    status        running      from the start of training (rewritten at every checkpoint)
                  stopped      training.stop_after_step reached; a later run resumes
                  completed    final/ written and evaluated
                  failed       an exception (with "reason"); RunFailed and ConfigError are the job's
                               own, anything else a bug (its traceback is printed too)
                  interrupted  SIGTERM / SIGINT (with "reason"), exit 128 + signal

metrics.json describes what this process did: its strategy, world size and precision, the
checkpoint it resumed from and the steps it trained ("start_step", "steps_this_run"); the
training history it continued ("train", "log", ...) and every earlier process's share
("segments") come from the checkpoint. When the disk is full, a short document replaces the
old one in place, so it never stays at "running" if anything can be written at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import time
from typing import Callable, Iterator, Optional, TypeVar

import torch

from .errors import RunFailed, RunInterrupted
from .loop import LoopState
from .report import metrics_document, write_metrics

T = TypeVar("T")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, (RunFailed, RunInterrupted, ValueError)) else text


def disk_full(exc: BaseException, output_dir: str) -> Optional[RunFailed]:
    """A RunFailed for a full disk (or quota), else None."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        where = f" writing {exc.filename}" if exc.filename else ""
        return RunFailed(f"no space left on the device of output_dir={output_dir!r}{where} ({exc.strerror}); "
                         "free some space (or keep fewer checkpoints: training.keep_checkpoints) and run the same "
                         "command again to resume")
    return None


class RunRecord:
    """The metrics.json of this run, written by rank 0 only, and only once the run owns output_dir."""

    def __init__(self, output_dir: str, is_main: bool) -> None:
        self.path = os.path.join(output_dir, "metrics.json")
        self.is_main = is_main
        self.active = False  # output_dir is this run's (set after start-up cleanup)
        self.started = time.perf_counter()
        self.state: Optional[LoopState] = None
        self.adapter: dict = {}
        self.info: dict = {}

    def document(self, status: str, eval_after: Optional[dict] = None, **extra) -> dict:
        info = {**self.info, **extra, "wall_seconds": time.perf_counter() - self.started}
        if self.state is None:
            return {"status": status, **info}
        if self.state.segments:
            self.state.segments[-1]["end_step"] = self.state.step
        start = info.get("start_step")
        if start is not None:
            info["steps_this_run"] = self.state.step - start
        return metrics_document(self.state, status, eval_after, self.adapter, info)

    def write(self, status: str, eval_after: Optional[dict] = None, **extra) -> Optional[dict]:
        if not (self.is_main and self.active):
            return None
        document = self.document(status, eval_after, **extra)
        write_metrics(self.path, document)
        return document

    def finish_with(self, exc: BaseException) -> None:
        """Record a run that ends by ``exc`` (status failed or interrupted, with the reason)."""
        if not (self.is_main and self.active):
            return
        interrupted = isinstance(exc, (RunInterrupted, KeyboardInterrupt))
        status, reason = ("interrupted" if interrupted else "failed"), one_line(exc) or type(exc).__name__
        try:
            self.write(status, reason=reason)
            return
        except OSError:
            pass
        try:  # a full disk: truncating the old file frees its blocks for a short document
            with open(self.path, "w") as f:
                f.write(json.dumps({"status": status, "reason": reason}) + "\n")
        except OSError as e:
            print(f"[shira_dist] could not record status {status!r} in {self.path}: {e.strerror}", flush=True)


@contextlib.contextmanager
def termination_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise RunInterrupted in the main thread (once: a second signal acts as before)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def interrupt(signum, frame) -> None:
        restore()
        raise RunInterrupted(signum)

    for sig in previous:
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        restore()


def rank0_writes(strategy, is_main: bool, write: Callable[[], T], what: str) -> Optional[T]:
    """Rank 0 runs ``write``; then every rank learns whether it worked (an all-reduce where a bare
    barrier used to be), so a failed write stops all ranks together instead of leaving them waiting."""
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
