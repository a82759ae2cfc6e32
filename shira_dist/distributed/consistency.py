"""Every rank must hold the same SHiRA adapters: same indices, and the same values.

    rank r:  d_i = digest(tensor i)     i = every layer's indices (then values), fixed order
             all_reduce(MAX, [d, -d])  ->  max_r d_i  and  -min_r d_i
             max != min at i  ->  MaskMismatchError naming tensor i, raised on every rank

A few int64 all-reduced, whatever the model size (digests: blake2b, 62 bits, on the host).
Indices are buffers, whole on every rank, so the check runs before or after sharding.
With ``random_seed=None`` each process draws its own mask: :func:`broadcast_adapters`
copies rank 0's adapters to every rank (before sharding); :func:`sync_adapters` does both.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..masks import CALIBRATED_MASKS
from ..modules_to_save import ModulesToSave
from .common import rank_and_world, unwrap_shira_model

_MASK = (1 << 62) - 1  # digests stay positive and negatable in int64


class MaskMismatchError(ValueError):
    """Ranks hold different SHiRA indices or values (raised on every rank, never a hang)."""


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK


def _tensor_digest(t: Tensor) -> int:
    t = t.detach().to("cpu").contiguous()
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    return _digest(head + (t.view(torch.uint8).numpy().tobytes() if t.numel() else b""))


def _comm_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _differs(values: list[int], group: Optional[dist.ProcessGroup]) -> list[bool]:
    """Per entry: does some rank hold a different value? One MAX all-reduce of [v, -v]."""
    local = torch.tensor(values, dtype=torch.int64)
    both = torch.cat([local, -local]).to(_comm_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, neg_low = both.cpu().split(len(values))
    return (high != -neg_low).tolist()


def _adapter_tensors(model: nn.Module, values: bool) -> list[tuple[str, Tensor]]:
    """(what, tensor) in a fixed order: all indices first, then (gathered) adapter values."""
    shira = unwrap_shira_model(model)
    entries = [(f"{path}.shira_indices[{adapter!r}]", idx)
               for path, layer in shira.shira_layers() for adapter, idx in layer.shira_indices.items()]
    if values:
        from .adapter_io import gather_adapter_state_dict  # values may be sharded: gather them

        for adapter in shira.peft_config:
            full = gather_adapter_state_dict(model, adapter, rank0_only=False)
            entries += [(f"{key} (adapter {adapter!r})", t) for key, t in full.items()
                        if not key.endswith(".shira_indices")]
    return entries


def check_adapters_consistent(model: nn.Module, values: bool = False,
                              group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise :class:`MaskMismatchError` on every rank if any two ranks' adapters differ.

    Compares every SHiRA layer's indices, and with ``values=True`` every adapter tensor
    (gathered first where an engine shards it), bit for bit via digests. The error names the
    first mismatching tensor. A no-op without a process group; collective otherwise.
    """
    if rank_and_world(group)[1] == 1:
        return
    entries = _adapter_tensors(model, values)
    layout = "\n".join(what for what, _ in entries).encode()
    if any(_differs([len(entries), _digest(layout)], group)):
        raise MaskMismatchError(
            f"ranks hold different SHiRA layers or adapters (this rank has {len(entries)} adapter tensors, "
            f"the first {entries[0][0] if entries else None!r}): build the same model and adapters everywhere")
    mismatched = _differs([_tensor_digest(t) for _, t in entries], group)
    if any(mismatched):
        what = entries[mismatched.index(True)][0]
        hint = ("each rank drew its own mask (ShiraConfig.random_seed=None, or a gradient/SNIP mask "
                "calibrated on rank-local data?): set random_seed, or call "
                "shira_dist.distributed.broadcast_adapters(model) before sharding"
                if ".shira_indices[" in what else "the ranks' adapter values diverged")
        raise MaskMismatchError(f"{what} differs across ranks ({sum(mismatched)} of {len(entries)} adapter "
                                f"tensors differ): {hint}")


def _broadcast_values(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every adapter's values, then modules_to_save copies (whole tensors: before sharding)."""
    shira = unwrap_shira_model(model)
    for path, layer in shira.shira_layers():
        for adapter, values in layer.shira_weight.items():
            nnz = layer.shira_indices.pattern(adapter).nnz
            if type(values) not in (Tensor, nn.Parameter) or values.numel() != nnz:
                raise RuntimeError(f"{path}: adapter {adapter!r} values are sharded ({type(values).__name__}, "
                                   f"{values.numel()} of {nnz}); call broadcast_adapters before sharding")
            yield f"{path}.shira_weight[{adapter!r}]", values.data
    for path, module in shira.named_modules():
        if isinstance(module, ModulesToSave):
            for name, p in module.modules_to_save.named_parameters():
                yield f"{path}.modules_to_save.{name}", p.data


@torch.no_grad()
def broadcast_adapters(model: nn.Module, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
    """Copy every adapter's indices and values (and modules_to_save copies) from rank ``src``.

    In place, before sharding. Needed when each process drew its own mask
    (``random_seed=None``) or random initial values (``init_weights=False``).
    """
    if rank_and_world(group)[1] == 1:
        return
    device = _comm_device(group)
    values = list(_broadcast_values(model))  # checks for sharded values before any collective
    for _, layer in unwrap_shira_model(model).shira_layers():
        for adapter in layer.shira_weight:
            layer.shira_indices.pattern(adapter).broadcast_(src, group, device)
    for _, t in values:
        buf = t if t.device == device else t.to(device)
        dist.broadcast(buf, src=src, group=group)
        if buf is not t:
            t.copy_(buf)


def sync_adapters(model: nn.Module, broadcast: Optional[bool] = None,
                  group: Optional[dist.ProcessGroup] = None) -> None:
    """Start-up step before sharding: broadcast rank 0's adapters if needed, then check them.

    ``broadcast=None`` broadcasts when some adapter's mask is per process: ``random_seed=None``
    (each process drew its own), or a data-driven mask type (gradient, SNIP), which
    ``get_peft_model(..., calibration_data=...)`` computes before sharding from each rank's
    own batches, so every rank adopts rank 0's. True/False force it. Then
    :func:`check_adapters_consistent` with values, so a rank that built a different model
    fails here rather than training apart.
    """
    shira = unwrap_shira_model(model)
    if broadcast is None:
        broadcast = any(cfg.random_seed is None or cfg.mask_type in CALIBRATED_MASKS
                        for cfg in shira.peft_config.values())
    if broadcast:
        broadcast_adapters(shira, group=group)
    check_adapters_consistent(shira, values=True, group=group)
