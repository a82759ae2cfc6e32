"""kernels/: every CPU SDDMM path and the compact CSR layouts, against dense fp64 references."""

from __future__ import annotations

import pytest
import torch

from shira_dist.kernels import (
    build_csr_layout,
    cpu_sddmm,
    delta_matmul_reference,
    sddmm,
    sddmm_reference,
    sparse_delta_add_,
    sparse_delta_matmul,
)
from tests.conftest import random_pattern


def _pattern(out_f, in_f, nnz, seed, shuffle=False, empty_rows=False):
    return random_pattern(out_f, in_f, nnz, seed, shuffle, empty_rows)


# (out, in, nnz, T): T around the native kernel's tiles (256/128/64/32 fp32 tokens, half for fp64,
# by input width and the tiles' budget: <= 1280, <= 2816, wider, in+out > 2048) and around the
# split of tokens between threads; widths not multiples of anything.
CASES = [(7, 13, 20, 1), (13, 7, 30, 5), (64, 33, 200, 64), (50, 70, 900, 127), (50, 70, 900, 256),
         (70, 50, 900, 257), (33, 129, 1000, 600), (1, 40, 10, 513), (40, 1, 5, 65),
         (3, 1500, 300, 129), (2, 2900, 200, 70)]


@pytest.mark.parametrize("choice", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("out_f,in_f,nnz,T", CASES)
@pytest.mark.parametrize("shuffle,empty_rows", [(False, False), (True, True)])
def test_sddmm_paths_match_dense_fp64(monkeypatch, choice, dtype, out_f, in_f, nnz, T, shuffle, empty_rows):
    monkeypatch.setenv("SHIRA_DIST_CPU_SDDMM", choice)
    nnz = min(nnz, max(1, out_f // 2 if empty_rows else out_f) * in_f)
    idx = _pattern(out_f, in_f, nnz, seed=out_f + 7 * T, shuffle=shuffle, empty_rows=empty_rows and out_f > 1)
    layout = build_csr_layout(idx, (out_f, in_f))
    g = torch.Generator().manual_seed(T)
    gy, x = torch.randn(T, out_f, generator=g, dtype=dtype), torch.randn(T, in_f, generator=g, dtype=dtype)
    assert cpu_sddmm.usable(x, layout.col) == (choice == "native")
    got = sddmm(gy, x, layout)
    ref = sddmm_reference(gy.double(), x.double(), idx)
    tol = 1e-12 if dtype == torch.float64 else 2e-5 * T**0.5
    assert got.dtype == dtype and got.shape == (nnz,)
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("T", [300, 30])
@pytest.mark.parametrize("col_dtype", [torch.int32, torch.int16])  # int16: a layer's stored columns
def test_native_kernels_any_thread_count(threads, T, col_dtype):
    # fp64 tiles are 128 tokens here. T=300: per-thread token ranges (3 threads: 128+128+44 tokens);
    # T=30: one tile, shared by the threads, which split S's rows (sddmm, forward product). Sums must not change.
    idx = _pattern(45, 38, 400, seed=11, empty_rows=True)
    layout = build_csr_layout(idx, (45, 38))
    layout.col = layout.col.to(col_dtype)
    g = torch.Generator().manual_seed(0)
    gy, x = torch.randn(T, 45, generator=g, dtype=torch.float64), torch.randn(T, 38, generator=g, dtype=torch.float64)
    v = torch.randn(400, generator=g, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = layout.from_rowmajor(cpu_sddmm.sddmm(gy, x, layout.crow, layout.col))
        y = cpu_sddmm.spmm(x, layout.crow, layout.col, layout.rowmajor(v), 38)
        gx = cpu_sddmm.spmm(gy, layout.crow, layout.col, layout.rowmajor(v), 38, transposed=True)
        y0, gx0 = torch.randn(T, 45, generator=g, dtype=torch.float64), torch.randn(T, 38, generator=g, dtype=torch.float64)
        y_acc, gx_acc = y0.clone(), gx0.clone()  # scaled, added into existing outputs
        assert cpu_sddmm.spmm(x, layout.crow, layout.col, layout.rowmajor(v), 38, scale=-0.3, out=y_acc) is y_acc
        cpu_sddmm.spmm(gy, layout.crow, layout.col, layout.rowmajor(v), 38, transposed=True, scale=-0.3, out=gx_acc)
        w0 = torch.randn(45, 38, generator=g, dtype=torch.float64)
        w, saved = w0.clone(), torch.empty(400, dtype=torch.float64)
        cpu_sddmm.scatter_(w, layout.crow, layout.col, "merge", saved, layout.rowmajor(v), 0.5)
    finally:
        torch.set_num_threads(before)
    dense = torch.zeros(45, 38, dtype=torch.float64)
    dense[idx[0].long(), idx[1].long()] = v
    torch.testing.assert_close(got, sddmm_reference(gy, x, idx), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, x @ dense.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gy @ dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_acc, y0 - 0.3 * (x @ dense.t()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_acc, gx0 - 0.3 * (gy @ dense), rtol=1e-12, atol=1e-12)
    assert torch.equal(w, w0 + 0.5 * dense) and torch.equal(layout.from_rowmajor(saved), w0[idx[0].long(), idx[1].long()])


def test_native_sddmm_hand_set_entries():
    gy = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # (T=3, out=2)
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # (T=3, in=3)
    # entries (0, 2), (1, 0), (1, 1): crow [0, 1, 3], col [2, 0, 1]
    crow, col = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([2, 0, 1], dtype=torch.int32)
    # (gy^T x)[0,2] = 1*2+3*1+5*0 = 5; [1,0] = 2*1+4*0+6*1 = 8; [1,1] = 2*0+4*1+6*1 = 10
    assert cpu_sddmm.sddmm(gy, x, crow, col).tolist() == [5.0, 8.0, 10.0]


def test_fallback_without_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SHIRA_DIST_CACHE", str(tmp_path))
    cpu_sddmm.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="falling back to torch.sparse"):
            assert cpu_sddmm.library() is None
        idx = _pattern(20, 30, 100, seed=3)
        layout = build_csr_layout(idx, (20, 30))
        gy, x = torch.randn(9, 20, dtype=torch.float64), torch.randn(9, 30, dtype=torch.float64)
        assert not cpu_sddmm.usable(x, layout.col)
        torch.testing.assert_close(sddmm(gy, x, layout), sddmm_reference(gy, x, idx), rtol=1e-12, atol=1e-12)
        monkeypatch.setenv("SHIRA_DIST_CPU_SDDMM", "native")
        with pytest.raises(RuntimeError, match="SHIRA_DIST_CPU_SDDMM=native but the native SDDMM kernel did not"):
            cpu_sddmm.usable(x, layout.col)
    finally:
        cpu_sddmm.library.cache_clear()
    monkeypatch.setenv("SHIRA_DIST_CPU_SDDMM", "fast")
    with pytest.raises(ValueError, match="SHIRA_DIST_CPU_SDDMM='fast' is invalid"):
        cpu_sddmm.choice()


@pytest.mark.parametrize("choice", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("out_f,in_f,nnz,T", CASES)
@pytest.mark.parametrize("shuffle,empty_rows", [(False, False), (True, True)])
def test_sparse_delta_products_match_dense_fp64(monkeypatch, choice, dtype, out_f, in_f, nnz, T, shuffle,
                                                empty_rows):
    """Forward x @ (s*S)^T and grad_x = grad_y @ (s*S): native tiled kernel and torch.sparse."""
    monkeypatch.setenv("SHIRA_DIST_CPU_SDDMM", choice)
    nnz = min(nnz, max(1, out_f // 2 if empty_rows else out_f) * in_f)
    idx = _pattern(out_f, in_f, nnz, seed=in_f + 5 * T, shuffle=shuffle, empty_rows=empty_rows and out_f > 1)
    layout = build_csr_layout(idx, (out_f, in_f))
    g = torch.Generator().manual_seed(T + 1)
    x = torch.randn(T, in_f, generator=g, dtype=dtype, requires_grad=True)
    v, gy = torch.randn(nnz, generator=g, dtype=dtype), torch.randn(T, out_f, generator=g, dtype=dtype)
    y = sparse_delta_matmul(x, v, layout, 0.5)
    (grad_x,) = torch.autograd.grad(y, x, gy)
    xd = x.detach().double().requires_grad_(True)
    ref = delta_matmul_reference(xd, idx, v.double(), 0.5, (out_f, in_f))
    (ref_gx,) = torch.autograd.grad(ref, xd, gy.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-5 * max(in_f, out_f) ** 0.5
    assert y.dtype == grad_x.dtype == dtype
    torch.testing.assert_close(y.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad_x.double(), ref_gx, rtol=tol, atol=tol)
    assert (layout._t is None) == (choice == "native")  # the native path never builds the CSR of S^T


@pytest.mark.parametrize("choice", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,nnz,T", CASES[::2])
def test_sparse_delta_add_matches_dense_fp64(monkeypatch, choice, dtype, out_f, in_f, nnz, T):
    # Inference: y += x @ (s*S)^T in place (the kernel writes into y; bf16 goes through fp32 and an add).
    monkeypatch.setenv("SHIRA_DIST_CPU_SDDMM", choice)
    nnz = min(nnz, out_f * in_f)
    idx = _pattern(out_f, in_f, nnz, seed=3 * in_f + T, shuffle=True)
    layout = build_csr_layout(idx, (out_f, in_f))
    g = torch.Generator().manual_seed(T + 2)
    x = torch.randn(2, T, in_f, generator=g).to(dtype)
    v, y0 = torch.randn(nnz, generator=g).to(dtype), torch.randn(2, T, out_f, generator=g).to(dtype)
    y = y0.clone()
    assert sparse_delta_add_(y, x, v, layout, 0.7) is y
    ref = y0.double() + delta_matmul_reference(x.double(), idx, v.double(), 0.7, (out_f, in_f))
    tol = {torch.float64: 1e-12, torch.float32: 2e-5 * max(in_f, out_f) ** 0.5, torch.bfloat16: 0.05}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_sparse_delta_add_refuses_autograd_and_bad_shapes():
    idx = _pattern(6, 5, 10, seed=1)
    layout = build_csr_layout(idx, (6, 5))
    x, v, y = torch.randn(3, 5), torch.randn(10, requires_grad=True), torch.randn(3, 6)
    with pytest.raises(RuntimeError, match=r"with gradients enabled use y \+ sparse_delta_matmul"):
        sparse_delta_add_(y, x, v, layout, 1.0)
    with torch.no_grad():
        sparse_delta_add_(y, x, v, layout, 1.0)  # fine without autograd
        with pytest.raises(ValueError, match=r"y \(3, 5\) and x \(3, 5\) do not fit a pattern of shape \(6, 5\)"):
            sparse_delta_add_(torch.randn(3, 5), x, v, layout, 1.0)
    crow, col = layout.crow, layout.col
    with pytest.raises(ValueError, match=r"out must be a contiguous \(3, 6\) torch.float32 CPU tensor, got \(6, 3\)"):
        cpu_sddmm.spmm(x, crow, col, v.detach(), 5, out=torch.zeros(6, 3))
    with pytest.raises(ValueError, match="not contiguous"):
        cpu_sddmm.spmm(x, crow, col, v.detach(), 5, out=torch.zeros(6, 3).t())


def test_native_spmm_hand_set_entries():
    # S (2, 3): S[0, 2] = 10, S[1, 0] = 1, S[1, 1] = -1
    crow, col = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([2, 0, 1], dtype=torch.int32)
    v = torch.tensor([10.0, 1.0, -1.0])
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (T=2, 3)
    # (x @ S^T)[t, 0] = 10*x[t, 2]; [t, 1] = x[t, 0] - x[t, 1]
    assert cpu_sddmm.spmm(x, crow, col, v, 3).tolist() == [[30.0, -1.0], [60.0, -1.0]]
    gy = torch.tensor([[1.0, 2.0]])  # (T=1, 2): (gy @ S) = [2*1, 2*(-1), 1*10]
    assert cpu_sddmm.spmm(gy, crow, col, v, 3, transposed=True).tolist() == [[2.0, -2.0, 10.0]]
    with pytest.raises(ValueError, match="input has 2 features, the pattern \\(2, 3\\) needs 3"):
        cpu_sddmm.spmm(gy, crow, col, v, 3)


def test_sorted_int32_layout_adds_no_per_entry_memory(monkeypatch):
    idx = _pattern(40, 30, 200, seed=5)  # row-major sorted, int32: the usual stored form
    layout = build_csr_layout(idx, (40, 30))
    assert layout.order is None
    assert layout.col.data_ptr() == idx[1].data_ptr()  # a view; rows are implied by crow
    assert layout.crow.dtype == torch.int32 and layout.crow.shape == (41,)
    assert torch.equal(layout.rows(), idx[0]) and torch.equal(layout.indices(), idx)
    assert layout._t is None  # the CSR of S^T waits for an unfused torch.sparse backward that needs grad_x
    monkeypatch.setenv("SHIRA_DIST_CPU_SDDMM", "torch")
    v = torch.randn(200)
    x = torch.randn(3, 30, requires_grad=True)
    sparse_delta_matmul(x, v, layout, 1.0).sum().backward()
    lt = layout._t
    assert lt is not None and lt is layout.transposed()  # built by the backward, then kept
    assert lt.shape == (30, 40) and lt.col.dtype == lt.order.dtype == lt.crow.dtype == torch.int32
    dense = torch.zeros(40, 30)
    dense[idx[0].long(), idx[1].long()] = v
    rows_t = torch.repeat_interleave(torch.arange(30), lt.crow.diff().long())
    assert torch.equal(lt.rowmajor(v), dense.t()[rows_t, lt.col.long()])
    assert torch.equal(lt.crow.diff(), (dense.t() != 0).sum(1).to(torch.int32))


def test_shuffled_layout_round_trips_values():
    idx = _pattern(25, 16, 150, seed=6, shuffle=True)
    layout = build_csr_layout(idx.long(), (25, 16))
    assert layout.order is not None and layout.order.dtype == layout.col.dtype == torch.int32
    v = torch.randn(150)
    rm = layout.rowmajor(v)
    rows = layout.rows()
    key = rows.long() * 16 + layout.col.long()
    assert bool((key[1:] > key[:-1]).all())  # row-major
    dense = torch.zeros(25, 16)
    dense[idx[0].long(), idx[1].long()] = v
    assert torch.equal(rm, dense[rows.long(), layout.col.long()])
    assert torch.equal(layout.from_rowmajor(rm), v)
    assert torch.equal(layout.indices(), idx.to(torch.int32))  # PEFT's form, in the stored order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shuffle", [False, True])
def test_native_scatter_writes_the_bits_of_the_torch_path(monkeypatch, dtype, shuffle):
    from shira_dist.kernels import scatter_merge_, scatter_merge_reference, scatter_restore_, scatter_rewrite_

    idx = _pattern(37, 29, 300, seed=4, shuffle=shuffle)
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(37, 29, generator=g, dtype=dtype)
    v, v2 = torch.randn(300, generator=g), torch.randn(300, generator=g)
    results = {}
    for choice in ("native", "torch"):
        monkeypatch.setenv("SHIRA_DIST_CPU_SDDMM", choice)
        layout = build_csr_layout(idx, (37, 29))
        assert cpu_sddmm.scatter_usable(w0, layout.col) == (choice == "native")
        w = w0.clone()
        saved = scatter_merge_(w, layout, v, 0.3)
        merged = w.clone()
        scatter_rewrite_(w, layout, saved, v2, 0.3)
        rewritten = w.clone()
        scatter_restore_(w, layout, saved)
        assert torch.equal(w, w0)  # restore is exact
        results[choice] = (saved, merged, rewritten)
    for a, b in zip(results["native"], results["torch"]):
        assert torch.equal(a, b)
    tol = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(results["native"][1], scatter_merge_reference(w0, idx, v, 0.3), atol=tol, rtol=tol)
    untouched = torch.ones_like(w0, dtype=torch.bool)
    untouched[idx[0].long(), idx[1].long()] = False
    assert torch.equal(results["native"][2][untouched], w0[untouched])  # only the entries are written


def test_forced_triton_backend_takes_precedence_over_the_native_kernels(monkeypatch):
    from shira_dist.kernels import merge, sparse_delta

    idx = _pattern(12, 10, 30, seed=2)
    w, x = torch.randn(12, 10), torch.randn(4, 10)
    layout = build_csr_layout(idx, (12, 10))
    assert merge._native(w, layout) and sparse_delta._native(x, layout)
    monkeypatch.setenv("SHIRA_DIST_KERNEL_BACKEND", "triton")  # the CUDA path, interpreted in CI
    assert not merge._native(w, layout) and not sparse_delta._native(x, layout)
