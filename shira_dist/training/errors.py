"""The job's own failures: each message is the whole story, printed as one line (no traceback).

    ConfigError (config.py)  the config cannot run                       exit 2
      DataError              a data file, row or field does not fit      exit 2
    RunFailed                the run diverged (non-finite loss or        exit 1, metrics.json
                             gradient norm), the disk filled up, ...             status "failed"
    RunInterrupted           SIGTERM / SIGINT                            exit 128 + signal,
                                                                                 status "interrupted"

Anything else is a bug: it keeps its traceback (and metrics.json still says "failed").
"""

from __future__ import annotations

import signal

from .config import ConfigError


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
