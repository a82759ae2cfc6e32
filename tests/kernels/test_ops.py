"""kernels/ops.py: every custom op passes torch.library.opcheck (its schema names exactly what it
mutates, its fake implementation gives the real output's shape, dtype and strides, and it runs
under AOT dispatch) and computes what the dense reference does."""

from __future__ import annotations

import pytest
import torch

from shira_dist.kernels import build_csr_layout, flat_index, ops
from tests.conftest import random_pattern

OUT, IN, NNZ, T = 12, 10, 30, 5


@pytest.fixture(scope="module")
def calls():
    """(op, args, expected return value, expected first argument after the call), None: unchecked."""
    idx = random_pattern(OUT, IN, NNZ, seed=0, shuffle=False, empty_rows=True)
    layout = build_csr_layout(idx, (OUT, IN))
    col = layout.col.to(torch.int16)  # as a layer stores them
    crow, rows, flat = layout.crow, layout.rows(), flat_index(layout)
    g = torch.Generator().manual_seed(0)
    x, gy, v, w = (torch.randn(*shape, generator=g) for shape in ((T, IN), (T, OUT), (NNZ,), (OUT, IN)))
    dense = torch.zeros(OUT, IN).index_put_((idx[0].long(), idx[1].long()), v)
    w0 = w.flatten()[flat]
    merged = w.flatten().index_add(0, flat, 0.5 * v).view(OUT, IN)
    sampled = (gy.t() @ x)[idx[0].long(), idx[1].long()]
    return [
        (ops.native_spmm, (x, crow, col, v, IN, False, 0.5), 0.5 * x @ dense.t(), None),
        (ops.native_spmm, (gy, crow, col, v, IN, True, 0.5), 0.5 * gy @ dense, None),
        (ops.native_spmm_add_, (gy.clone(), x, crow, col, v, IN, 0.5), None, gy + 0.5 * x @ dense.t()),
        (ops.native_sddmm, (gy, x, crow, col), sampled, None),
        (ops.native_scatter_merge_, (w.clone(), crow, col, v, 0.5), w0, merged),
        (ops.native_scatter_write_, (w.clone(), crow, col, w0, v, 0.5), None, merged),
        (ops.native_scatter_write_, (merged.clone(), crow, col, w0, None, 1.0), None, w),
        (ops.sparse_mm_t, (x, crow, col.int(), v, OUT, IN), x @ dense.t(), None),
        (ops.sparse_sampled_mm, (gy, x, crow, col.int(), IN), sampled, None),
        (ops.triton_spmm_add_, (gy.clone(), x, crow, col, v, 0.5), None, gy + 0.5 * x @ dense.t()),
        (ops.triton_sddmm, (gy, x, crow, rows, col, False), sampled, None),
        (ops.triton_sddmm, (gy, x, crow, rows, col, True), sampled, None),
        (ops.triton_scatter_merge_, (w.clone(), flat, v, 0.5), w0, merged),
        (ops.triton_scatter_restore_, (merged.clone(), flat, w0), None, w),
    ]


@pytest.mark.parametrize("i", range(14))
def test_op_passes_opcheck_and_matches_dense(calls, i):
    op, args, returned, first_arg = calls[i]
    torch.library.opcheck(op.op, args)  # the registered op; eager code calls op.fn directly
    for call in (op.op, op):  # through the dispatcher, and the eager direct call
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in calls[i][1]]
        out = call(*args)
        assert (out is None) == (returned is None)
        if returned is not None:
            torch.testing.assert_close(out, returned, rtol=1e-5, atol=1e-5)
        if first_arg is not None:
            torch.testing.assert_close(args[0], first_arg, rtol=1e-5, atol=1e-5)
