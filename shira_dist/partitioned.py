"""Weights that DeepSpeed ZeRO-3 partitioned when the model was built (``deepspeed.zero.Init``).

A model built under ``deepspeed.zero.Init`` (what ``transformers``' ``from_pretrained`` /
``from_config`` do while a ZeRO-3 ``HfDeepSpeedConfig`` is alive, e.g. under the HF Trainer)
never holds a whole weight on any rank: each parameter keeps only its own partition and reads

    p.shape == (0,)        p.ds_shape: the full shape        p.ds_numel: the full size

outside the engine's forward. Adding SHiRA adapters needs only the targeted layers' shapes for
``random`` and ``struct`` masks; ``weight_magnitude`` reads one layer's weight at a time
(gathered, then freed); copies for ``modules_to_save`` are made from a gathered module and
handed to the engine as ordinary parameters. A SHiRA layer's forward reads its values
itself (they live in a ParameterDict, whose own forward never runs, so ZeRO-3 would not
gather them): :func:`used_by` registers them with the layer, as DeepSpeed asks for parameters
used outside their module. Nothing here imports DeepSpeed unless a partitioned tensor is
actually present.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator

from torch import Tensor, nn


def is_partitioned(t: Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (its data is this rank's partition, or empty)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_numel")


def full_shape(t: Tensor) -> tuple[int, ...]:
    """The tensor's whole shape, also for a ZeRO-3 partitioned parameter."""
    return tuple(t.ds_shape) if is_partitioned(t) else tuple(t.shape)


def full_numel(t: Tensor) -> int:
    """The tensor's whole number of elements, also for a ZeRO-3 partitioned parameter."""
    return int(t.ds_numel) if is_partitioned(t) else t.numel()


@contextlib.contextmanager
def gathered(tensors: Iterable[Tensor]) -> Iterator[None]:
    """Whole values of any ZeRO-3 partitioned ``tensors`` inside the block (read-only; collective:
    every rank must enter it with the same tensors). A no-op when none is partitioned."""
    partitioned = [t for t in tensors if is_partitioned(t)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


@contextlib.contextmanager
def used_by(module: nn.Module, params: Iterable[Tensor]) -> Iterator[None]:
    """``module``'s forward reads ZeRO-3 partitioned ``params`` that another (never called)
    module owns: register them as its external parameters, so the engine gathers them with
    ``module`` for every forward and backward from now on, and gather any the engine has not
    gathered for this call yet (the first one, since it ran before they were registered).
    A no-op when none is partitioned."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    for p in partitioned:
        deepspeed.zero.register_external_parameter(module, p)
    missing = [p for p in partitioned if p.numel() == 0]
    with deepspeed.zero.GatheredParameters(missing) if missing else contextlib.nullcontext():
        yield


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with whole, ordinary parameters (collective if it is partitioned).

    A plain ``copy.deepcopy`` of a ZeRO-3 module would copy its partitions and DeepSpeed's
    bookkeeping (``ds_id`` ...) too, so the copy would alias the original's identity; here the
    module is gathered and copied with every parameter replaced by a fresh one holding its whole
    data, which an engine later partitions as a parameter of its own.
    """
    params = list(module.parameters())
    if not any(is_partitioned(p) for p in params):
        return copy.deepcopy(module)
    with gathered(params):
        # deepcopy takes these from its memo instead of copying the ZeRO-3 parameters themselves
        fresh = {id(p): nn.Parameter(p.data.clone(), requires_grad=p.requires_grad) for p in params}
        return copy.deepcopy(module, memo=fresh)
