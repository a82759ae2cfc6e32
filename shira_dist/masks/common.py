"""What every mask shares: the budget, seeds and sampling, the layer's shape, and the one
check that turns a mask (dense 0/1 or sparse COO of ones) into stored indices."""

from __future__ import annotations

import hashlib
import secrets
from typing import Optional

import torch
from torch import Tensor, nn

from ..partitioned import full_shape

# Above this density, rejection sampling wastes draws; a full permutation of m*n is
# then at most 1/_DENSE_FRACTION times nnz, so still O(nnz).
_DENSE_FRACTION = 0.25


def shira_budget(out_features: int, in_features: int, r: int, where: str = "layer") -> int:
    """Number of trainable entries r*(in+out); errors if it does not fit the layer."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r={r!r} is invalid: r must be a positive integer")
    k = r * (in_features + out_features)
    if k > in_features * out_features:
        raise ValueError(
            f"r={r} too large for {where} ({out_features}x{in_features}): "
            f"r*(in+out)={k} > in*out={in_features * out_features}; use r <= "
            f"{(in_features * out_features) // (in_features + out_features)}"
        )
    return k


def sample_outside(taken: Tensor, total: int, m: int, generator: torch.Generator) -> Tensor:
    """m distinct positions of [0, total) not in ``taken`` (sorted, distinct), uniformly, O(m + |taken|).

    Draws m ranks among the total - |taken| free positions and maps rank s to the s-th free
    position: s + #{taken t : t - (number of taken before t) <= s}.
    """
    if m == 0:
        return taken.new_empty(0)
    ranks = sample_distinct(total - taken.numel(), m, generator, taken.device)
    free_before = taken - torch.arange(taken.numel(), device=taken.device)  # non-decreasing
    return ranks + torch.searchsorted(free_before, ranks, right=True)


def exclude_positions(exclude: Optional[Tensor], shape: tuple[int, int], r: int, device: torch.device,
                      where: str = "layer") -> Optional[Tensor]:
    """``exclude`` (flat positions of entries a new mask must avoid, any order) sorted and unique
    on ``device``; errors if too few entries are left for the budget. None stays None."""
    if exclude is None:
        return None
    exclude = torch.unique(exclude.to(device=device, dtype=torch.int64))
    free, k = shape[0] * shape[1] - exclude.numel(), shira_budget(*shape, r, where=where)
    if free < k:
        raise ValueError(f"{where}: only {free} entries are free of the adapters to avoid; r*(in+out)={k} needed "
                         "(use a smaller r or avoid fewer adapters)")
    return exclude


def layer_seed(random_seed: int, module_path: str) -> int:
    """A stable 63-bit seed for one layer, so same-shape layers get different patterns."""
    digest = hashlib.sha256(f"{random_seed}:{module_path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(device: torch.device, random_seed: int | None) -> torch.Generator:
    # Without a seed draw one from the OS: torch's default generator starts from a fixed
    # seed in every process, which would silently give every run the same "random" mask.
    seed = random_seed if random_seed is not None else secrets.randbits(63)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def sample_distinct(total: int, k: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """k distinct integers uniformly from [0, total), sorted, in O(k) memory (int64)."""
    if k > total:
        raise ValueError(f"cannot choose {k} distinct positions out of {total}")
    if k >= _DENSE_FRACTION * total:
        return torch.randperm(total, generator=generator, device=device)[:k].sort().values
    picked = torch.empty(0, dtype=torch.int64, device=device)
    while picked.numel() < k:
        need = k - picked.numel()
        draw = torch.randint(0, total, (need + need // 16 + 64,), generator=generator, device=device)
        picked = torch.unique(torch.cat([picked, draw]))
    if picked.numel() > k:  # drop a uniformly random surplus (unique() sorted them)
        keep = torch.randperm(picked.numel(), generator=generator, device=device)[:k]
        picked = picked.index_select(0, keep).sort().values
    return picked


def weight_of(base_layer: nn.Module) -> Tensor:
    """The layer's 2-D weight (possibly a ZeRO-3 partition: see :mod:`shira_dist.partitioned`)."""
    weight = getattr(base_layer, "weight", None)
    if not isinstance(weight, Tensor) or len(full_shape(weight)) != 2:
        raise TypeError(f"mask functions need a layer with a 2-D .weight, got {type(base_layer).__name__}")
    return weight


def layer_shape(base_layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer: its declared features (a quantized weight's storage may be
    packed, a ZeRO-3 partition empty), else its weight's whole shape."""
    if isinstance(getattr(base_layer, "out_features", None), int) and isinstance(getattr(base_layer, "in_features", None), int):
        return base_layer.out_features, base_layer.in_features
    return full_shape(weight_of(base_layer))


def sparse_mask(flat: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Sorted flat positions (nnz,) of an (out, in) pattern -> coalesced sparse COO mask of ones."""
    out_f, in_f = shape
    idx = torch.stack([flat // in_f, flat % in_f])
    ones = torch.ones(flat.numel(), dtype=dtype if dtype.is_floating_point else torch.float32, device=flat.device)
    return torch.sparse_coo_tensor(idx, ones, (out_f, in_f), is_coalesced=True)


def mask_device(weight: Tensor) -> torch.device:
    """Where a mask of ``weight`` is made: its device, the CPU for a meta weight (no storage)."""
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def mask_to_indices(mask: Tensor, shape: tuple[int, int], expected_nnz: int, where: str) -> Tensor:
    """Validate a mask (dense 0/1 or sparse COO of ones) -> indices (2, nnz) int32, row-major."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask for {where} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask for {where} has shape {tuple(mask.shape)}, expected {tuple(shape)} (out, in)")
    if mask.is_sparse:
        mask = mask.coalesce()
        vals, idx = mask.values(), mask.indices()
        if not bool((vals == 1).all()):
            raise ValueError(f"sparse mask for {where} must store only ones (got other values)")
    else:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask for {where} must contain only 0 and 1")
        idx = torch.nonzero(mask).t()
    if idx.shape[1] != expected_nnz:
        raise ValueError(
            f"mask for {where} selects {idx.shape[1]} entries, expected exactly r*(in+out)={expected_nnz}"
        )
    return idx.to(torch.int32).contiguous()


def validate_indices(indices: Tensor, shape: tuple[int, int], where: str) -> None:
    """Check stored indices: (2, nnz) integer, inside (out, in)."""
    if indices.dim() != 2 or indices.shape[0] != 2 or indices.dtype.is_floating_point:
        raise ValueError(f"shira_indices for {where} must be an integer tensor of shape (2, nnz), got "
                         f"{indices.dtype} {tuple(indices.shape)}")
    out_f, in_f = shape
    if indices.numel() and (int(indices.min()) < 0 or int(indices[0].max()) >= out_f or int(indices[1].max()) >= in_f):
        raise ValueError(f"shira_indices for {where} are out of range for a ({out_f}, {in_f}) weight")
