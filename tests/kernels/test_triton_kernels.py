"""Triton kernels vs dense fp64 references.

In CI they run on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set in conftest).
On a machine with a GPU, ``TRITON_INTERPRET=0 pytest tests/kernels/test_triton_kernels.py`` runs the
same tests compiled, on CUDA tensors (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import os

import pytest
import torch

from shira_dist.kernels import build_csr_layout, scatter_merge_reference
from shira_dist.masks import sample_distinct

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = torch.device("cpu" if INTERPRET else "cuda")
assert INTERPRET or torch.cuda.is_available(), "without TRITON_INTERPRET=1 these tests need a CUDA device"
from shira_dist.kernels import triton_kernels as tk  # noqa: E402  (after the interpreter switch)

SHAPES = [(7, 13, 20), (33, 17, 100), (64, 40, 300), (1, 9, 4)]


def _idx(out_f, in_f, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    flat = sample_distinct(out_f * in_f, nnz, g, torch.device("cpu"))
    idx = torch.stack([flat // in_f, flat % in_f])
    return idx[:, torch.randperm(nnz, generator=g)]


def _ragged_idx():
    """(40, 9): row 3 full, rows 10-29 empty, the rest random: uneven rows inside one block."""
    g = torch.Generator().manual_seed(5)
    dense = torch.rand(40, 9, generator=g) < 0.3
    dense[3] = True
    dense[10:30] = False
    return torch.nonzero(dense).t()


def _dense(idx, v, shape):
    d = torch.zeros(shape, dtype=torch.float64)
    d[idx[0], idx[1]] = v.double().cpu()
    return d


@pytest.mark.parametrize("out_f,in_f,nnz", SHAPES)
def test_scatter_merge_and_exact_restore(out_f, in_f, nnz):
    idx = _idx(out_f, in_f, nnz, 1)
    w = torch.randn(out_f, in_f, device=DEV)
    w0 = w.clone()
    v = torch.randn(nnz, device=DEV)
    flat = (idx[0] * in_f + idx[1]).to(DEV)  # any order: the kernel takes flat positions
    orig = tk.scatter_merge(w, flat, v, 0.5, block=16)
    torch.testing.assert_close(w.cpu(), scatter_merge_reference(w0.cpu(), idx, v.cpu(), 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(orig.cpu(), w0.cpu()[idx[0], idx[1]], atol=0, rtol=0)
    tk.scatter_restore(w, flat, orig, block=16)
    assert torch.equal(w.view(torch.int32), w0.view(torch.int32))


@pytest.mark.parametrize("out_f,in_f,nnz", SHAPES)
@pytest.mark.parametrize("T", [5, 32, 37])  # tiles of 8: a partial tile only, whole tiles only, both
def test_sddmm_matches_dense(out_f, in_f, nnz, T):
    idx = _idx(out_f, in_f, nnz, 2)
    gy, x = torch.randn(T, out_f, device=DEV), torch.randn(T, in_f, device=DEV)
    got = tk.sddmm(gy, x, idx[0].contiguous().to(DEV), idx[1].contiguous().to(DEV), block_n=16, block_t=8)
    ref = (gy.double().t() @ x.double())[idx[0].to(DEV), idx[1].to(DEV)]
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)


def _blocked(gy, x, layout, **blocks):
    return tk.sddmm_blocked(gy, x, layout.crow.to(DEV), layout.rows().to(DEV), layout.col.to(DEV), **blocks)


@pytest.mark.parametrize("out_f,in_f,nnz", SHAPES + [(None, None, None), (70, 150, 900)])
@pytest.mark.parametrize("T", [5, 37])
def test_blocked_sddmm_matches_dense(out_f, in_f, nnz, T):
    # tiles of 16: shapes that are not multiples of the tiles, several row blocks and column
    # groups (programs=4 splits 150 columns into groups of 48), a full row, empty rows
    idx = _idx(out_f, in_f, nnz, 2) if out_f else _ragged_idx()
    shape = (out_f, in_f) if out_f else (40, 9)
    layout = build_csr_layout(idx.to(torch.int32), shape)
    gy, x = torch.randn(T, shape[0], device=DEV), torch.randn(T, shape[1], device=DEV)
    got = _blocked(gy, x, layout, block_m=16, block_n=16, block_k=16, block_e=32, programs=4)
    rows, cols = layout.rows().long(), layout.col.long()
    ref = (gy.double().t() @ x.double()).cpu()[rows, cols]
    torch.testing.assert_close(got.double().cpu(), ref, atol=1e-4, rtol=1e-5)  # fp32 products (no TF32)
    xs = torch.randn(T, shape[1] + 3, device=DEV)[:, 2:-1]  # strided x is read in place
    got = _blocked(gy, xs, layout, block_m=16, block_n=32, block_k=16, block_e=16, programs=1)
    torch.testing.assert_close(got.double().cpu(), (gy.double().t() @ xs.double()).cpu()[rows, cols],
                               atol=1e-4, rtol=1e-5)


def _layout(idx, shape):
    layout = build_csr_layout(idx.to(torch.int32), shape)
    return layout.crow.to(DEV), layout.col.to(DEV), layout


@pytest.mark.parametrize("out_f,in_f,nnz", SHAPES + [(None, None, None)])
def test_csr_spmm_forward_and_grad_x(out_f, in_f, nnz):
    idx = _idx(out_f, in_f, nnz, 3) if out_f else _ragged_idx()
    shape = (out_f, in_f) if out_f else (40, 9)
    crow, col, layout = _layout(idx, shape)
    v = torch.randn(idx.shape[1], device=DEV)
    dense = _dense(idx, v, shape)
    x = torch.randn(11, shape[1], device=DEV)  # 11 tokens in tiles of 4: two whole tiles, one partial
    y0 = torch.randn(11, shape[0], device=DEV)
    y = tk.csr_spmm_add_(y0.clone(), x, crow, col, layout.rowmajor(v), 0.7, block_r=4, block_t=4)
    torch.testing.assert_close(y.double().cpu(), y0.double().cpu() + 0.7 * x.double().cpu() @ dense.t(),
                               atol=1e-5, rtol=1e-5)
    gy = torch.randn(11, shape[0], device=DEV)  # grad_x = grad_y @ S uses the CSR of S^T
    lt = layout.transposed()
    gx = tk.csr_spmm_add_(torch.zeros(11, shape[1], device=DEV), gy, lt.crow.to(DEV), lt.col.to(DEV),
                          lt.rowmajor(v), 0.7, block_r=4, block_t=4)
    torch.testing.assert_close(gx.double().cpu(), 0.7 * gy.double().cpu() @ dense, atol=1e-5, rtol=1e-5)


def test_csr_spmm_writes_through_strided_outputs_and_reads_strided_inputs():
    # y a transposed view (column-major (T, out)), x a slice with a row stride wider than in_f:
    # the kernel adds in place at y's own strides and leaves everything else alone.
    idx = _idx(24, 20, 90, 6)
    crow, col, layout = _layout(idx, (24, 20))
    v = torch.randn(90, device=DEV)
    dense = _dense(idx, v, (24, 20))
    store = torch.randn(24, 9, device=DEV)
    before = store.clone()
    y = store[:, 1:8].t()  # (7, 24), strides (1, 9)
    xs = torch.randn(7, 33, device=DEV)
    x = xs[:, 5:25]  # (7, 20), row stride 33
    tk.csr_spmm_add_(y, x, crow, col, layout.rowmajor(v), -1.5, block_r=8, block_t=4)
    want = before[:, 1:8].t().double().cpu() - 1.5 * x.double().cpu() @ dense.t()
    torch.testing.assert_close(store[:, 1:8].t().double().cpu(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(store[:, 0], before[:, 0]) and torch.equal(store[:, 8], before[:, 8])


def test_bf16_inputs_sum_in_fp32():
    # bf16 activations and values: products summed in fp32, rounded once to y's dtype
    idx = _idx(48, 64, 700, 7)
    crow, col, layout = _layout(idx, (48, 64))
    v = torch.randn(700, device=DEV).bfloat16()
    x = torch.randn(19, 64, device=DEV).bfloat16()
    dense = _dense(idx, v.float(), (48, 64))
    y = tk.csr_spmm_add_(torch.zeros(19, 48, device=DEV, dtype=torch.bfloat16), x, crow, col, layout.rowmajor(v),
                         0.5, block_r=8, block_t=8)
    ref = 0.5 * x.double().cpu() @ dense.t()
    # one rounding to bf16: to nearest when compiled; Triton's interpreter truncates instead (up to 2^-7)
    torch.testing.assert_close(y.double().cpu(), ref, atol=0, rtol=2**-7 if INTERPRET else 2**-8)
    gy = torch.randn(19, 48, device=DEV).bfloat16()
    rows = layout.rows().to(DEV)
    got = tk.sddmm(gy, x, rows, col, block_n=16, block_t=8)  # row-major order
    assert got.dtype == torch.float32
    ref_g = (gy.double().t() @ x.double())[rows.long(), col.long()]
    torch.testing.assert_close(got.double(), ref_g, atol=1e-4, rtol=1e-5)  # exact products, fp32 sums
    got = _blocked(gy, x, layout, block_m=16, block_n=16, block_k=16, block_e=64)
    torch.testing.assert_close(got.double(), ref_g, atol=1e-4, rtol=1e-5)


def test_public_functions_dispatch_to_triton(monkeypatch):
    # SHIRA_DIST_KERNEL_BACKEND=triton routes the public kernels through Triton (interpreted on
    # the CPU), covering the CUDA dispatch path end to end against the dense references.
    from shira_dist.kernels import (
        delta_matmul_reference,
        scatter_merge_,
        scatter_restore_,
        sparse_delta_add_,
        sparse_delta_matmul,
    )

    monkeypatch.setenv("SHIRA_DIST_KERNEL_BACKEND", "triton")
    idx = _idx(24, 20, 90, 4).to(torch.int32)
    layout = build_csr_layout(idx.to(DEV), (24, 20))
    x = torch.randn(2, 3, 20, device=DEV, requires_grad=True)
    v = torch.randn(90, device=DEV, requires_grad=True)
    xr, vr = x.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
    y = sparse_delta_matmul(x, v, layout, 0.5)
    yr = delta_matmul_reference(xr, idx.to(DEV), vr, 0.5, (24, 20))
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    (yr * gy).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.grad, vr.grad, atol=1e-5, rtol=1e-5)
    w = torch.randn(24, 20, device=DEV)
    w0 = w.clone()
    orig = scatter_merge_(w, layout, v.detach(), 0.5)
    torch.testing.assert_close(w.cpu(), scatter_merge_reference(w0.cpu(), idx, v.detach().cpu(), 0.5),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(orig.cpu(), w0.cpu()[idx[0].long(), idx[1].long()], atol=0, rtol=0)  # stored order
    scatter_restore_(w, layout, orig)
    assert torch.equal(w, w0)
    y0 = torch.randn(2, 3, 24, device=DEV)
    y_add = y0.clone()
    with torch.no_grad():  # inference: the Triton product adds into y in place
        sparse_delta_add_(y_add, x, v, layout, 0.5)
    torch.testing.assert_close(y_add, y0 + yr.detach(), atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("SHIRA_DIST_TRITON_SDDMM", "dense")
    with pytest.raises(ValueError, match="SHIRA_DIST_TRITON_SDDMM='dense' is invalid; allowed: .*gather.*blocked"):
        sparse_delta_matmul(x, v, layout, 0.5).sum().backward()
    monkeypatch.setenv("SHIRA_DIST_KERNEL_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="SHIRA_DIST_KERNEL_BACKEND='cuda-please' is invalid"):
        scatter_merge_(w, layout, v.detach(), 0.5)


@pytest.mark.parametrize("mode,sddmm", [("auto", "gather"), ("unfused", "gather"), ("auto", "blocked")])
def test_model_trains_through_the_triton_kernels(monkeypatch, mode, sddmm):
    # A tiny Llama with all 7 projections adapted, trained 3 SGD steps on DEV with the Triton
    # backend (fused: SDDMM + scatter merge; unfused: both sparse products + SDDMM), against
    # the same model in fp64 on the CPU through the torch path (itself checked against dense
    # references in test_kernels.py).
    from shira_dist import ShiraConfig, ShiraLinear, get_peft_model
    from tests.conftest import tiny_llama

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 101, (3, 2, 9), generator=torch.Generator().manual_seed(4))

    def train(dtype, device, backend):
        monkeypatch.setenv("SHIRA_DIST_KERNEL_BACKEND", backend)
        model = get_peft_model(tiny_llama(dtype=dtype), ShiraConfig(r=2, target_modules=targets, random_seed=0,
                                                                    init_weights=False)).to(device)
        model.set_fuse_mode(mode)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for batch in ids.to(device):
            loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        layers = [m for m in model.modules() if isinstance(m, ShiraLinear)]
        assert all(layer.fused == (mode == "auto") for layer in layers)
        return losses, [layer.shira_weight["default"].detach().double().cpu() for layer in layers]

    monkeypatch.setenv("SHIRA_DIST_TRITON_SDDMM", sddmm)
    calls = {"sddmm": 0, "sddmm_blocked": 0, "csr_spmm_add_": 0}
    for name in calls:
        real = getattr(tk, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(tk, name, counted)
    ref_losses, ref_values = train(torch.float64, "cpu", "torch")
    assert calls == {"sddmm": 0, "sddmm_blocked": 0, "csr_spmm_add_": 0}
    losses, values = train(torch.float32, DEV, "triton")
    # per step: 14 values' gradients; unfused also 14 forward products and 11 grad_x (layer 0's
    # q/k/v read the frozen embeddings' output, which needs no gradient)
    used, unused = ("sddmm_blocked", "sddmm") if sddmm == "blocked" else ("sddmm", "sddmm_blocked")
    assert calls[used] == 3 * 14 and calls[unused] == 0
    assert calls["csr_spmm_add_"] == (0 if mode == "auto" else 3 * (14 + 11))
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)  # fp32 vs fp64
    for got, want in zip(values, ref_values):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
