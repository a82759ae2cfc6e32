"""Triton kernels for SHiRA on CUDA: scatter merge/restore, SDDMM, CSR sparse delta matmul.

Each has a plain-PyTorch twin (kernels/merge.py, kernels/sparse_delta.py) that the CPU
path uses and the tests compare against; on the CPU these kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how CI tests them.

    scatter_merge   W[flat] <- orig + s*v, orig <- W[flat]     one program per BLOCK nnz
    scatter_restore W[flat] <- orig
    sddmm           g[k] = Σ_t gy[t, row_k] · x[t, col_k]      one program per BLOCK_N entries,
                                                               loop over T in BLOCK_T tiles
    sddmm_blocked   the same, (BM, BN) tiles of grad_y^T @ x on tensor cores (tl.dot), the
                    entries picked out of each tile in registers (tl.gather)
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

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import, as here


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
def _rows_dot(a_rows, b_rows, offs_t, mask, sa_t, sb_t):
    # Σ_t a[row, t] · b[row, t] over one BLOCK_T tile, in fp32: (BLOCK_N,)
    a = tl.load(a_rows + offs_t[None, :] * sa_t, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_rows + offs_t[None, :] * sb_t, mask=mask, other=0.0).to(tl.float32)
    return tl.sum(a * b, axis=1)


@triton.jit
def _sddmm_kernel(a_ptr, b_ptr, rows_ptr, cols_ptr, out_ptr, T, nnz, sa_f, sa_t, sb_f, sb_t,
                  BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    # a: (n_rows features, T) and b: (n_cols features, T) at strides (s*_f, s*_t)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < nnz
    a_rows = a_ptr + tl.load(rows_ptr + offs_n, mask=mn, other=0).to(tl.int64)[:, None] * sa_f
    b_rows = b_ptr + tl.load(cols_ptr + offs_n, mask=mn, other=0).to(tl.int64)[:, None] * sb_f
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_full = (T // BLOCK_T) * BLOCK_T
    for t0 in range(0, t_full, BLOCK_T):  # whole tiles: masked by entry only, so whole vectors load
        acc += _rows_dot(a_rows, b_rows, t0 + tl.arange(0, BLOCK_T), mn[:, None], sa_t, sb_t)
    if t_full < T:  # the last, partial tile
        offs_t = t_full + tl.arange(0, BLOCK_T)
        acc += _rows_dot(a_rows, b_rows, offs_t, mn[:, None] & (offs_t < T)[None, :], sa_t, sb_t)
    tl.store(out_ptr + offs_n, acc, mask=mn)


@triton.jit
def _sddmm_blocked_kernel(gy_ptr, x_ptr, crow_ptr, rows_ptr, cols_ptr, out_ptr, n_rows, n_cols, T,
                          s_gy_t, s_gy_f, s_x_t, s_x_f, cols_per_group,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, E: tl.constexpr,
                          IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # Rows [r0, r0+BM) of S, columns [c_lo, c_hi): each (BM, BN) tile of grad_y^T @ x is
    # computed on chip with tl.dot (tensor cores), then the row block's entries that fall in
    # it are picked out of the accumulator; the dense tile never leaves the program.
    r0 = tl.program_id(0) * BM
    rm = r0 + tl.arange(0, BM)
    k_start = tl.load(crow_ptr + r0)
    k_end = tl.load(crow_ptr + tl.minimum(r0 + BM, n_rows))
    c_lo = tl.program_id(1) * cols_per_group
    c_hi = tl.minimum(c_lo + cols_per_group, n_cols)
    gy_rows = gy_ptr + rm[:, None].to(tl.int64) * s_gy_f  # 64-bit offsets: T x features can pass 2^31
    for c0 in range(c_lo, c_hi, BN):
        rn = c0 + tl.arange(0, BN)
        x_cols = x_ptr + rn[None, :].to(tl.int64) * s_x_f
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for t0 in range(0, T, BK):
            rk = t0 + tl.arange(0, BK)
            mk = rk < T
            a = tl.load(gy_rows + rk[None, :].to(tl.int64) * s_gy_t,
                        mask=(rm < n_rows)[:, None] & mk[None, :], other=0.0)  # (BM, BK) of grad_y^T
            b = tl.load(x_cols + rk[:, None].to(tl.int64) * s_x_t,
                        mask=mk[:, None] & (rn < n_cols)[None, :], other=0.0)  # (BK, BN) of x
            if UPCAST:  # Triton's interpreter multiplies bf16 tiles wrongly (its tl.dot has no bf16)
                a, b = a.to(tl.float32), b.to(tl.float32)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        flat = tl.reshape(acc, (BM * BN,))
        for e0 in range(k_start, k_end, E):
            ks = e0 + tl.arange(0, E)
            mk = ks < k_end
            c = tl.load(cols_ptr + ks, mask=mk, other=-1).to(tl.int32)
            inside = mk & (c >= c0) & (c < c0 + BN)
            r = tl.load(rows_ptr + ks, mask=inside, other=0).to(tl.int32)
            local = tl.where(inside, (r - r0) * BN + (c - c0), 0)
            tl.store(out_ptr + ks, tl.gather(flat, local, 0), mask=inside)


@triton.jit
def _csr_rows_product(x_toks, col_ptr, v_ptr, start, length, sx_f, mt, BLOCK_R: tl.constexpr,
                      BLOCK_T: tl.constexpr, WHOLE_TILE: tl.constexpr):
    # Σ_j v_j x[col_j, tokens] for every row of the block: (BLOCK_R, BLOCK_T) in fp32
    acc = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    for j in range(0, tl.max(length, axis=0)):  # the j-th entry of every row of the block
        mj = j < length
        c = tl.load(col_ptr + start + j, mask=mj, other=0).to(tl.int64)
        v = tl.load(v_ptr + start + j, mask=mj, other=0.0).to(tl.float32)
        if WHOLE_TILE:  # masked by row only: whole vectors load
            xv = tl.load(x_toks + c[:, None] * sx_f, mask=mj[:, None], other=0.0)
        else:
            xv = tl.load(x_toks + c[:, None] * sx_f, mask=mj[:, None] & mt[None, :], other=0.0)
        acc += v[:, None] * xv.to(tl.float32)
    return acc


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
    if (tl.program_id(1) + 1) * BLOCK_T <= T:
        acc = _csr_rows_product(x_toks, col_ptr, v_ptr, start, length, sx_f, mt, BLOCK_R, BLOCK_T, True)
    else:
        acc = _csr_rows_product(x_toks, col_ptr, v_ptr, start, length, sx_f, mt, BLOCK_R, BLOCK_T, False)
    y_ptrs = y_ptr + offs_t[None, :].to(tl.int64) * sy_t + offs_r[:, None].to(tl.int64) * sy_f
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
    """(T, F) -> (F, T) with tokens contiguous: the layout the sparse kernels gather from.

    Each feature's row starts at a multiple of 16 elements (the row stride is T rounded up to
    16, the tail unused), so Triton specializes the stride as divisible by 16 and the gathered
    rows load in 128-bit vectors whatever T is (an odd T would otherwise load element by
    element). A tensor already in this layout is returned as it is.
    """
    ft = t.t()
    if ft.stride(1) == 1 and ft.stride(0) % 16 == 0 and ft.stride(0) >= ft.shape[1]:
        return ft
    n_feat, n_tok = ft.shape
    padded = torch.empty(n_feat, -(-n_tok // 16) * 16, dtype=t.dtype, device=t.device)
    return padded[:, :n_tok].copy_(ft)


def sddmm(grad_y: Tensor, x: Tensor, rows: Tensor, cols: Tensor, block_n: int = 32, block_t: int = 128,
          num_warps: int = 8) -> Tensor:
    """grad_y: (T, out), x: (T, in); rows/cols: (nnz,) -> (nnz,) fp32, ``(grad_y^T @ x)[rows, cols]``.

    8 warps: a latency-bound gather wants many loads in flight; at 4 warps ptxas gives it 126
    registers per thread on sm_80 (a quarter of the SM's warps resident), at 8 about half
    that (benchmarks/triton_compile_report.py; chosen from registers, not timed on a GPU).
    """
    a, b = feature_major(grad_y), feature_major(x)
    out = torch.empty(rows.numel(), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows.numel(), block_n),)
    _sddmm_kernel[grid](a, b, rows, cols, out, x.shape[0], rows.numel(), a.stride(0), a.stride(1),
                        b.stride(0), b.stride(1), BLOCK_N=block_n, BLOCK_T=block_t, num_warps=num_warps)
    return out


def sddmm_blocked(grad_y: Tensor, x: Tensor, crow: Tensor, rows: Tensor, cols: Tensor, block_m: int = 64,
                  block_n: int = 64, block_k: int | None = None, block_e: int = 256,
                  programs: int | None = None) -> Tensor:
    """Same result as :func:`sddmm` (row-major (nnz,) fp32), computed tile by tile on tensor cores.

    grad_y: (T, out), x: (T, in), read at their own strides (no transposed copies); crow:
    (out+1,), rows/cols: (nnz,) row-major. Costs one dense (out, in, T) product's FLOPs (the
    weight gradient's), but no (out, in) tensor is ever written: each (block_m, block_n) tile
    lives in registers only. fp32 inputs are multiplied in full fp32 unless
    ``torch.set_float32_matmul_precision`` allows TF32 ("high"/"medium"), as for torch's own
    matmuls. ``block_k`` (tokens per step) defaults to 16 for full fp32 (32 spills registers on
    sm_80: benchmarks/triton_compile_report.py), 32 otherwise. ``programs``:
    about how many programs to launch (default: 2 per SM on CUDA); the column range is split
    into groups until the row blocks times the groups reach it.
    """
    n_rows, n_cols = crow.numel() - 1, x.shape[1]
    ieee = x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    block_k = block_k or (16 if ieee else 32)
    out = torch.empty(cols.numel(), dtype=torch.float32, device=x.device)
    if programs is None:
        programs = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    row_blocks = triton.cdiv(n_rows, block_m)
    groups = max(1, min(triton.cdiv(n_cols, block_n), triton.cdiv(programs, row_blocks)))
    cols_per_group = triton.cdiv(triton.cdiv(n_cols, groups), block_n) * block_n
    grid = (row_blocks, triton.cdiv(n_cols, cols_per_group))
    _sddmm_blocked_kernel[grid](grad_y, x, crow, rows, cols, out, n_rows, n_cols, x.shape[0],
                                grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1), cols_per_group,
                                BM=block_m, BN=block_n, BK=block_k, E=block_e, IEEE=ieee,
                                UPCAST=_INTERPRETED and x.dtype != torch.float32)
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
