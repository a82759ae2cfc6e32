"""Compressed sparse row layouts of a SHiRA pattern: what the kernels take.

A SHiRA adapter of an (out, in) weight is, in PEFT's form, ``indices: (2, nnz) int`` (row 0 =
output index, row 1 = input index, any order, no duplicates) plus ``values: (nnz,)`` in the
same order. The kernels take the pattern as CSR instead: ``crow`` (out+1,) and ``col`` (nnz,)
in row-major order, plus ``order`` (nnz,) only when the stored order is not row-major
(``values_rowmajor = values[order]``). That is also how ``ShiraLinear`` stores it
(shira_dist/patterns.py): 4 bytes per entry instead of PEFT's 8, since the row of each entry
follows from ``crow``; masks are generated row-major, so ``order`` is normally absent.

Indices are int32 (int64 only past 2^31 entries or features). The CSR of S^T, needed only by
the torch.sparse fallback of the unfused backward's grad_x, is built on first use
(:meth:`CsrLayout.transposed`); the native CPU kernels read S's rows both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

_INT32_MAX = 2**31 - 1


def index_dtype(nnz: int, shape: tuple[int, ...]) -> torch.dtype:
    """int32 when every index and CSR offset fits, else int64."""
    return torch.int32 if max(nnz, *shape) <= _INT32_MAX else torch.int64


def compress_indices(indices: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """indices: (2, nnz) int, in range, any order -> (crow (out+1,), col (nnz,), order (nnz,) or None).

    ``col`` is in row-major order; ``order[j]`` is the stored position of the j-th row-major
    entry (None when the indices already are row-major). Raises ``ValueError`` on duplicates.
    """
    out_f, in_f = shape
    nnz = indices.shape[1]
    dt = index_dtype(nnz, shape)
    idx = indices.to(dt)  # a no-op (no copy) for int32 indices
    key = idx[0].long() * in_f + idx[1].long()
    order = None
    if nnz > 1 and not bool((key[1:] > key[:-1]).all()):
        order = torch.argsort(key)
        key = key[order]
        if bool((key[1:] == key[:-1]).any()):
            k = int(key[:-1][key[1:] == key[:-1]][0])
            raise ValueError(f"indices hold the entry ({k // in_f}, {k % in_f}) more than once; "
                             "a SHiRA pattern has distinct entries")
        order = order.to(dt)
    col = idx[1].contiguous() if order is None else idx[1][order]
    row = idx[0] if order is None else idx[0][order]
    return _crow(row, out_f, dt), col, order


def row_ids(crow: Tensor, nnz: Optional[int] = None) -> Tensor:
    """crow: (n_rows+1,) -> (nnz,) the row of each row-major entry (same dtype). Pass ``nnz``
    (= crow[-1]) when known: reading it from a CUDA crow waits for the device."""
    n_rows = crow.numel() - 1
    rows = torch.arange(n_rows, dtype=crow.dtype, device=crow.device)
    size = int(crow[-1]) if nnz is None else nnz
    return torch.repeat_interleave(rows, (crow[1:] - crow[:-1]).long(), output_size=size)


def expand_indices(crow: Tensor, col: Tensor, order: Optional[Tensor]) -> Tensor:
    """Inverse of :func:`compress_indices`: (2, nnz) indices in the stored order (a new tensor)."""
    rowmajor = torch.stack([row_ids(crow, col.shape[0]), col.to(crow.dtype)])
    if order is None:
        return rowmajor
    out = torch.empty_like(rowmajor)
    out[:, order.long()] = rowmajor
    return out


def flat_index(layout: "CsrLayout") -> Tensor:
    """(nnz,) int64 positions of the layout's entries in the flattened weight, row-major order."""
    return row_ids(layout.crow, layout.nnz).long() * layout.shape[1] + layout.col.long()


@dataclass(eq=False)
class CsrLayout:
    """CSR of S (n_rows, n_cols) for one fixed pattern.

    crow: (n_rows+1,), col: (nnz,) column of each entry in row-major order, order: (nnz,) with
    ``values_rowmajor = values[order]``, or None when the stored order already is row-major.
    int32 (int64 only for > 2^31 entries or features); ``col`` may be int16 (a layer's stored
    pattern when n_cols <= 2^15). Rows of entries are not stored (:meth:`rows` computes them
    for the paths that want them).
    """

    shape: tuple[int, int]
    crow: Tensor
    col: Tensor
    order: Optional[Tensor]
    blocks: Optional["DenseBlocks"] = None
    _t: Optional["CsrLayout"] = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        return self.col.shape[0]

    def rows(self) -> Tensor:
        """(nnz,) the row of each row-major entry: computed, not kept."""
        return row_ids(self.crow, self.nnz)

    def indices(self) -> Tensor:
        """(2, nnz) indices in the stored order (PEFT's form): computed, not kept."""
        return expand_indices(self.crow, self.col, self.order)

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
            row = self.rows()
            perm = torch.argsort(self.col.long() * n_rows + row.long())  # row-major of S -> of S^T
            order = perm if self.order is None else self.order[perm]
            dt = self.crow.dtype
            self._t = CsrLayout((n_cols, n_rows), _crow(self.col[perm].long(), n_cols, dt), row[perm], order.to(dt))
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


def csr_layout(shape: tuple[int, int], crow: Tensor, col: Tensor, order: Optional[Tensor],
               find_blocks: bool = True) -> CsrLayout:
    """A layout over already compressed tensors (no copies), e.g. a layer's stored pattern.

    ``col``: (nnz,) int, or int16 columns stored as (2*nnz,) uint8 bytes (viewed as int16).
    With ``find_blocks`` and at least half of the entries in whole rows/columns, the layout
    also carries :class:`DenseBlocks` so the values' gradient uses dense sub-GEMMs there.
    """
    if col.dtype == torch.uint8:
        col = col.view(torch.int16)
    layout = CsrLayout(tuple(shape), crow, col, order)
    if find_blocks and layout.nnz and _has_whole_line(crow, layout.col, shape):
        layout.blocks = _find_blocks(expand_indices(crow, layout.col, order), shape)
    return layout


def _has_whole_line(crow: Tensor, col: Tensor, shape: tuple[int, int]) -> bool:
    """Whether some row or column of the pattern is full: cheap (row lengths from ``crow``, one
    count of the columns), so patterns without any (e.g. random masks) skip :func:`_find_blocks`."""
    out_f, in_f = shape
    if int((crow[1:] - crow[:-1]).max()) == in_f:
        return True
    return int(torch.bincount(col.long(), minlength=in_f).max()) == out_f


def build_csr_layout(indices: Tensor, shape: tuple[int, int], find_blocks: bool = True) -> CsrLayout:
    """indices: (2, nnz) int on any device, distinct entries; shape: (out, in). See :func:`csr_layout`."""
    return csr_layout(shape, *compress_indices(indices, shape), find_blocks=find_blocks)


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
