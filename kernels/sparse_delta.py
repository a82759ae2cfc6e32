"""Sparse delta matmul: ``y = x @ (scale * S)^T`` with gradients that never go dense.

    x: (..., in)            S: (out, in), nnz entries      y: (..., out)

    forward   y      = x @ (s*S)^T                    CSR(S)   @ x^T   (sparse x dense)
    backward  grad_x = grad_y @ (s*S)                 CSR(S^T) @ grad_y^T
              grad_v = s * (grad_y^T @ x)[rows, cols]  SDDMM: only the nnz dot products

No (out, in) tensor (weight copy or weight gradient) is ever allocated. CPU: the native
kernels of cpu_sddmm.py (token-tiled, from S's CSR rows: both products and the SDDMM, no
CSR of S^T needed), else torch.sparse (MKL CSR products, CSR of S^T built at the
first backward, sampled_addmm); CUDA: the Triton kernels in triton_kernels.py. The dense
references :func:`delta_matmul_reference` (builds S densely and lets autograd do the rest)
and :func:`sddmm_reference` are what the tests compare to.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_sddmm, ops
from .dispatch import triton_sddmm, use_triton
from .layout import CsrLayout

# MKL's CPU sparse kernels take float32/float64 only; half inputs are computed in fp32 (the
# Triton kernels take half inputs themselves, also under the interpreter on the CPU).
_CPU_SPARSE_DTYPES = (torch.float32, torch.float64)


def _compute_dtype(t: Tensor) -> torch.dtype:
    if t.device.type == "cpu" and t.dtype not in _CPU_SPARSE_DTYPES and not use_triton(t):
        return torch.float32
    return t.dtype


def _spmm_t(x2d: Tensor, crow: Tensor, col: Tensor, vals_rowmajor: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """``x2d @ A^T`` for A (n_rows, n_cols) in CSR: (T, n_rows), in x2d's compute dtype."""
    if use_triton(x2d):
        y = torch.zeros(x2d.shape[0], n_rows, dtype=x2d.dtype, device=x2d.device)
        ops.triton_spmm_add_(y, x2d, crow, col, vals_rowmajor, 1.0)
        return y
    return ops.sparse_mm_t(x2d, crow, col, vals_rowmajor, n_rows, n_cols)


def _feature_major_view(t: Tensor) -> Tensor:
    """t: (T, F) -> the same (T, F) values, stored feature-major (tokens contiguous): the Triton
    kernels' feature_major() of it is then free, so callers that pass it twice copy once."""
    from . import triton_kernels

    return triton_kernels.feature_major(t).t()


def _native(t: Tensor, layout: CsrLayout) -> bool:
    """The native CPU kernels (cpu_sddmm.py) take this input and layout."""
    return not use_triton(t) and cpu_sddmm.usable(t, layout.col)


class _SparseDeltaMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: Tensor, values: Tensor, layout: CsrLayout, scale: float) -> Tensor:
        out_f, in_f = layout.shape
        cdt = _compute_dtype(x2d)
        xc = x2d.to(cdt)
        saved = x2d
        if _native(xc, layout):  # (T, out), row by row of S; the scale is applied in the kernel
            y = ops.native_spmm(xc, layout.crow, layout.col, layout.rowmajor(values.to(cdt)), in_f, False, scale)
        else:
            if use_triton(xc):  # the Triton kernels' token-contiguous copy, made once: the backward's
                xc = saved = _feature_major_view(xc)  # SDDMM reads the same one
            v = values.to(cdt) * scale
            y = _spmm_t(xc, layout.crow, layout.col, layout.rowmajor(v), out_f, in_f)
        ctx.save_for_backward(saved, values)
        ctx.layout, ctx.scale, ctx.x_dtype = layout, scale, x2d.dtype
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x2d, values = ctx.saved_tensors
        layout: CsrLayout = ctx.layout
        out_f, in_f = layout.shape
        cdt = _compute_dtype(grad_y)
        gy = grad_y.to(cdt)
        if use_triton(gy):  # one token-contiguous copy for both grad_x and the SDDMM
            gy = _feature_major_view(gy)
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            if _native(gy, layout):  # S's rows again, roles swapped: the CSR of S^T is never built
                grad_x = ops.native_spmm(gy, layout.crow, layout.col, layout.rowmajor(values.to(cdt)), in_f, True,
                                         ctx.scale).to(ctx.x_dtype)
            else:
                v = values.to(cdt) * ctx.scale
                lt = layout.transposed()
                grad_x = _spmm_t(gy, lt.crow, lt.col, lt.rowmajor(v), in_f, out_f).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_v = sddmm(gy, x2d.to(cdt), layout).mul_(ctx.scale).to(values.dtype)  # sddmm gives a fresh tensor
        return grad_x, grad_v, None, None


def sddmm(grad_y: Tensor, x: Tensor, layout: CsrLayout) -> Tensor:
    """Sampled ``grad_y^T @ x`` at the pattern: (nnz,) in stored order.

    grad_y: (T, out), x: (T, in), same float dtype (float32/float64 on the CPU). Whole
    rows/columns of the pattern (``layout.blocks``) come from dense sub-GEMMs.
    Reference: :func:`sddmm_reference`.
    """
    b = layout.blocks
    if b is None:
        return _sddmm_sparse(grad_y, x, layout)
    out = torch.empty(layout.nnz, dtype=x.dtype, device=x.device)
    if b.rows.numel():
        g_rows = grad_y[:, b.rows].t() @ x  # (R, in)
        out[b.row_pos] = g_rows[b.row_rank, b.row_col]
    if b.cols.numel():
        g_cols = grad_y.t() @ x[:, b.cols]  # (out, C)
        out[b.col_pos] = g_cols[b.col_row, b.col_rank]
    if b.rest is not None:
        out[b.rest_pos] = _sddmm_sparse(grad_y, x, b.rest)
    return out


