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
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .blocks import DenseBlocks

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
    blocks: Optional["DenseBlocks"] = None  # whole rows/columns (struct masks), see blocks.py
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
        """The CSR of S^T (n_cols, n_rows), ``order`` relative to the stored values; built once, kept
        (inside a compiled graph it is a value of that graph, so it is computed there, not kept)."""
        if self._t is not None:
            return self._t
        n_rows, n_cols = self.shape
        row = self.rows()
        perm = torch.argsort(self.col.long() * n_rows + row.long())  # row-major of S -> of S^T
        order = perm if self.order is None else self.order[perm]
        dt = self.crow.dtype
        t = CsrLayout((n_cols, n_rows), _crow(self.col[perm].long(), n_cols, dt), row[perm], order.to(dt))
        if not torch.compiler.is_compiling():
            self._t = t
        return t


def _crow(major_sorted: Tensor, n_major: int, dtype: torch.dtype) -> Tensor:
    """(n_major+1,) where each major index's run starts in ``major_sorted`` (nnz,) ascending; every
    shape is known before the data (a compiled graph traces it)."""
    starts = torch.arange(n_major + 1, dtype=major_sorted.dtype, device=major_sorted.device)
    return torch.searchsorted(major_sorted, starts).to(dtype)


def csr_layout(shape: tuple[int, int], crow: Tensor, col: Tensor, order: Optional[Tensor],
               find_blocks: bool = True) -> CsrLayout:
    """A layout over already compressed tensors (no copies), e.g. a layer's stored pattern.

    ``col``: (nnz,) int, or int16 columns stored as (2*nnz,) uint8 bytes (viewed as int16).
    With ``find_blocks`` and at least half of the entries in whole rows/columns, the layout
    also carries :class:`DenseBlocks` so the values' gradient uses dense sub-GEMMs there.
    Finding them reads the pattern's data (whole rows, counts per column), which a compiled
    graph cannot do: layouts are made when a pattern is, and forwards only read them.
    """
    if col.dtype == torch.uint8:
        col = col.view(torch.int16)
    layout = CsrLayout(tuple(shape), crow, col, order)
    if find_blocks:
        from .blocks import dense_blocks

        layout.blocks = dense_blocks(layout)
    return layout


def build_csr_layout(indices: Tensor, shape: tuple[int, int], find_blocks: bool = True) -> CsrLayout:
    """indices: (2, nnz) int on any device, distinct entries; shape: (out, in). See :func:`csr_layout`."""
    return csr_layout(shape, *compress_indices(indices, shape), find_blocks=find_blocks)
