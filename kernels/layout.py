"""Compressed sparse row layouts of a SHiRA pattern, built once per adapter.

A SHiRA adapter of an (out, in) weight is ``indices: (2, nnz) int`` (row 0 = output
index, row 1 = input index, any order, no duplicates) plus ``values: (nnz,)`` in the
same order. The CSR forms below let ``torch.sparse`` multiply without ever building a
dense (out, in) tensor; ``order`` / ``order_t`` map stored order to row-major order of
S and of S^T, so values are gathered (nnz work) rather than re-sorted every step.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _csr_of(major: Tensor, minor: Tensor, n_major: int, n_minor: int) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.argsort(major * n_minor + minor)
    counts = torch.bincount(major[order], minlength=n_major)
    crow = torch.zeros(n_major + 1, dtype=torch.int64, device=major.device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow, minor[order].contiguous(), order


def build_csr_layout(indices: Tensor, shape: tuple[int, int]) -> CsrLayout:
    """indices: (2, nnz) int on any device; shape: (out, in)."""
    out_f, in_f = shape
    rows, cols = indices[0].long(), indices[1].long()
    crow, col, order = _csr_of(rows, cols, out_f, in_f)
    crow_t, col_t, order_t = _csr_of(cols, rows, in_f, out_f)
    return CsrLayout((out_f, in_f), crow, col, order, crow_t, col_t, order_t)
