"""Compressed sparse row layouts of a SHiRA pattern, built once per adapter.

A SHiRA adapter of an (out, in) weight is ``indices: (2, nnz) int`` (row 0 = output
index, row 1 = input index, any order, no duplicates) plus ``values: (nnz,)`` in the
same order. The CSR forms below let ``torch.sparse`` multiply without ever building a
dense (out, in) tensor; ``order`` / ``order_t`` map stored order to row-major order of
S and of S^T, so values are gathered (nnz work) rather than re-sorted every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def flat_index(indices: Tensor, in_features: int) -> Tensor:
    """indices: (2, nnz) int -> (nnz,) int64 positions in the row-major flattened weight."""
    return indices[0].long() * in_features + indices[1].long()


@dataclass(frozen=True)
class CsrLayout:
    """CSR of S (out, in) and of S^T (in, out) for one fixed pattern.

    crow: (out+1,) int64, col: (nnz,) int64, order: (nnz,) int64 with
    ``values_rowmajor = values[order]``; the ``_t`` fields are the same for S^T.
    """

    shape: tuple[int, int]
    crow: Tensor
    col: Tensor
    order: Tensor
    crow_t: Tensor
    col_t: Tensor
    order_t: Tensor
    blocks: Optional["DenseBlocks"] = None


@dataclass(frozen=True)
class DenseBlocks:
    """Whole rows and whole columns inside a pattern (SHiRA-Struct), for dense sub-GEMMs.

    Entries of the full rows ``rows`` (R,) are read from ``grad_y[:, rows]^T @ x`` (R, in);
    entries of the full columns ``cols`` (C,) not already in a full row from
    ``grad_y^T @ x[:, cols]`` (out, C); the rest (e.g. the diagonal) stay sparse.

    row_pos/row_rank/row_col: (n_r,) stored positions, their row's rank in ``rows``, column.
    col_pos/col_row/col_rank: (n_c,) stored positions, row, their column's rank in ``cols``.
    rest_pos: (n_rest,) stored positions; rest: CsrLayout of just those entries.
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


def _csr_of(major: Tensor, minor: Tensor, n_major: int, n_minor: int) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.argsort(major * n_minor + minor)
    counts = torch.bincount(major[order], minlength=n_major)
    crow = torch.zeros(n_major + 1, dtype=torch.int64, device=major.device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow, minor[order].contiguous(), order


def build_csr_layout(indices: Tensor, shape: tuple[int, int], find_blocks: bool = True) -> CsrLayout:
    """indices: (2, nnz) int on any device; shape: (out, in).

    With ``find_blocks`` and at least half of the entries in whole rows/columns, the layout
    also carries :class:`DenseBlocks` so the values' gradient uses dense sub-GEMMs there.
    """
    out_f, in_f = shape
    rows, cols = indices[0].long(), indices[1].long()
    crow, col, order = _csr_of(rows, cols, out_f, in_f)
    crow_t, col_t, order_t = _csr_of(cols, rows, in_f, out_f)
    blocks = _find_blocks(rows, cols, crow, crow_t, shape) if find_blocks else None
    return CsrLayout((out_f, in_f), crow, col, order, crow_t, col_t, order_t, blocks)


def _rank_of(selected: Tensor, n: int) -> Tensor:
    rank = torch.full((n,), -1, dtype=torch.int64, device=selected.device)
    rank[selected] = torch.arange(selected.numel(), device=selected.device)
    return rank


def _find_blocks(rows: Tensor, cols: Tensor, crow: Tensor, crow_t: Tensor,
                 shape: tuple[int, int]) -> Optional[DenseBlocks]:
    out_f, in_f = shape
    full_rows = torch.nonzero(crow.diff() == in_f).squeeze(1)
    full_cols = torch.nonzero(crow_t.diff() == out_f).squeeze(1)
    row_rank, col_rank = _rank_of(full_rows, out_f), _rank_of(full_cols, in_f)
    in_row = row_rank[rows] >= 0
    in_col = (col_rank[cols] >= 0) & ~in_row
    if int(in_row.sum() + in_col.sum()) * 2 < rows.numel():
        return None
    row_pos, col_pos = torch.nonzero(in_row).squeeze(1), torch.nonzero(in_col).squeeze(1)
    rest_pos = torch.nonzero(~in_row & ~in_col).squeeze(1)
    rest = None
    if rest_pos.numel():
        rest = build_csr_layout(torch.stack([rows[rest_pos], cols[rest_pos]]), shape, find_blocks=False)
    return DenseBlocks(full_rows, row_pos, row_rank[rows[row_pos]], cols[row_pos],
                       full_cols, col_pos, rows[col_pos], col_rank[cols[col_pos]], rest_pos, rest)
