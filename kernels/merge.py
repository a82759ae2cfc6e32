"""Scatter-add merge and exact restore of SHiRA deltas into a dense weight.

merge:   W[idx] = W0[idx] + scale * values      (returns W0[idx] for the restore)
rewrite: W[idx] = W0[idx] + scale * values'     (W0[idx] saved by merge: a single scatter)
restore: W[idx] = W0[idx]                        (bit-exact: no subtraction)

All functions work in place on ``weight: (out, in)`` and touch only the nnz entries; on
CUDA they dispatch to the Triton kernels in triton_kernels.py, on the CPU (fp32/fp64,
int32 indices) to the native loop in cpu_sddmm.cpp, else to index_select/index_copy_.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_sddmm
from .dispatch import use_triton
from .layout import flat_index


def _rows_cols(indices: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    return indices[0].to(device=device, dtype=torch.long), indices[1].to(device=device, dtype=torch.long)


@torch.no_grad()
def scatter_merge_(
    weight: Tensor, indices: Tensor, values: Tensor, scale: float, check_finite: bool = False
) -> Tensor:
    """Write ``W0[idx] + scale*values`` at ``indices``; return the saved ``W0[idx]``.

    weight: (out, in); indices: (2, nnz) int; values: (nnz,). With ``check_finite`` a
    non-finite result raises ``ValueError`` before anything is written.
    """
    values = values.detach().to(weight.device)
    if use_triton(weight) and weight.is_contiguous() and not check_finite:
        from . import triton_kernels

        return triton_kernels.scatter_merge(weight, flat_index(indices.to(weight.device), weight.shape[1]),
                                            values, scale)
    if not check_finite and _native(weight, indices):
        originals = torch.empty(indices.shape[1], dtype=weight.dtype)
        cpu_sddmm.scatter_(weight, indices, "merge", originals, values, scale)
        return originals
    originals = _gather(weight, indices)
    merged = _merged(originals, values, scale)
    if check_finite and not torch.isfinite(merged).all():
        raise ValueError("safe_merge: merging gives non-finite weights (NaN or inf); the weight is left untouched")
    _scatter(weight, indices, merged)
    return originals


@torch.no_grad()
def scatter_rewrite_(weight: Tensor, indices: Tensor, originals: Tensor, values: Tensor, scale: float) -> None:
    """Write ``originals + scale*values`` at ``indices``: a merge whose ``originals`` (from
    :func:`scatter_merge_`) are still what lies under the write, so nothing is gathered.

    Gives the same bits as restoring and merging again, with one scatter instead of three passes.
    """
    if _native(weight, indices) and originals.dtype == weight.dtype:
        cpu_sddmm.scatter_(weight, indices, "rewrite", originals.contiguous(), values, scale)
        return
    _scatter(weight, indices, _merged(originals, values.detach().to(weight.device), scale))


def _native(weight: Tensor, indices: Tensor) -> bool:
    """The native CPU scatter applies (and Triton is not forced by SHIRA_DIST_KERNEL_BACKEND)."""
    return not use_triton(weight) and cpu_sddmm.scatter_usable(weight, indices)


def _merged(originals: Tensor, values: Tensor, scale: float) -> Tensor:
    acc = torch.promote_types(originals.dtype, torch.float32)  # add in >= fp32, round once
    return (originals.to(acc) + scale * values.to(acc)).to(originals.dtype)


@torch.no_grad()
def scatter_restore_(weight: Tensor, indices: Tensor, originals: Tensor) -> None:
    """Put back the entries saved by :func:`scatter_merge_`, bit-exactly."""
    if use_triton(weight) and weight.is_contiguous():
        from . import triton_kernels

        triton_kernels.scatter_restore(weight, flat_index(indices.to(weight.device), weight.shape[1]), originals)
        return
    if _native(weight, indices) and originals.dtype == weight.dtype:
        cpu_sddmm.scatter_(weight, indices, "restore", originals.contiguous())
        return
    _scatter(weight, indices, originals.to(weight.device))


def _gather(weight: Tensor, indices: Tensor) -> Tensor:
    if weight.is_contiguous():  # 1-D index_select: faster than 2-D advanced indexing
        return weight.view(-1).index_select(0, flat_index(indices.to(weight.device), weight.shape[1]))
    rows, cols = _rows_cols(indices, weight.device)
    return weight[rows, cols].clone()


def _scatter(weight: Tensor, indices: Tensor, src: Tensor) -> None:
    if weight.is_contiguous():
        weight.view(-1).index_copy_(0, flat_index(indices.to(weight.device), weight.shape[1]), src)
        return
    rows, cols = _rows_cols(indices, weight.device)
    weight.index_put_((rows, cols), src)


def scatter_merge_reference(weight: Tensor, indices: Tensor, values: Tensor, scale: float) -> Tensor:
    """Dense reference: ``W + scale * dense(S)`` as a new tensor (for tests)."""
    delta = torch.zeros_like(weight, dtype=torch.float64)
    delta[indices[0].long(), indices[1].long()] = values.double() * scale
    return (weight.double() + delta).to(weight.dtype)
