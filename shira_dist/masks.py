"""SHiRA masks: which r*(in+out) entries of an (out, in) weight are trained.

A mask function has PEFT's signature ``mask_fn(base_layer, r, **kwargs) -> mask`` and
may return either a dense (out, in) tensor of 0/1 (PEFT's form) or a sparse COO
(out, in) tensor whose stored values are 1 (our built-ins: O(nnz) memory, never a
dense m*n permutation). :func:`mask_to_indices` validates either form and turns it
into the stored ``indices: (2, nnz) int32`` (row 0 = output index, row 1 = input).
"""

from __future__ import annotations

import hashlib
import secrets

import torch
from torch import Tensor, nn

from .kernels.layout import index_dtype
from .partitioned import full_shape

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


def layer_seed(random_seed: int, module_path: str) -> int:
    """A stable 63-bit seed for one layer, so same-shape layers get different patterns."""
    digest = hashlib.sha256(f"{random_seed}:{module_path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(device: torch.device, random_seed: int | None) -> torch.Generator:
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


def _weight_of(base_layer: nn.Module) -> Tensor:
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
    return full_shape(_weight_of(base_layer))


def _sparse_mask(flat: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Sorted flat positions (nnz,) of an (out, in) pattern -> coalesced sparse COO mask of ones."""
    out_f, in_f = shape
    idx = torch.stack([flat // in_f, flat % in_f])
    ones = torch.ones(flat.numel(), dtype=dtype if dtype.is_floating_point else torch.float32, device=flat.device)
    return torch.sparse_coo_tensor(idx, ones, (out_f, in_f), is_coalesced=True)


def _random_flat(out_f: int, in_f: int, r: int, random_seed: int | None, device: torch.device) -> Tensor:
    """The random mask's entries as sorted flat positions (nnz,) int64 (row-major order)."""
    k = shira_budget(out_f, in_f, r)
    return sample_distinct(out_f * in_f, k, _generator(device, random_seed), device)


def random_csr(shape: tuple[int, int], r: int, random_seed: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`random_mask`'s pattern (the same entries for the same seed and device) straight in
    CSR form: ``crow`` (out+1,) and ``col`` (nnz,), int32 (int64 past 2^31), row-major.

    What ``get_peft_model`` uses for ``mask_type="random"``: no sparse mask tensor, no (2, nnz)
    indices and no re-validation of entries that are distinct and in range by construction.
    """
    out_f, in_f = shape
    flat = _random_flat(out_f, in_f, r, random_seed, device)
    dt = index_dtype(flat.numel(), shape)  # int32 unless past 2^31
    starts = torch.arange(out_f + 1, dtype=torch.int64, device=device) * in_f
    return torch.searchsorted(flat, starts).to(dt), flat.remainder_(in_f).to(dt)


def random_mask(base_layer: nn.Module, r: int, random_seed: int | None = None, **kwargs) -> Tensor:
    """Uniform random SHiRA mask: r*(in+out) distinct positions of ``base_layer.weight``.

    Returns a coalesced sparse COO (out, in) tensor of ones on the weight's device (on
    the CPU for a meta-device weight, which has no storage to hold a pattern). Needs only the
    weight's shape, so a ZeRO-3 partitioned weight works as it is.
    ``random_seed=None`` draws a fresh pattern every call; extra kwargs are ignored.
    """
    weight = _weight_of(base_layer)
    shape = layer_shape(base_layer)
    return _sparse_mask(_random_flat(*shape, r, random_seed, mask_device(weight)), shape, weight.dtype)


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


# The paper's other strategies build on the helpers above, so they are imported here, at
# the end, once those exist (shira_dist/__init__ always loads this module first).
from .mask_strategies import gradient_mask, snip_mask, struct_mask, weight_magnitude_mask  # noqa: E402

MASK_FUNCTIONS = {
    "random": random_mask,
    "struct": struct_mask,
    "weight_magnitude": weight_magnitude_mask,
    "gradient": gradient_mask,
    "snip": snip_mask,
}
