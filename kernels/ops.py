"""The opaque kernels as ``torch.library`` custom ops (namespace ``shira_dist``), each with a
fake (shape-only) implementation, so ``torch.compile`` traces each call as one node of its
graph instead of breaking the graph at a ctypes call, a Triton launch or a sparse tensor
(ops that return nothing and only write into arguments get torch's own fake).

    native_spmm             inp @ (s*S)^T, or inp @ (s*S) when transposed   cpu_sddmm.py
    native_spmm_add_        out += inp @ (s*S)^T                            cpu_sddmm.py
    native_sddmm            (grad_y^T @ x)[r(k), col[k]]                    cpu_sddmm.py
    native_scatter_merge_   W[idx] = W0[idx] + s*v; returns W0[idx]         cpu_sddmm.py
    native_scatter_write_   W[idx] = saved + s*v, or saved when v is None   cpu_sddmm.py
    triton_spmm_add_        y += s * x @ S^T                                triton_kernels.py
    triton_sddmm            the SDDMM, from gathered rows or blocked tiles  triton_kernels.py
    triton_scatter_merge_   W[flat] = W0[flat] + s*v; returns W0[flat]      triton_kernels.py
    triton_scatter_restore_ W[flat] = saved                                 triton_kernels.py
    sparse_mm_t             x @ A^T for A in CSR                            torch.sparse (MKL, cuSPARSE)
    sparse_sampled_mm       (grad_y^T @ x) at A's pattern                   torch.sparse

A pattern is passed as its CSR tensors (``crow`` (out+1,) int32, ``col`` (nnz,) int16/int32,
row-major); values and results of the sparse side are (nnz,) in row-major order. The ops hold
no autograd formula: the autograd.Functions of sparse_delta.py compose them (choosing dense
blocks, transposed layouts and the compute dtype from the layout, fixed when it was built),
and dynamo traces those Functions whole. Ops named with a trailing ``_`` write into the
arguments their schema marks as mutated and nothing else.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import cpu_sddmm

_PLAIN = (Tensor, nn.Parameter)


class _Op:
    """A custom op that eager code calls as the plain function it wraps.

    Outside a trace the dispatcher adds ~50 us per call, more than the kernel of a small
    layer (a switch of 28 small layers spent a quarter of its time there), and gives nothing
    these ops need: they hold no autograd formula (the autograd.Functions compose them) and
    write only tensors their callers own. Under torch.compile, or with any argument a tensor
    subclass (fake, functional, DTensor), the registered op runs.
    """

    def __init__(self, name: str, mutates_args: tuple, fn) -> None:
        self.fn = fn
        self.op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        self.register_fake = self.op.register_fake

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or any(isinstance(a, Tensor) and type(a) not in _PLAIN for a in args):
            return self.op(*args, **kwargs)
        return self.fn(*args, **kwargs)


def custom_op(name: str, mutates_args: tuple = ()):
    return lambda fn: _Op(name, mutates_args, fn)

# ---- native CPU kernels (cpu_sddmm.py) ----------------------------------------------------


@custom_op("shira_dist::native_spmm", mutates_args=())
def native_spmm(inp: Tensor, crow: Tensor, col: Tensor, values: Tensor, n_cols: int, transposed: bool,
                scale: float) -> Tensor:
    """inp: (T, n_cols) -> (T, n_rows) = inp @ (s*S)^T; transposed: inp (T, n_rows) -> (T, n_cols)."""
    return cpu_sddmm.spmm(inp, crow, col, values, n_cols, transposed=transposed, scale=scale)


native_spmm.register_fake(lambda inp, crow, col, values, n_cols, transposed, scale:
                          inp.new_empty(inp.shape[0], n_cols if transposed else crow.shape[0] - 1))


@custom_op("shira_dist::native_spmm_add_", mutates_args=("out",))
def native_spmm_add_(out: Tensor, inp: Tensor, crow: Tensor, col: Tensor, values: Tensor, n_cols: int,
                     scale: float) -> None:
    """out: (T, n_rows) contiguous += inp (T, n_cols) @ (s*S)^T."""
    cpu_sddmm.spmm(inp, crow, col, values, n_cols, scale=scale, out=out)


@custom_op("shira_dist::native_sddmm", mutates_args=())
def native_sddmm(grad_y: Tensor, x: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """grad_y: (T, out), x: (T, in) -> (nnz,) row-major."""
    return cpu_sddmm.sddmm(grad_y, x, crow, col)


native_sddmm.register_fake(lambda grad_y, x, crow, col: x.new_empty(col.shape[0]))


@custom_op("shira_dist::native_scatter_merge_", mutates_args=("weight",))
def native_scatter_merge_(weight: Tensor, crow: Tensor, col: Tensor, values: Tensor, scale: float) -> Tensor:
    """weight: (out, in) contiguous; values: (nnz,) row-major -> W0's entries (nnz,) row-major."""
    originals = weight.new_empty(col.shape[0])
    cpu_sddmm.scatter_(weight, crow, col, "merge", originals, values, scale)
    return originals


