"""Triton kernels for SHiRA on CUDA: scatter merge/restore, SDDMM, CSR sparse delta matmul.

Each has a plain-PyTorch twin (kernels/merge.py, kernels/sparse_delta.py) that the CPU
path uses and the tests compare against; on the CPU these kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how CI tests them.

    scatter_merge   W[flat] <- orig + s*v, orig <- W[flat]     one program per BLOCK nnz
    scatter_restore W[flat] <- orig
    sddmm           g[k] = Σ_t gy[t, row_k] · x[t, col_k]      one program per BLOCK_N nnz,
                                                               loop over T in BLOCK_T tiles
    csr_spmm        y[t, r] += s · Σ_{j in row r} v_j x[t, col_j]   one program per (row, T tile)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _scatter_merge_kernel(w_ptr, flat_ptr, v_ptr, orig_ptr, scale, nnz, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < nnz
    pos = tl.load(flat_ptr + offs, mask=m, other=0)
    orig = tl.load(w_ptr + pos, mask=m, other=0.0)
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(orig_ptr + offs, orig, mask=m)
    tl.store(w_ptr + pos, (orig.to(tl.float32) + scale * v).to(orig.dtype), mask=m)


@triton.jit
def _scatter_restore_kernel(w_ptr, flat_ptr, orig_ptr, nnz, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < nnz
    pos = tl.load(flat_ptr + offs, mask=m, other=0)
    tl.store(w_ptr + pos, tl.load(orig_ptr + offs, mask=m), mask=m)


@triton.jit
def _sddmm_kernel(gy_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr, T, nnz, stride_gy, stride_x,
                  BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < nnz
    rows = tl.load(rows_ptr + offs_n, mask=mn, other=0)
    cols = tl.load(cols_ptr + offs_n, mask=mn, other=0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mt = offs_t < T
        m2 = mt[:, None] & mn[None, :]
        g = tl.load(gy_ptr + offs_t[:, None] * stride_gy + rows[None, :], mask=m2, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + offs_t[:, None] * stride_x + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(g * xv, axis=0)
    tl.store(out_ptr + offs_n, acc, mask=mn)


@triton.jit
def _csr_spmm_kernel(x_ptr, crow_ptr, col_ptr, v_ptr, y_ptr, T, stride_x, stride_y, scale,
                     BLOCK_T: tl.constexpr):
    r = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = offs_t < T
    start = tl.load(crow_ptr + r)
    end = tl.load(crow_ptr + r + 1)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in range(start, end):
        c = tl.load(col_ptr + j)
        v = tl.load(v_ptr + j).to(tl.float32)
        acc += v * tl.load(x_ptr + offs_t * stride_x + c, mask=mt, other=0.0).to(tl.float32)
    y_old = tl.load(y_ptr + offs_t * stride_y + r, mask=mt, other=0.0)
    tl.store(y_ptr + offs_t * stride_y + r, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=mt)


def scatter_merge(weight: Tensor, flat: Tensor, values: Tensor, scale: float, block: int = 1024) -> Tensor:
    """weight: (out, in) contiguous, flat: (nnz,) int64 positions -> saved originals (nnz,)."""
    originals = torch.empty(flat.numel(), dtype=weight.dtype, device=weight.device)
    grid = (triton.cdiv(flat.numel(), block),)
    _scatter_merge_kernel[grid](weight, flat, values, originals, float(scale), flat.numel(), BLOCK=block)
    return originals


def scatter_restore(weight: Tensor, flat: Tensor, originals: Tensor, block: int = 1024) -> None:
    grid = (triton.cdiv(flat.numel(), block),)
    _scatter_restore_kernel[grid](weight, flat, originals, flat.numel(), BLOCK=block)


def sddmm(grad_y: Tensor, x: Tensor, rows: Tensor, cols: Tensor, block_n: int = 64, block_t: int = 32) -> Tensor:
    """grad_y: (T, out), x: (T, in) row-contiguous; rows/cols: (nnz,) -> (nnz,) fp32."""
    grad_y, x = grad_y.contiguous(), x.contiguous()
    out = torch.empty(rows.numel(), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows.numel(), block_n),)
    _sddmm_kernel[grid](grad_y, x, rows, cols, out, x.shape[0], rows.numel(), grad_y.stride(0), x.stride(0),
                        BLOCK_N=block_n, BLOCK_T=block_t)
    return out


def csr_spmm_add_(y: Tensor, x: Tensor, crow: Tensor, col: Tensor, values_rowmajor: Tensor, scale: float,
                  block_t: int = 64) -> Tensor:
    """y: (T, out) += scale * x (T, in) @ S^T with S in CSR (crow (out+1,), col/values (nnz,))."""
    x = x.contiguous()
    grid = (crow.numel() - 1, triton.cdiv(x.shape[0], block_t))
    _csr_spmm_kernel[grid](x, crow, col, values_rowmajor, y, x.shape[0], x.stride(0), y.stride(0), float(scale),
                           BLOCK_T=block_t)
    return y
