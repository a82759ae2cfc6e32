"""Learning-rate schedule: linear warmup, then cosine or linear decay (or constant).

    factor(s) = (s + 1) / warmup                                   s < warmup
              = min + (1 - min) * 0.5 * (1 + cos(pi * p))          cosine   } p = (s - warmup) / (total - warmup)
              = min + (1 - min) * (1 - p)                          linear   }
              = 1                                                  constant

``s`` is the 0-based index of the optimizer step about to run (LambdaLR's last_epoch),
so the first step already has a non-zero rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LrFactor:
    kind: str  # cosine | linear | constant
    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * p)) if self.kind == "cosine" else 1.0 - p
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrFactor(kind, warmup_steps, total_steps, min_ratio))