native_scatter_merge_.register_fake(lambda weight, crow, col, values, scale: weight.new_empty(col.shape[0]))


@custom_op("shira_dist::native_scatter_write_", mutates_args=("weight",))
def native_scatter_write_(weight: Tensor, crow: Tensor, col: Tensor, saved: Tensor, values: Optional[Tensor],
                          scale: float) -> None:
    """W[idx] = saved + s*values ("rewrite"), or saved (bit-exact "restore") when values is None."""
    mode = "restore" if values is None else "rewrite"
    cpu_sddmm.scatter_(weight, crow, col, mode, saved, values, scale)


# ---- Triton kernels (triton_kernels.py; imported on first use: Triton is optional) ----------


@custom_op("shira_dist::triton_spmm_add_", mutates_args=("y",))
def triton_spmm_add_(y: Tensor, x: Tensor, crow: Tensor, col: Tensor, values: Tensor, scale: float) -> None:
    """y: (T, out) any strides += s * x (T, in) @ S^T."""
    from . import triton_kernels

    triton_kernels.csr_spmm_add_(y, x, crow, col, values, scale)


@custom_op("shira_dist::triton_sddmm", mutates_args=())
def triton_sddmm(grad_y: Tensor, x: Tensor, crow: Tensor, rows: Tensor, col: Tensor, blocked: bool) -> Tensor:
    """grad_y: (T, out), x: (T, in); rows, col: (nnz,) row-major -> (nnz,) fp32."""
    from . import triton_kernels

    if blocked:
        return triton_kernels.sddmm_blocked(grad_y, x, crow, rows, col)
    return triton_kernels.sddmm(grad_y, x, rows, col)


triton_sddmm.register_fake(lambda grad_y, x, crow, rows, col, blocked:
                           x.new_empty(col.shape[0], dtype=torch.float32))


@custom_op("shira_dist::triton_scatter_merge_", mutates_args=("weight",))
def triton_scatter_merge_(weight: Tensor, flat: Tensor, values: Tensor, scale: float) -> Tensor:
    """weight: (out, in) contiguous, flat: (nnz,) int64 positions -> W0's entries (nnz,)."""
    from . import triton_kernels

    return triton_kernels.scatter_merge(weight, flat, values, scale)


triton_scatter_merge_.register_fake(lambda weight, flat, values, scale: weight.new_empty(flat.shape[0]))


@custom_op("shira_dist::triton_scatter_restore_", mutates_args=("weight",))
def triton_scatter_restore_(weight: Tensor, flat: Tensor, originals: Tensor) -> None:
    from . import triton_kernels

    triton_kernels.scatter_restore(weight, flat, originals)


# ---- torch.sparse (the fallback): CSR tensors live only inside the ops ------------------------


# torch warns once that CSR is "beta" and that invariant checks are off; both are known
# and deliberate here (layouts are built by build_csr_layout, which guarantees them).
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def _csr(crow: Tensor, col: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """torch's CSR tensor (its crow and col share one dtype: an int16 col is widened, a copy)."""
    return torch.sparse_csr_tensor(crow, col.to(crow.dtype), vals, shape, check_invariants=False)


@custom_op("shira_dist::sparse_mm_t", mutates_args=())
def sparse_mm_t(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """x: (T, n_cols) @ A^T for A (n_rows, n_cols) = CSR(crow, col, values) -> (T, n_rows)."""
    return torch.sparse.mm(_csr(crow, col, values, (n_rows, n_cols)), x.t()).t()


# (T, n_rows) stored as the product's (n_rows, T), as the real op returns it
sparse_mm_t.register_fake(lambda x, crow, col, values, n_rows, n_cols: x.new_empty(n_rows, x.shape[0]).t())


@custom_op("shira_dist::sparse_sampled_mm", mutates_args=())
def sparse_sampled_mm(grad_y: Tensor, x: Tensor, crow: Tensor, col: Tensor, n_cols: int) -> Tensor:
    """grad_y: (T, n_rows), x: (T, n_cols) -> (nnz,) ``(grad_y^T @ x)`` at the pattern, row-major."""
    zeros = x.new_zeros(col.shape[0])
    pattern = _csr(crow, col, zeros, (crow.shape[0] - 1, n_cols))
    return torch.sparse.sampled_addmm(pattern, grad_y.t().contiguous(), x, beta=0.0).values()


sparse_sampled_mm.register_fake(lambda grad_y, x, crow, col, n_cols: x.new_empty(col.shape[0]))