def _sddmm_sparse(grad_y: Tensor, x: Tensor, layout: CsrLayout) -> Tensor:
    if use_triton(x):
        blocked = triton_sddmm() == "blocked"
        sampled = ops.triton_sddmm(grad_y, x, layout.crow, layout.rows(), layout.col, blocked).to(x.dtype)
    elif cpu_sddmm.usable(x, layout.col):
        sampled = ops.native_sddmm(grad_y, x, layout.crow, layout.col)
    else:
        sampled = ops.sparse_sampled_mm(grad_y, x, layout.crow, layout.col, layout.shape[1])
    return layout.from_rowmajor(sampled)


def sddmm_reference(grad_y: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    """Dense reference of :func:`sddmm`: ``(grad_y^T @ x)[rows, cols]`` (nnz,), stored order."""
    return (grad_y.t() @ x)[indices[0].long(), indices[1].long()]


class _FusedValuesGrad(torch.autograd.Function):
    """Identity on y; backward adds the values' gradient ``s * SDDMM(grad_y, x)`` only.

    Used when the base weight already holds W0 + s*S (fused mode): the base layer's own
    matmul produced y and carries grad_x, so only grad_values is left to compute.
    """

    @staticmethod
    def forward(ctx, y: Tensor, x2d: Tensor, values: Tensor, layout: CsrLayout, scale: float) -> Tensor:
        ctx.save_for_backward(x2d)
        ctx.layout, ctx.scale, ctx.values_dtype = layout, scale, values.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        (x2d,) = ctx.saved_tensors
        grad_v = None
        if ctx.needs_input_grad[2]:
            cdt = _compute_dtype(grad_y)
            gy = grad_y.reshape(-1, grad_y.shape[-1]).to(cdt)
            grad_v = sddmm(gy, x2d.to(cdt), ctx.layout).mul_(ctx.scale).to(ctx.values_dtype)
        return grad_y, None, grad_v, None, None


def fused_values_grad(y: Tensor, x: Tensor, values: Tensor, layout: CsrLayout, scale: float) -> Tensor:
    """y: (..., out) from a weight that already includes ``scale * S``; x: (..., in).

    Returns y unchanged, wired so that backward gives ``values`` its gradient (SDDMM).
    """
    if x.numel() == 0:
        return y
    return _FusedValuesGrad.apply(y, x.reshape(-1, x.shape[-1]), values, layout, float(scale))


def sparse_delta_matmul(x: Tensor, values: Tensor, layout: CsrLayout, scale: float) -> Tensor:
    """x: (..., in), values: (nnz,) in stored order -> (..., out) in x's dtype."""
    out_f, in_f = layout.shape
    lead = x.shape[:-1]
    if x.numel() == 0:
        return x.new_zeros(*lead, out_f)
    y = _SparseDeltaMatmul.apply(x.reshape(-1, in_f), values, layout, float(scale))
    return y.reshape(*lead, out_f)


def sparse_delta_add_(y: Tensor, x: Tensor, values: Tensor, layout: CsrLayout, scale: float) -> Tensor:
    """``y += x @ (scale * S)^T`` in place, for inference: y (..., out), x (..., in) -> y.

    The CPU kernel (and Triton on CUDA) adds the delta straight into y: no (..., out) delta
    tensor and no separate add. Refuses to run where autograd would have to record it (use
    ``y + sparse_delta_matmul(...)`` when training).
    """
    if torch.is_grad_enabled() and (y.requires_grad or x.requires_grad or values.requires_grad):
        raise RuntimeError("sparse_delta_add_ adds in place without autograd; with gradients enabled use "
                           "y + sparse_delta_matmul(x, values, layout, scale)")
    out_f, in_f = layout.shape
    if y.shape[-1] != out_f or x.shape[-1] != in_f or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"sparse_delta_add_: y {tuple(y.shape)} and x {tuple(x.shape)} do not fit a pattern of "
                         f"shape {layout.shape}")
    if x.numel() == 0:
        return y
    return _delta_add_(y, x, values, layout, scale)


def _delta_add_(y: Tensor, x: Tensor, values: Tensor, layout: CsrLayout, scale: float) -> Tensor:
    out_f, in_f = layout.shape
    x2d = x.reshape(-1, in_f)
    direct = y.is_contiguous() and y.dtype == x.dtype == _compute_dtype(x)
    if direct and _native(x2d, layout):
        ops.native_spmm_add_(y.view(-1, out_f), x2d, layout.crow, layout.col, layout.rowmajor(values.to(x.dtype)),
                             in_f, scale)
    elif direct and use_triton(x2d):
        ops.triton_spmm_add_(y.view(-1, out_f), x2d, layout.crow, layout.col, layout.rowmajor(values.to(x.dtype)),
                             scale)
    else:
        y.add_(sparse_delta_matmul(x, values, layout, scale).to(y.dtype))
    return y


def delta_matmul_reference(x: Tensor, indices: Tensor, values: Tensor, scale: float, shape: tuple[int, int]) -> Tensor:
    """Dense reference: ``x @ (scale * S)^T`` with S built densely (differentiable in values)."""
    dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
    dense = dense.index_put((indices[0].long(), indices[1].long()), values * scale)
    return x @ dense.t().to(x.dtype)
