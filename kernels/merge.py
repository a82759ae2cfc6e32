"""Scatter-add merge and exact restore of SHiRA deltas into a dense weight.

merge:   W[idx] = W0[idx] + scale * values      (returns W0[idx] for the restore)
rewrite: W[idx] = W0[idx] + scale * values'     (W0[idx] saved by merge: a single scatter)
restore: W[idx] = W0[idx]                        (bit-exact: no subtraction)

All functions work in place on ``weight: (out, in)`` and touch only the nnz entries of the
pattern ``layout`` (a :class:`~.layout.CsrLayout`); ``values`` and the saved originals are in
the pattern's stored order. On CUDA they dispatch to the Triton kernels in triton_kernels.py,
on the CPU (fp32/fp64, int32 pattern) to the native loop in cpu_sddmm.cpp, else to
index_select/index_copy_.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_sddmm, ops
from .dispatch import use_triton
from .layout import CsrLayout, flat_index


def _check(weight: Tensor, layout: CsrLayout) -> None:
    if tuple(weight.shape) != tuple(layout.shape):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the pattern's shape {tuple(layout.shape)}")


@torch.no_grad()
def scatter_merge_(
    weight: Tensor, layout: CsrLayout, values: Tensor, scale: float, check_finite: bool = False
) -> Tensor:
    """Write ``W0[idx] + scale*values`` at the pattern; return the saved ``W0[idx]`` (nnz,).

    weight: (out, in); values: (nnz,). With ``check_finite`` a non-finite result raises
    ``ValueError`` before anything is written.
    """
    _check(weight, layout)
    values = values.detach().to(weight.device)
    if use_triton(weight) and weight.is_contiguous() and not check_finite:
        originals = ops.triton_scatter_merge_(weight, flat_index(layout).to(weight.device), layout.rowmajor(values),
                                              scale)
        return layout.from_rowmajor(originals)
    if not check_finite and _native(weight, layout):
        originals = ops.native_scatter_merge_(weight, layout.crow, layout.col, layout.rowmajor(values), scale)
        return layout.from_rowmajor(originals)
    originals = _gather(weight, layout)
    merged = _merged(originals, layout.rowmajor(values), scale)
    if check_finite and not torch.isfinite(merged).all():
        raise ValueError("safe_merge: merging gives non-finite weights (NaN or inf); the weight is left untouched")
    _scatter(weight, layout, merged)
    return layout.from_rowmajor(originals)


@torch.no_grad()
def scatter_rewrite_(weight: Tensor, layout: CsrLayout, originals: Tensor, values: Tensor, scale: float) -> None:
    """Write ``originals + scale*values`` at the pattern: a merge whose ``originals`` (from
    :func:`scatter_merge_`) are still what lies under the write, so nothing is gathered.

    Gives the same bits as restoring and merging again, with one scatter instead of three passes.
    """
    _check(weight, layout)
    values = values.detach().to(weight.device)
    if _native(weight, layout) and originals.dtype == weight.dtype:
        ops.native_scatter_write_(weight, layout.crow, layout.col, layout.rowmajor(originals).contiguous(),
                                  layout.rowmajor(values), scale)
        return
    _scatter(weight, layout, _merged(layout.rowmajor(originals), layout.rowmajor(values), scale))


@torch.no_grad()
def scatter_restore_(weight: Tensor, layout: CsrLayout, originals: Tensor) -> None:
    """Put back the entries saved by :func:`scatter_merge_`, bit-exactly."""
    _check(weight, layout)
    originals = layout.rowmajor(originals.to(weight.device))
    if use_triton(weight) and weight.is_contiguous():
        ops.triton_scatter_restore_(weight, flat_index(layout).to(weight.device), originals)
        return
    if _native(weight, layout) and originals.dtype == weight.dtype:
        ops.native_scatter_write_(weight, layout.crow, layout.col, originals.contiguous(), None, 1.0)
        return
    _scatter(weight, layout, originals)


def _native(weight: Tensor, layout: CsrLayout) -> bool:
    """The native CPU scatter applies (and Triton is not forced by SHIRA_DIST_KERNEL_BACKEND)."""
    return not use_triton(weight) and cpu_sddmm.scatter_usable(weight, layout.col)


def _merged(originals: Tensor, values: Tensor, scale: float) -> Tensor:
    acc = torch.promote_types(originals.dtype, torch.float32)  # add in >= fp32, round once
    return (originals.to(acc) + scale * values.to(acc)).to(originals.dtype)


def _gather(weight: Tensor, layout: CsrLayout) -> Tensor:
    """W at the pattern, row-major order (nnz,)."""
    if weight.is_contiguous():  # 1-D index_select: faster than 2-D advanced indexing
        return weight.view(-1).index_select(0, flat_index(layout).to(weight.device))
    return weight[layout.rows().long().to(weight.device), layout.col.long().to(weight.device)].clone()


def _scatter(weight: Tensor, layout: CsrLayout, src_rowmajor: Tensor) -> None:
    if weight.is_contiguous():
        weight.view(-1).index_copy_(0, flat_index(layout).to(weight.device), src_rowmajor.to(weight.dtype))
        return
    weight.index_put_((layout.rows().long().to(weight.device), layout.col.long().to(weight.device)),
                      src_rowmajor.to(weight.dtype))


def scatter_merge_reference(weight: Tensor, indices: Tensor, values: Tensor, scale: float) -> Tensor:
    """Dense reference: ``W + scale * dense(S)`` as a new tensor (for tests); indices (2, nnz)."""
    delta = torch.zeros_like(weight, dtype=torch.float64)
    delta[indices[0].long(), indices[1].long()] = values.double() * scale
    return (weight.double() + delta).to(weight.dtype)
