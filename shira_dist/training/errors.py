"""The job's own failures: each message is the whole story, printed as one line (no traceback).

    ConfigError              the config cannot run                       exit 2
      DataError              a data file, row or field does not fit      exit 2
    RunFailed                the run diverged (non-finite loss or        exit 1, metrics.json
                             gradient norm), the disk filled up, ...             status "failed"
    RunInterrupted           SIGTERM / SIGINT                            exit 128 + signal,
                                                                                 status "interrupted"

Anything else is a bug: it keeps its traceback (and metrics.json still says "failed").
"""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
from typing import Iterator, Optional

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ConfigError(ValueError):
    """A run config that cannot run; the message names the key, the value and what is allowed."""


class DataError(ConfigError):
    """A data file that cannot train as configured; the message names the file, the row and the field."""


class RunFailed(RuntimeError):
    """The run started but cannot go on (nothing more is saved); the message says why and what to change."""


class RunInterrupted(BaseException):
    """A termination signal arrived; raised in the main thread so metrics.json can say so.

    A BaseException, like KeyboardInterrupt: ``except Exception`` blocks do not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def one_line(exc: BaseException) -> str:
    """The reason metrics.json records: the job's own errors as they are, others with their type."""
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
