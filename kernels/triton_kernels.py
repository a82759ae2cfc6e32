"""Triton kernels for SHiRA on CUDA: scatter merge/restore, SDDMM, CSR sparse delta matmul.

Each has a plain-PyTorch twin (kernels/merge.py, kernels/sparse_delta.py) that the CPU
path uses and the tests compare against; on the CPU these kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how CI tests them.

    scatter_merge   W[flat] <- orig + s*v, orig <- W[flat]     one program per BLOCK nnz
    scatter_restore W[flat] <- orig
    sddmm           g[k] = Σ_t gy[t, row_k] · x[t, col_k]      one program per BLOCK_N entries,
                                                               loop over T in BLOCK_T tiles
    csr_spmm        y[t, r] += s · Σ_{j in row r} v_j x[t, col_j]
                                                               one program per (BLOCK_R rows,
                                                               BLOCK_T tokens), entry j of all
                                                               its rows at once

Memory access: the sparse kernels gather whole feature rows of a *feature-major* copy of
their dense inputs (``x.t().contiguous()``: (features, T), tokens contiguous), so each
gathered entry reads BLOCK_T consecutive elements (coalesced) instead of BLOCK_T elements a
row apart. The wrappers make those copies (activation-sized, never weight-sized); the
kernels take any strides, so a caller that already holds feature-major tensors passes them
as they are. Sums are in fp32 whatever the input dtype (bf16/fp16/fp32).
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
def _sddmm_kernel(a_ptr, b_ptr, rows_ptr, cols_ptr, out_ptr, T, nnz, sa_f, sa_t, sb_f, sb_t,
                  BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    # a: (n_rows features, T) and b: (n_cols features, T) at strides (s*_f, s*_t)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < nnz
    a_rows = a_ptr + tl.load(rows_ptr + offs_n, mask=mn, other=0).to(tl.int64)[:, None] * sa_f
    b_rows = b_ptr + tl.load(cols_ptr + offs_n, mask=mn, other=0).to(tl.int64)[:, None] * sb_f
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        m2 = mn[:, None] & (offs_t < T)[None, :]
        a = tl.load(a_rows + offs_t[None, :] * sa_t, mask=m2, other=0.0).to(tl.float32)
        b = tl.load(b_rows + offs_t[None, :] * sb_t, mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + offs_n, acc, mask=mn)


@triton.jit
def _csr_spmm_kernel(x_ptr, crow_ptr, col_ptr, v_ptr, y_ptr, n_rows, T, sx_f, sx_t, sy_t, sy_f, scale,
                     BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    # x: (n_cols features, T) at strides (sx_f, sx_t); y: (T, n_rows) at strides (sy_t, sy_f)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = offs_r < n_rows
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = offs_t < T
    start = tl.load(crow_ptr + offs_r, mask=mr, other=0)
    length = tl.load(crow_ptr + offs_r + 1, mask=mr, other=0) - start
    x_toks = x_ptr + offs_t[None, :] * sx_t
    acc = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    for j in range(0, tl.max(length, axis=0)):  # the j-th entry of every row of the block
        mj = j < length
        c = tl.load(col_ptr + start + j, mask=mj, other=0).to(tl.int64)
        v = tl.load(v_ptr + start + j, mask=mj, other=0.0).to(tl.float32)
        xv = tl.load(x_toks + c[:, None] * sx_f, mask=mj[:, None] & mt[None, :], other=0.0)
        acc += v[:, None] * xv.to(tl.float32)
    y_ptrs = y_ptr + offs_t[None, :].to(tl.int64) * sy_t + offs_r[:, None] * sy_f
    m2 = mr[:, None] & mt[None, :]
    y_old = tl.load(y_ptrs, mask=m2, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=m2)


def scatter_merge(weight: Tensor, flat: Tensor, values: Tensor, scale: float, block: int = 1024) -> Tensor:
    """weight: (out, in) contiguous, flat: (nnz,) int64 positions -> saved originals (nnz,)."""
    originals = torch.empty(flat.numel(), dtype=weight.dtype, device=weight.device)
    grid = (triton.cdiv(flat.numel(), block),)
    _scatter_merge_kernel[grid](weight, flat, values, originals, float(scale), flat.numel(), BLOCK=block)
    return originals


def scatter_restore(weight: Tensor, flat: Tensor, originals: Tensor, block: int = 1024) -> None:
    grid = (triton.cdiv(flat.numel(), block),)
    _scatter_restore_kernel[grid](weight, flat, originals, flat.numel(), BLOCK=block)


def feature_major(t: Tensor) -> Tensor:
    """(T, F) -> (F, T) with tokens contiguous: the layout the sparse kernels gather from."""
    return t.t().contiguous()


def sddmm(grad_y: Tensor, x: Tensor, rows: Tensor, cols: Tensor, block_n: int = 32, block_t: int = 128) -> Tensor:
    """grad_y: (T, out), x: (T, in); rows/cols: (nnz,) -> (nnz,) fp32, ``(grad_y^T @ x)[rows, cols]``."""
    a, b = feature_major(grad_y), feature_major(x)
    out = torch.empty(rows.numel(), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows.numel(), block_n),)
    _sddmm_kernel[grid](a, b, rows, cols, out, x.shape[0], rows.numel(), a.stride(0), a.stride(1),
                        b.stride(0), b.stride(1), BLOCK_N=block_n, BLOCK_T=block_t)
    return out


def csr_spmm_add_(y: Tensor, x: Tensor, crow: Tensor, col: Tensor, values_rowmajor: Tensor, scale: float,
                  block_r: int = 16, block_t: int = 64) -> Tensor:
    """y: (T, out) += scale * x (T, in) @ S^T with S in CSR (crow (out+1,), col/values (nnz,)).

    y may have any strides (it is written in place); values in any float dtype.
    """
    xf = feature_major(x)
    n_rows, n_tok = crow.numel() - 1, x.shape[0]
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_tok, block_t))
    _csr_spmm_kernel[grid](xf, crow, col, values_rowmajor, y, n_rows, n_tok, xf.stride(0), xf.stride(1),
                           y.stride(0), y.stride(1), float(scale), BLOCK_R=block_r, BLOCK_T=block_t)
    return y
