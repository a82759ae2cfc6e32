"""SHiRA's random mask: r*(in+out) entries uniformly without replacement, in O(nnz)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..kernels.layout import index_dtype
from .common import (exclude_positions, generator, layer_shape, mask_device, sample_distinct, sample_outside,
                     shira_budget, sparse_mask, weight_of)


def _random_flat(out_f: int, in_f: int, r: int, random_seed: int | None, device: torch.device,
                 exclude: Optional[Tensor] = None) -> Tensor:
    """The random mask's entries as sorted flat positions (nnz,) int64 (row-major order),
    none of them in ``exclude`` (sorted flat positions) when given."""
    k = shira_budget(out_f, in_f, r)
    gen = generator(device, random_seed)
    if exclude is None:
        return sample_distinct(out_f * in_f, k, gen, device)
    return sample_outside(exclude, out_f * in_f, k, gen).sort().values


def random_csr(shape: tuple[int, int], r: int, random_seed: int | None, device: torch.device,
               exclude: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """:func:`random_mask`'s pattern (the same entries for the same seed and device) straight in
    CSR form: ``crow`` (out+1,) and ``col`` (nnz,), int32 (int64 past 2^31), row-major.

    What ``get_peft_model`` uses for ``mask_type="random"``: no sparse mask tensor, no (2, nnz)
    indices and no re-validation of entries that are distinct and in range by construction.
    """
    out_f, in_f = shape
    flat = _random_flat(out_f, in_f, r, random_seed, device, exclude_positions(exclude, shape, r, device))
    dt = index_dtype(flat.numel(), shape)  # int32 unless past 2^31
    starts = torch.arange(out_f + 1, dtype=torch.int64, device=device) * in_f
    return torch.searchsorted(flat, starts).to(dt), flat.remainder_(in_f).to(dt)


def random_mask(base_layer: nn.Module, r: int, random_seed: int | None = None, **kwargs) -> Tensor:
    """Uniform random SHiRA mask: r*(in+out) distinct positions of ``base_layer.weight``.

    Returns a coalesced sparse COO (out, in) tensor of ones on the weight's device (on
    the CPU for a meta-device weight, which has no storage to hold a pattern). Needs only the
    weight's shape, so a ZeRO-3 partitioned weight works as it is.
    ``random_seed=None`` draws a fresh pattern every call; ``exclude=`` (flat positions) keeps
    other adapters' entries out; other kwargs are ignored.
    """
    weight = weight_of(base_layer)
    shape, device = layer_shape(base_layer), mask_device(weight)
    exclude = exclude_positions(kwargs.get("exclude"), shape, r, device)
    return sparse_mask(_random_flat(*shape, r, random_seed, device, exclude), shape, weight.dtype)
