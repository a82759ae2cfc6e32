"""How many bytes a training step sends through collectives, by kind (a measuring tool).

    with count_collectives() as counts:      # patches torch.distributed's collectives (and
        one_training_step()                  # the two DeepSpeed caches of them) while open
    counts.bytes   {"all_reduce": ..., "reduce_scatter": ..., "all_gather": ..., ...}

Bytes are those of the whole (unsharded) buffer each call works on, per rank: the tensor
of an all-reduce or broadcast, the input of a reduce-scatter, the output of an all-gather.
Nested calls (one collective built on another) count once. DDP reduces in C++: call
:func:`route_ddp_through_python` first so its buckets pass through ``dist.all_reduce``.
Gradient traffic of data parallelism is :func:`trainable_bytes` per step, whatever the
engine: for SHiRA the adapter's size, like LoRA at the same budget, not the model's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import Tensor, nn

# function name -> (kind, the argument that holds the whole buffer)
_COLLECTIVES: dict[str, tuple[str, str]] = {
    "all_reduce": ("all_reduce", "tensor"),
    "all_reduce_coalesced": ("all_reduce", "tensors"),
    "broadcast": ("broadcast", "tensor"),
    "reduce": ("reduce", "tensor"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_single": ("reduce_scatter", "input"),
    "_reduce_scatter_base": ("reduce_scatter", "input"),
    "reduce_scatter": ("reduce_scatter", "input_list"),
    "all_gather_into_tensor": ("all_gather", "output_tensor"),
    "all_gather_single": ("all_gather", "output_tensor"),
    "_all_gather_base": ("all_gather", "output_tensor"),
    "all_gather": ("all_gather", "tensor_list"),
    "all_gather_coalesced": ("all_gather", "output_tensor_lists"),
}


@dataclass
class CollectiveCounts:
    """Bytes and calls per kind of collective, on this rank."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def gradient_bytes(self) -> int:
        """Bytes reduced (all-reduce + reduce-scatter + reduce): data-parallel gradient traffic."""
        return sum(self.bytes.get(k, 0) for k in ("all_reduce", "reduce_scatter", "reduce"))


def _nbytes(obj) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


_state = threading.local()


def _counting(fn: Callable, kind: str, arg: str, counts: CollectiveCounts) -> Callable:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        depth = getattr(_state, "depth", 0)
        if depth == 0 and sig is not None:
            try:
                bound = sig.bind_partial(*args, **kwargs)
                counts.add(kind, _nbytes(bound.arguments.get(arg)))
            except TypeError:
                counts.add(kind, 0)
        _state.depth = depth + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _state.depth = depth

    return wrapper


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCounts]:
    """Count collective bytes on this rank while the block runs (restores everything after)."""
    counts = CollectiveCounts()
    saved: list[tuple[object, str, Callable]] = []
    for module in (dist, c10d):
        for name, (kind, arg) in _COLLECTIVES.items():
            fn = getattr(module, name, None)
            if callable(fn):
                saved.append((module, name, fn))
                setattr(module, name, _counting(fn, kind, arg, counts))
    cdb = _deepspeed_backend()
    if cdb is not None:  # DeepSpeed caches these two functions when it starts
        for attr, kind, arg in (("all_gather_function", "all_gather", "output_tensor"),
                                ("reduce_scatter_function", "reduce_scatter", "input")):
            fn = getattr(cdb, attr, None)
            if callable(fn):
                saved.append((cdb, attr, fn))
                setattr(cdb, attr, _counting(fn, kind, arg, counts))
    try:
        yield counts
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def _deepspeed_backend():
    import sys

    comm = sys.modules.get("deepspeed.comm.comm")
    return getattr(comm, "cdb", None) if comm is not None else None


def route_ddp_through_python(ddp_model: nn.Module) -> None:
    """Make DDP all-reduce its buckets via ``dist.all_reduce`` (PyTorch's default comm hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ddp_model.register_comm_hook(None, default_hooks.allreduce_hook)


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of all trainable parameters, unsharded (ZeRO-3's ``ds_numel``, DTensor's global size)."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            total += int(getattr(p, "ds_numel", p.numel())) * p.element_size()
    return total
