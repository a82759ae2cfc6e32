"""Compressed sparse row layouts of a SHiRA pattern, built once per adapter.

A SHiRA adapter of an (out, in) weight is ``indices: (2, nnz) int`` (row 0 = output
index, row 1 = input index, any order, no duplicates) plus ``values: (nnz,)`` in the
same order. The CSR form below lets ``torch.sparse`` and the kernels multiply without ever
building a dense (out, in) tensor.

Memory: the layout adds as little as possible to the indices it is built from. Indices are
int32 (int64 only past 2^31 entries or features). Masks are generated row-major sorted; then
``order`` is None (identity: no gather of the values, no copy) and ``row``/``col`` are views of
the stored indices, so a layout costs only ``crow`` (out+1 ints). The CSR of S^T, needed only
by the unfused backward's grad_x, is built on first use (:meth:`CsrLayout.transposed`):
4+4 more bytes per nnz (``col``, ``order``; its ``row`` is a view).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

_INT32_MAX = 2**31 - 1


def flat_index(indices: Tensor, in_features: int) -> Tensor:
    """indices: (2, nnz) int -> (nnz,) int64 positions in the row-major flattened weight."""
    return indices[0].long() * in_features + indices[1].long()


def index_dtype(nnz: int, shape: tuple[int, ...]) -> torch.dtype:
    """int32 when every index and CSR offset fits, else int64."""
    return torch.int32 if max(nnz, *shape) <= _INT32_MAX else torch.int64


@dataclass(eq=False)
class CsrLayout:
    """CSR of S (n_rows, n_cols) for one fixed pattern.

    crow: (n_rows+1,), row/col: (nnz,) row and column of each entry in row-major order,
    order: (nnz,) with ``values_rowmajor = values[order]``, or None when the stored order
    already is row-major. All int32 (int64 only for > 2^31 entries or features). ``row`` is
    None in the transposed layout (only the SDDMM of S reads it; crow has the same facts).
    """

    shape: tuple[int, int]
    crow: Tensor
    row: Optional[Tensor]
    col: Tensor
    order: Optional[Tensor]
    blocks: Optional["DenseBlocks"] = None
    _t: Optional["CsrLayout"] = field(default=None, repr=False)

    def rowmajor(self, values: Tensor) -> Tensor:
        """values: (nnz,) in stored order -> (nnz,) in row-major order (no copy if already so)."""
        return values if self.order is None else values[self.order]

    def from_rowmajor(self, values_rowmajor: Tensor) -> Tensor:
        """Inverse of :meth:`rowmajor`: (nnz,) row-major -> (nnz,) stored order."""
        if self.order is None:
            return values_rowmajor
        out = torch.empty_like(values_rowmajor)
        out[self.order] = values_rowmajor
        return out

    def transposed(self) -> "CsrLayout":
        """The CSR of S^T (n_cols, n_rows), ``order`` relative to the stored values; built once, kept."""
        if self._t is None:
            n_rows, n_cols = self.shape
            perm = torch.argsort(self.col.long() * n_rows + self.row.long())  # row-major of S -> of S^T
            order = perm if self.order is None else self.order[perm]
            dt = self.col.dtype
            self._t = CsrLayout((n_cols, n_rows), _crow(self.col[perm], n_cols, dt), None, self.row[perm],
                                order.to(dt))
        return self._t


@dataclass(frozen=True)
class DenseBlocks:
    """Whole rows and whole columns inside a pattern (SHiRA-Struct), for dense sub-GEMMs.

    Entries of the full rows ``rows`` (R,) are read from ``grad_y[:, rows]^T @ x`` (R, in);
    entries of the full columns ``cols`` (C,) not already in a full row from
    ``grad_y^T @ x[:, cols]`` (out, C); the rest (e.g. the diagonal) stay sparse.

    row_pos/row_rank/row_col: (n_r,) stored positions, their row's rank in ``rows``, column.
    col_pos/col_row/col_rank: (n_c,) stored positions, row, their column's rank in ``cols``.
    rest_pos: (n_rest,) stored positions; rest: CsrLayout of just those entries.
    All index tensors have the layout's index dtype (int32 unless huge).
    """

    rows: Tensor
    row_pos: Tensor
    row_rank: Tensor
    row_col: Tensor
    cols: Tensor
    col_pos: Tensor
    col_row: Tensor
    col_rank: Tensor
    rest_pos: Tensor
    rest: Optional[CsrLayout]


def _crow(major_sorted: Tensor, n_major: int, dtype: torch.dtype) -> Tensor:
    crow = torch.zeros(n_major + 1, dtype=dtype, device=major_sorted.device)
    crow[1:] = torch.cumsum(torch.bincount(major_sorted, minlength=n_major), 0)
    return crow


def build_csr_layout(indices: Tensor, shape: tuple[int, int], find_blocks: bool = True) -> CsrLayout:
    """indices: (2, nnz) int on any device; shape: (out, in).

    With ``find_blocks`` and at least half of the entries in whole rows/columns, the layout
    also carries :class:`DenseBlocks` so the values' gradient uses dense sub-GEMMs there.
    """
    out_f, in_f = shape
    nnz = indices.shape[1]
    dt = index_dtype(nnz, shape)
    idx = indices.to(dt)  # a no-op (no copy) for the usual int32 indices
    key = idx[0].long() * in_f + idx[1].long()
    if nnz < 2 or bool((key[1:] > key[:-1]).all()):  # already row-major: views, no order
        order, row, col = None, idx[0].contiguous(), idx[1].contiguous()
    else:
        perm = torch.argsort(key)
        order, row, col = perm.to(dt), idx[0][perm], idx[1][perm]
    blocks = _find_blocks(idx, shape) if find_blocks else None
    return CsrLayout((out_f, in_f), _crow(row, out_f, dt), row, col, order, blocks)


def _rank_of(selected: Tensor, n: int) -> Tensor:
    rank = torch.full((n,), -1, dtype=torch.int64, device=selected.device)
    rank[selected] = torch.arange(selected.numel(), device=selected.device)
    return rank


def _find_blocks(idx: Tensor, shape: tuple[int, int]) -> Optional[DenseBlocks]:
    out_f, in_f = shape
    rows, cols = idx[0].long(), idx[1].long()
    full_rows = torch.nonzero(torch.bincount(rows, minlength=out_f) == in_f).squeeze(1)
    full_cols = torch.nonzero(torch.bincount(cols, minlength=in_f) == out_f).squeeze(1)
    row_rank, col_rank = _rank_of(full_rows, out_f), _rank_of(full_cols, in_f)
    in_row = row_rank[rows] >= 0
    in_col = (col_rank[cols] >= 0) & ~in_row
    if int(in_row.sum() + in_col.sum()) * 2 < rows.numel():
        return None
    row_pos, col_pos = torch.nonzero(in_row).squeeze(1), torch.nonzero(in_col).squeeze(1)
    rest_pos = torch.nonzero(~in_row & ~in_col).squeeze(1)
    rest = None
    if rest_pos.numel():
        rest = build_csr_layout(idx[:, rest_pos], shape, find_blocks=False)
    dt = idx.dtype
    fields = (full_rows, row_pos, row_rank[rows[row_pos]], cols[row_pos],
              full_cols, col_pos, rows[col_pos], col_rank[cols[col_pos]], rest_pos)
    return DenseBlocks(*(f.to(dt) for f in fields), rest)
