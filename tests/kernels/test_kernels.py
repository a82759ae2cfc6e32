"""kernels/: sparse delta matmul, SDDMM gradient and scatter merge against dense fp64 references."""

from __future__ import annotations

import pytest
import torch

from shira_dist.kernels import (
    build_csr_layout,
    delta_matmul_reference,
    scatter_merge_,
    scatter_merge_reference,
    scatter_restore_,
    scatter_rewrite_,
    sparse_delta_add_,
    sparse_delta_matmul,
)
from tests.conftest import random_pattern


def _pattern(out_f, in_f, nnz, seed, shuffle=True, empty_rows=False):
    return random_pattern(out_f, in_f, nnz, seed, shuffle, empty_rows)


SHAPES = [(7, 13, 20), (13, 7, 30), (64, 33, 200), (1, 40, 10), (40, 1, 5), (50, 70, 3000)]


CASES = [(*s, False) for s in SHAPES] + [(*s, True) for s in SHAPES if s[0] >= 2]


@pytest.mark.parametrize("out_f,in_f,nnz,empty_rows", CASES)
def test_delta_matmul_matches_dense_fp64(out_f, in_f, nnz, empty_rows):
    nnz = min(nnz, (out_f // 2 if empty_rows else out_f) * in_f)
    idx = _pattern(out_f, in_f, nnz, seed=out_f * 31 + in_f)
    layout = build_csr_layout(idx, (out_f, in_f))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, in_f, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(nnz, dtype=torch.float64, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    v_ref = v.detach().clone().requires_grad_(True)
    gy = torch.randn(3, 5, out_f, dtype=torch.float64, generator=g)

    y = sparse_delta_matmul(x, v, layout, 0.7)
    y_ref = delta_matmul_reference(x_ref, idx, v_ref, 0.7, (out_f, in_f))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-12, atol=1e-12)


def test_delta_matmul_fp32_and_bf16_inputs():
    idx = _pattern(48, 40, 300, seed=3)
    layout = build_csr_layout(idx, (48, 40))
    x = torch.randn(16, 40)
    v = torch.randn(300)
    ref = delta_matmul_reference(x.double(), idx, v.double(), 1.0, (48, 40))
    torch.testing.assert_close(sparse_delta_matmul(x, v, layout, 1.0).double(), ref, atol=1e-5, rtol=1e-5)
    y16 = sparse_delta_matmul(x.bfloat16(), v.bfloat16(), layout, 1.0)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), ref, atol=0.1, rtol=0.05)


def test_delta_matmul_never_builds_dense_weight_gradient():
    # The values' gradient has nnz entries; no (out, in) tensor reaches autograd.
    idx = _pattern(30, 20, 50, seed=4)
    layout = build_csr_layout(idx, (30, 20))
    v = torch.zeros(50, requires_grad=True)
    sparse_delta_matmul(torch.randn(4, 20), v, layout, 1.0).sum().backward()
    assert v.grad.shape == (50,)


def test_empty_batch():
    idx = _pattern(8, 6, 10, seed=5)
    y = sparse_delta_matmul(torch.randn(0, 6), torch.randn(10), build_csr_layout(idx, (8, 6)), 1.0)
    assert y.shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_merge_matches_reference_and_restore_is_bit_exact(dtype):
    idx = _pattern(33, 17, 120, seed=6)
    w = torch.randn(33, 17).to(dtype)
    w0 = w.clone()
    v = torch.randn(120)
    layout = build_csr_layout(idx, (33, 17))
    originals = scatter_merge_(w, layout, v, 0.5)
    torch.testing.assert_close(w, scatter_merge_reference(w0, idx, v, 0.5), atol=0, rtol=0)
    torch.testing.assert_close(originals, w0[idx[0].long(), idx[1].long()], atol=0, rtol=0)  # stored order
    mask = torch.zeros(33, 17, dtype=torch.bool)
    mask[idx[0].long(), idx[1].long()] = True
    assert torch.equal(w[~mask], w0[~mask])  # only the nnz entries moved
    scatter_restore_(w, layout, originals)
    assert torch.equal(_bits(w), _bits(w0))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_safe_merge_leaves_weight_untouched_on_nonfinite():
    idx = _pattern(10, 10, 20, seed=7)
    w = torch.randn(10, 10)
    w0 = w.clone()
    v = torch.zeros(20)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        scatter_merge_(w, build_csr_layout(idx, (10, 10)), v, 1.0, check_finite=True)
    assert torch.equal(w, w0)


