"""Sparse delta matmul: ``y = x @ (scale * S)^T`` with gradients that never go dense.

    x: (..., in)            S: (out, in), nnz entries      y: (..., out)

    forward   y      = x @ (s*S)^T                    CSR(S)   @ x^T   (sparse x dense)
    backward  grad_x = grad_y @ (s*S)                 CSR(S^T) @ grad_y^T
              grad_v = s * (grad_y^T @ x)[rows, cols]  SDDMM: only the nnz dot products

No (out, in) tensor (weight copy or weight gradient) is ever allocated. The dense
reference :func:`delta_matmul_reference` builds S densely and lets autograd do the
rest; tests compare the two.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .layout import CsrLayout

# torch warns once that CSR is "beta" and that invariant checks are off; both are known
# and deliberate here (layouts are built by build_csr_layout, which guarantees them).
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

# MKL's CPU sparse kernels take float32/float64 only; half inputs are computed in fp32.
_CPU_SPARSE_DTYPES = (torch.float32, torch.float64)


def _compute_dtype(t: Tensor) -> torch.dtype:
    if t.device.type == "cpu" and t.dtype not in _CPU_SPARSE_DTYPES:
        return torch.float32
    return t.dtype


def _csr(crow: Tensor, col: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=False)


class _SparseDeltaMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: Tensor, values: Tensor, layout: CsrLayout, scale: float) -> Tensor:
        out_f, in_f = layout.shape
        cdt = _compute_dtype(x2d)
        xc = x2d.to(cdt)
        v = values.to(cdt) * scale
        s = _csr(layout.crow, layout.col, v[layout.order], (out_f, in_f))
        y = torch.sparse.mm(s, xc.t()).t()  # (T, out)
        ctx.save_for_backward(x2d, values)
        ctx.layout, ctx.scale = layout, scale
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x2d, values = ctx.saved_tensors
        layout: CsrLayout = ctx.layout
        out_f, in_f = layout.shape
        cdt = _compute_dtype(grad_y)
        gy = grad_y.to(cdt)
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            v = values.to(cdt) * ctx.scale
            s_t = _csr(layout.crow_t, layout.col_t, v[layout.order_t], (in_f, out_f))
            grad_x = torch.sparse.mm(s_t, gy.t()).t().to(x2d.dtype)  # (T, in)
        if ctx.needs_input_grad[1]:
            pattern = _csr(layout.crow, layout.col, torch.zeros_like(layout.col, dtype=cdt), (out_f, in_f))
            sampled = torch.sparse.sampled_addmm(pattern, gy.t().contiguous(), x2d.to(cdt), beta=0.0)
            grad_v = torch.empty(values.shape[0], dtype=cdt, device=values.device)
            grad_v[layout.order] = sampled.values() * ctx.scale
            grad_v = grad_v.to(values.dtype)
        return grad_x, grad_v, None, None


def sparse_delta_matmul(x: Tensor, values: Tensor, layout: CsrLayout, scale: float) -> Tensor:
    """x: (..., in), values: (nnz,) in stored order -> (..., out) in x's dtype."""
    out_f, in_f = layout.shape
    lead = x.shape[:-1]
    if x.numel() == 0:
        return x.new_zeros(*lead, out_f)
    y = _SparseDeltaMatmul.apply(x.reshape(-1, in_f), values, layout, float(scale))
    return y.reshape(*lead, out_f)


def delta_matmul_reference(x: Tensor, indices: Tensor, values: Tensor, scale: float, shape: tuple[int, int]) -> Tensor:
    """Dense reference: ``x @ (scale * S)^T`` with S built densely (differentiable in values)."""
    dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
    dense = dense.index_put((indices[0].long(), indices[1].long()), values * scale)
    return x @ dense.t().to(x.dtype)
