"""The rank-0 progress bar (tqdm): steps done, loss, tokens/s, and tqdm's own ETA."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total_steps: int, done_steps: int, enabled: bool, is_main: bool) -> None:
        self.is_main = is_main
        # In a log file (SLURM, CI) every refresh is a new chunk of text: refresh rarely there.
        interval = 0.5 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(total=total_steps, initial=done_steps, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (enabled and is_main), mininterval=interval, file=sys.stderr)

    def update(self, loss: float, tokens_per_second: float, lr: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        """A log line on rank 0 that does not break the bar."""
        if self.is_main:
            if self.bar.disable:
                print(message, flush=True)
            else:
                self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
