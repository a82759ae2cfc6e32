"""The torchrun command line shared by the local, torchrun and slurm backends."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..process import sibling_tool


def torchrun_prefix() -> list[str]:
    """``torchrun`` beside this interpreter, else ``python -m torch.distributed.run`` (the same program)."""
    exe = sibling_tool("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@dataclass(frozen=True)
class Rendezvous:
    """How torchrun agents on ``nnodes`` nodes find each other.

    c10d: the agent that binds the endpoint first hosts the store; the others connect to it.
    """

    nnodes: int
    endpoint: str  # "host:port", reachable from every node
    run_id: str  # the same on every node
    node_rank: int | None = None  # informational under c10d (ranks follow join order); logged per node
    local_addr: str | None = None  # this node's address as the others reach it (MASTER_ADDR for workers)

    def args(self) -> list[str]:
        out = [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}",
               f"--rdzv-id={self.run_id}"]
        if self.node_rank is not None:
            out.append(f"--node-rank={self.node_rank}")
        if self.local_addr:
            out.append(f"--local-addr={self.local_addr}")
        return out
