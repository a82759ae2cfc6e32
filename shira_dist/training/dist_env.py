"""Where this process sits in the job: rank, world size, device; process group set-up.

The same command runs as one process or under a launcher; the launcher tells us by
environment variables:

    torchrun / deepspeed launcher   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    srun (without torchrun)         SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
                                    (+ MASTER_ADDR/MASTER_PORT set by the batch script)
    nothing                         one process, rank 0 of 1
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single process"  # which variables said so

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def read_dist_env() -> DistEnv:
    """Rank and world size from torchrun-style variables, else SLURM's, else a single process."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        rank = _int_env("RANK") if "RANK" in os.environ else 0
        world = _int_env("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
        local = _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        source = "RANK/WORLD_SIZE"
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        rank, world = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
        local = _int_env("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
        source = "SLURM_PROCID/SLURM_NTASKS"
    else:
        return DistEnv()
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launcher environment ({source}): rank={rank}, world_size={world}, "
                         f"local_rank={local}")
    if world > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ValueError(f"{source} says world_size={world}, but {name} is not set: launch with torchrun, "
                                 "the deepspeed launcher or shira-launch (they set it), or export it")
    return DistEnv(rank=rank, world_size=world, local_rank=local, source=source)


def pick_device(env: DistEnv) -> torch.device:
    """cuda:<local_rank> when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        index = env.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_process_group(env: DistEnv, device: torch.device, backend: str, timeout_minutes: int) -> None:
    """Start the default process group (env:// rendezvous) when there is more than one process."""
    if not env.distributed or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("distributed.backend='nccl' needs CUDA devices; this process has none (use gloo or auto)")
    # torchrun exports these; SLURM-only launches get them from SLURM's variables.
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if device.type == "cuda" else None)


def destroy_process_group() -> None:
    """Tear down the process group, and DeepSpeed's references to it when DeepSpeed ran here:
    torch's own teardown leaves those behind, and a later run in this process would use them."""
    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")  # the module whose global cdb DeepSpeed sets
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None and ds_comm.cdb.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def local_main_first(env: DistEnv) -> Iterator[None]:
    """Local rank 0 runs the block first (fills caches); the others follow and reuse them."""
    if not env.is_local_main:
        barrier()
    try:
        yield
    finally:
        if env.is_local_main:
            barrier()