@pytest.mark.parametrize("out_f,in_f,r", [(40, 24, 4), (24, 40, 3), (33, 33, 2)])
def test_struct_pattern_uses_dense_blocks_and_matches_dense(out_f, in_f, r):
    from shira_dist.masks import struct_mask

    mask = struct_mask(torch.nn.Linear(in_f, out_f), r, random_seed=1)
    idx = mask.indices()
    idx = idx[:, torch.randperm(idx.shape[1], generator=torch.Generator().manual_seed(0))]  # any stored order
    layout = build_csr_layout(idx, (out_f, in_f))
    assert layout.blocks is not None and layout.blocks.rows.numel() + layout.blocks.cols.numel() > 0
    assert layout.blocks.rest is not None  # the diagonal and top-ups stay sparse
    nnz = idx.shape[1]
    v = torch.randn(nnz, dtype=torch.float64, requires_grad=True)
    v_ref = v.detach().clone().requires_grad_(True)
    x = torch.randn(6, in_f, dtype=torch.float64)
    gy = torch.randn(6, out_f, dtype=torch.float64)
    (sparse_delta_matmul(x, v, layout, 1.3) * gy).sum().backward()
    (delta_matmul_reference(x, idx, v_ref, 1.3, (out_f, in_f)) * gy).sum().backward()
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-12, atol=1e-12)
    assert build_csr_layout(_pattern(out_f, in_f, nnz, seed=2), (out_f, in_f)).blocks is None  # random: none


@pytest.mark.parametrize("line", ["row", "column"])
def test_a_single_whole_row_or_column_is_found(line):
    """The cheap pre-check (row lengths, column counts) must not hide a lone full row or column."""
    out_f, in_f = 9, 7
    full = torch.arange(in_f if line == "row" else out_f)
    idx = torch.stack([torch.full_like(full, 4), full]) if line == "row" else torch.stack([full, torch.full_like(full, 3)])
    layout = build_csr_layout(idx, (out_f, in_f))
    assert layout.blocks is not None and layout.blocks.rest is None
    assert (layout.blocks.rows if line == "row" else layout.blocks.cols).tolist() == [4 if line == "row" else 3]
    v = torch.randn(idx.shape[1], dtype=torch.float64, requires_grad=True)
    v_ref = v.detach().clone().requires_grad_(True)
    x, gy = torch.randn(5, in_f, dtype=torch.float64), torch.randn(5, out_f, dtype=torch.float64)
    (sparse_delta_matmul(x, v, layout, 0.9) * gy).sum().backward()
    (delta_matmul_reference(x, idx, v_ref, 0.9, (out_f, in_f)) * gy).sum().backward()
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-12, atol=1e-12)


def test_merge_on_non_contiguous_weight():
    idx = _pattern(12, 9, 30, seed=8)
    storage = torch.randn(9, 12)
    w = storage.t()  # (12, 9) view, not contiguous
    w0 = w.clone()
    v = torch.randn(30)
    layout = build_csr_layout(idx, (12, 9))
    orig = scatter_merge_(w, layout, v, 2.0)
    torch.testing.assert_close(w, scatter_merge_reference(w0, idx, v, 2.0), atol=0, rtol=0)
    scatter_restore_(w, layout, orig)
    assert torch.equal(w, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rewrite_gives_the_bits_of_restore_then_merge(dtype):
    # Fused mode re-writes W0[idx] + s*v' after each step from the saved W0 entries.
    idx = _pattern(21, 19, 90, seed=9)
    w = torch.randn(21, 19).to(dtype)
    w0 = w.clone()
    layout = build_csr_layout(idx, (21, 19))
    originals = scatter_merge_(w, layout, torch.randn(90), 0.3)
    v2 = torch.randn(90)
    scatter_rewrite_(w, layout, originals, v2, 0.3)
    expected = w0.clone()
    scatter_merge_(expected, layout, v2, 0.3)
    assert torch.equal(_bits(w), _bits(expected))
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 0.0}[dtype]  # one rounding in >= fp32
    torch.testing.assert_close(w, scatter_merge_reference(w0, idx, v2, 0.3), atol=tol, rtol=tol)
