"""Whole rows and columns inside a pattern (SHiRA-Struct): the values' gradient takes them
from dense sub-GEMMs (see sparse_delta.sddmm) instead of one sparse dot product per entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .layout import CsrLayout, build_csr_layout, expand_indices


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


def dense_blocks(layout: CsrLayout) -> Optional[DenseBlocks]:
    """The layout's :class:`DenseBlocks` when at least half of its entries lie in whole rows or
    columns, else None (a random pattern has none: found by a cheap pre-check)."""
    if not layout.nnz or not _has_whole_line(layout.crow, layout.col, layout.shape):
        return None
    return _find_blocks(expand_indices(layout.crow, layout.col, layout.order), layout.shape)


def _has_whole_line(crow: Tensor, col: Tensor, shape: tuple[int, int]) -> bool:
    """Whether some row or column of the pattern is full: cheap (row lengths from ``crow``, one
    count of the columns), so patterns without any (e.g. random masks) skip :func:`_find_blocks`."""
    out_f, in_f = shape
    if int((crow[1:] - crow[:-1]).max()) == in_f:
        return True
    return int(torch.bincount(col.long(), minlength=in_f).max()) == out_f


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
