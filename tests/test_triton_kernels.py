"""Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest) vs dense fp64."""

from __future__ import annotations

import os

import pytest
import torch

from shira_dist.kernels import build_csr_layout, scatter_merge_reference
from shira_dist.masks import sample_distinct

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must enable Triton's interpreter before import"
from shira_dist.kernels import triton_kernels as tk  # noqa: E402

SHAPES = [(7, 13, 20), (33, 17, 100), (64, 40, 300), (1, 9, 4)]


def _idx(out_f, in_f, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    flat = sample_distinct(out_f * in_f, nnz, g, torch.device("cpu"))
    idx = torch.stack([flat // in_f, flat % in_f])
    return idx[:, torch.randperm(nnz, generator=g)]


@pytest.mark.parametrize("out_f,in_f,nnz", SHAPES)
def test_scatter_merge_and_exact_restore(out_f, in_f, nnz):
    idx = _idx(out_f, in_f, nnz, 1)
    w = torch.randn(out_f, in_f)
    w0 = w.clone()
    v = torch.randn(nnz)
    flat = idx[0] * in_f + idx[1]  # any order: the kernel takes flat positions
    orig = tk.scatter_merge(w, flat, v, 0.5, block=16)
    torch.testing.assert_close(w, scatter_merge_reference(w0, idx, v, 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(orig, w0[idx[0], idx[1]], atol=0, rtol=0)
    tk.scatter_restore(w, flat, orig, block=16)
    assert torch.equal(w.view(torch.int32), w0.view(torch.int32))


@pytest.mark.parametrize("out_f,in_f,nnz", SHAPES)
@pytest.mark.parametrize("T", [5, 37])
def test_sddmm_matches_dense(out_f, in_f, nnz, T):
    idx = _idx(out_f, in_f, nnz, 2)
    gy, x = torch.randn(T, out_f), torch.randn(T, in_f)
    got = tk.sddmm(gy, x, idx[0].contiguous(), idx[1].contiguous(), block_n=16, block_t=8)
    ref = (gy.double().t() @ x.double())[idx[0], idx[1]]
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("out_f,in_f,nnz", SHAPES)
def test_csr_spmm_forward_and_grad_x(out_f, in_f, nnz):
    idx = _idx(out_f, in_f, nnz, 3)
    layout = build_csr_layout(idx, (out_f, in_f))
    v = torch.randn(nnz)
    dense = torch.zeros(out_f, in_f, dtype=torch.float64)
    dense[idx[0], idx[1]] = v.double()
    x = torch.randn(11, in_f)
    y = tk.csr_spmm_add_(torch.zeros(11, out_f), x, layout.crow, layout.col, layout.rowmajor(v), 0.7, block_t=4)
    torch.testing.assert_close(y.double(), 0.7 * x.double() @ dense.t(), atol=1e-5, rtol=1e-5)
    gy = torch.randn(11, out_f)  # grad_x = grad_y @ S uses the CSR of S^T
    lt = layout.transposed()
    gx = tk.csr_spmm_add_(torch.zeros(11, in_f), gy, lt.crow, lt.col, lt.rowmajor(v), 0.7, block_t=4)
    torch.testing.assert_close(gx.double(), 0.7 * gy.double() @ dense, atol=1e-5, rtol=1e-5)


def test_public_functions_dispatch_to_triton(monkeypatch):
    # SHIRA_DIST_KERNEL_BACKEND=triton routes the public kernels through Triton (interpreted here),
    # covering the CUDA dispatch path end to end against the dense references.
    from shira_dist.kernels import (
        delta_matmul_reference,
        scatter_merge_,
        scatter_restore_,
        sparse_delta_add_,
        sparse_delta_matmul,
    )

    monkeypatch.setenv("SHIRA_DIST_KERNEL_BACKEND", "triton")
    idx = _idx(24, 20, 90, 4).to(torch.int32)
    layout = build_csr_layout(idx, (24, 20))
    x = torch.randn(2, 3, 20, requires_grad=True)
    v = torch.randn(90, requires_grad=True)
    xr, vr = x.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
    y = sparse_delta_matmul(x, v, layout, 0.5)
    yr = delta_matmul_reference(xr, idx, vr, 0.5, (24, 20))
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    (yr * gy).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.grad, vr.grad, atol=1e-5, rtol=1e-5)
    w = torch.randn(24, 20)
    w0 = w.clone()
    orig = scatter_merge_(w, layout, v.detach(), 0.5)
    torch.testing.assert_close(w, scatter_merge_reference(w0, idx, v.detach(), 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(orig, w0[idx[0].long(), idx[1].long()], atol=0, rtol=0)  # stored order
    scatter_restore_(w, layout, orig)
    assert torch.equal(w, w0)
    y0 = torch.randn(2, 3, 24)
    y_add = y0.clone()
    with torch.no_grad():  # inference: the Triton product adds into y in place
        sparse_delta_add_(y_add, x, v, layout, 0.5)
    torch.testing.assert_close(y_add, y0 + yr.detach(), atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("SHIRA_DIST_KERNEL_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="SHIRA_DIST_KERNEL_BACKEND='cuda-please' is invalid"):
        scatter_merge_(w, layout, v.detach(), 0.5)
