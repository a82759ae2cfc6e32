"""SHiRA's random mask: r*(in+out) entries uniformly without replacement, in O(nnz)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.layout import index_dtype
from .common import generator, layer_shape, mask_device, sample_distinct, shira_budget, sparse_mask, weight_of


def _random_flat(out_f: int, in_f: int, r: int, random_seed: int | None, device: torch.device) -> Tensor:
    """The random mask's entries as sorted flat positions (nnz,) int64 (row-major order)."""
    k = shira_budget(out_f, in_f, r)
    return sample_distinct(out_f * in_f, k, generator(device, random_seed), device)


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
    weight = weight_of(base_layer)
    shape = layer_shape(base_layer)
    return sparse_mask(_random_flat(*shape, r, random_seed, mask_device(weight)), shape, weight.dtype)
