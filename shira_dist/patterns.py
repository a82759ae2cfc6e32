"""Stored SHiRA patterns: each adapter's indices kept as CSR buffers, read as PEFT's (2, nnz).

PEFT keeps ``shira_indices[name]`` = (2, nnz) int32 indices (row 0 = output index, row 1 =
input index): 8 bytes per entry, on every rank. A layer here registers, per adapter,

    crow  (out+1,) int32   where each row's entries start
    col   (2*nnz,) uint8   their columns, row-major: int16 values kept as bytes, because gloo and
                           NCCL cannot broadcast int16 (DDP and DeepSpeed broadcast buffers);
                           (nnz,) int32 for weights with in > 2^15
    order (nnz,)   int32   only when the given indices were not row-major (values_rowmajor = values[order])

i.e. 2 bytes per entry (masks are generated row-major, so ``order`` is normally absent), and
the kernels use these buffers directly as their :class:`~shira_dist.kernels.CsrLayout`.
PEFT's form appears wherever a user or a file sees indices: ``layer.shira_indices[name]`` is
a fresh (2, nnz) tensor in the stored order, ``state_dict()`` holds it under
``<prefix>shira_indices.<name>``, and ``load_state_dict`` takes it back.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .kernels import CsrLayout, compress_indices, csr_layout, expand_indices
from .masks import validate_indices


_INT16_LIMIT = 2**15  # in_features up to this: every column index fits an int16


def _own(t: Tensor) -> Tensor:
    """``t`` itself if it owns exactly its storage, else a compact copy."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


class SparsePattern(nn.Module):
    """One adapter's pattern of an (out, in) weight, as buffers ``crow``, ``col`` (and ``order``)."""

    def __init__(self, indices: Tensor, shape: tuple[int, int], where: str = "layer") -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.where = where
        self.set_(indices)

    @property
    def nnz(self) -> int:
        return self.columns().shape[0]

    def columns(self) -> Tensor:
        """(nnz,) int16 or int32 column of each row-major entry (a view of the ``col`` buffer)."""
        return self.col.view(torch.int16) if self.col.dtype == torch.uint8 else self.col

    def set_(self, indices: Tensor) -> None:
        """Replace the pattern by ``indices`` (2, nnz) int (validated; distinct entries)."""
        validate_indices(indices, self.shape, self.where)
        try:
            crow, col, order = compress_indices(indices, self.shape)
        except ValueError as e:
            raise ValueError(f"shira_indices for {self.where}: {e}") from None
        device = self.col.device if "col" in self._buffers else indices.device
        col = col.to(device)
        if self.shape[1] <= _INT16_LIMIT:
            col = col.to(torch.int16).view(torch.uint8)
        self.register_buffer("crow", _own(crow.to(device)))
        self.register_buffer("col", _own(col))  # not a view keeping all of ``indices`` alive
        self.register_buffer("order", None if order is None else _own(order.to(device)))

    def indices(self) -> Tensor:
        """(2, nnz) int indices in the stored order (a new tensor)."""
        return expand_indices(self.crow, self.columns(), self.order)

    @torch.no_grad()
    def broadcast_(self, src: int, group: Optional[dist.ProcessGroup] = None,
                   device: Optional[torch.device] = None) -> None:
        """Adopt rank ``src``'s pattern (collective; ``device``: where the backend communicates).

        Sent as (2, nnz) indices, whose shape every rank knows, so ranks whose patterns differ
        (even in whether they are row-major) end up with identical buffers.
        """
        indices = self.indices().to(device or self.col.device)
        dist.broadcast(indices, src=src, group=group)
        self.set_(indices.to(self.col.device))

    def layout(self) -> CsrLayout:
        """The kernels' view of these buffers (no copies)."""
        return csr_layout(self.shape, self.crow, self.columns(), self.order)

    def tensors(self) -> list[Tensor]:
        """The stored buffers (for in-place broadcasts and checksums)."""
        return [t for t in (self.crow, self.col, self.order) if t is not None]

    def stamp(self) -> tuple:
        """Changes whenever a buffer is replaced or written in place."""
        return tuple((t.data_ptr(), t.device, t._version) for t in self.tensors())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}, row_major={self.order is None}"


class PatternDict(nn.Module):
    """Adapter name -> :class:`SparsePattern`; reads and ``state_dict()`` give PEFT's (2, nnz) indices."""

    def __init__(self, shape: tuple[int, int], where: str = "layer") -> None:
        super().__init__()
        self.shape = shape
        self.where = where
        self.patterns = nn.ModuleDict()
        self.register_state_dict_post_hook(_indices_to_state_dict)
        self.register_load_state_dict_pre_hook(_indices_from_state_dict)

    def __setitem__(self, name: str, indices: Tensor) -> None:
        self.patterns[name] = SparsePattern(indices, self.shape, f"{self.where} adapter {name!r}")

    def __getitem__(self, name: str) -> Tensor:
        """(2, nnz) int32 indices of adapter ``name`` in the stored order (a new tensor)."""
        return self.patterns[name].indices()

    def __delitem__(self, name: str) -> None:
        del self.patterns[name]

    def __contains__(self, name: object) -> bool:
        return name in self.patterns

    def __len__(self) -> int:
        return len(self.patterns)

    def __iter__(self) -> Iterator[str]:
        return iter(self.patterns)

    def keys(self):
        return self.patterns.keys()

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return ((name, p.indices()) for name, p in self.patterns.items())

    def pattern(self, name: str) -> SparsePattern:
        return self.patterns[name]


def _indices_to_state_dict(module: PatternDict, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: ``<prefix>patterns.<name>.{crow,col,order}`` -> ``<prefix><name>`` (2, nnz)."""
    for name, pattern in module.patterns.items():
        keys = [f"{prefix}patterns.{name}.{buffer}" for buffer, _ in pattern.named_buffers()]
        if not all(key in state_dict for key in keys):
            continue
        for key in keys:
            del state_dict[key]
        state_dict[prefix + name] = pattern.indices()


def _indices_from_state_dict(module: PatternDict, state_dict: dict, prefix: str, local_metadata: dict,
                             strict: bool, missing: list, unexpected: list, errors: list) -> None:
    """load_state_dict pre-hook: ``<prefix><name>`` (2, nnz) -> that pattern's buffers."""
    for name, pattern in module.patterns.items():
        indices: Optional[Tensor] = state_dict.pop(prefix + name, None)
        if indices is None:
            continue
        if indices.dim() != 2 or indices.shape[0] != 2 or indices.shape[1] != pattern.nnz:
            errors.append(f"size mismatch for {prefix}{name}: (2, {pattern.nnz}) indices expected, "
                          f"got {tuple(indices.shape)}")
            continue
        try:
            pattern.set_(indices.to(pattern.col.device))
        except ValueError as e:
            errors.append(str(e))
            continue
        inner = f"{prefix}patterns.{name}."
        for key, t in pattern.named_buffers():
            state_dict[inner + key] = t
