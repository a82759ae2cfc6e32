"""Stored SHiRA patterns: one form inside the library (CSR), PEFT's (2, nnz) indices outside.

PEFT keeps ``shira_indices[name]`` = (2, nnz) int32 indices (row 0 = output index, row 1 =
input index): 8 bytes per entry. A layer here registers, per adapter, the buffers

    crow  (out+1,) int32   where each row's entries start
    col   (2*nnz,) uint8   their columns, row-major, as the bytes of int16 values (NCCL has no
                           int16, and DDP broadcasts buffers); (nnz,) int32 when in > 2^15
    order (nnz,)   int32   only when the given indices were not row-major (values_rowmajor = values[order])

i.e. 2 bytes per entry (masks are generated row-major, so ``order`` is normally absent).
Patterns are built once, at the boundary (:func:`make_pattern`: from a mask, PEFT's indices
or a sampler's CSR), and change only through :meth:`SparsePattern.set_` (loading, broadcasting).
PEFT's form appears wherever a user or a file sees indices: ``layer.shira_indices[name]`` is
a fresh (2, nnz) tensor in the stored order, ``state_dict()`` holds it under
``<prefix>shira_indices.<name>``, and ``load_state_dict`` takes it back.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .kernels import CsrLayout, compress_indices, csr_layout, expand_indices
from .masks import mask_to_indices, validate_indices

_INT16_LIMIT = 2**15  # in_features up to this: every column index fits an int16


def _own(t: Tensor) -> Tensor:
    """``t`` itself if it owns exactly its storage, else a compact copy."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


class SparsePattern(nn.Module):
    """One adapter's pattern of an (out, in) weight: buffers ``crow``, ``col`` (and ``order``).

    Build it with :func:`make_pattern`. Its kernels' view (:meth:`layout`) is made whenever the
    buffers are (built, replaced by :meth:`set_` / :meth:`copy_`, moved by ``.to()``), never
    in a forward: finding whole rows reads the pattern's data, which a compiled graph cannot.
    """

    def __init__(self, shape: tuple[int, int], crow: Tensor, col: Tensor, order: Optional[Tensor] = None) -> None:
        """crow (out+1,), col (nnz,) int in row-major order, order (nnz,) or None; trusted
        (use :func:`make_pattern` for anything not made by this library)."""
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self._store(crow, col, order, col.device)

    @property
    def nnz(self) -> int:
        return self.col.numel() // 2 if self.col.dtype == torch.uint8 else self.col.numel()

    def columns(self) -> Tensor:
        """(nnz,) int16 or int32 column of each row-major entry (a view of the ``col`` buffer)."""
        return self.col.view(torch.int16) if self.col.dtype == torch.uint8 else self.col

    def _store(self, crow: Tensor, col: Tensor, order: Optional[Tensor], device: torch.device) -> None:
        col = col.to(device)
        if self.shape[1] <= _INT16_LIMIT:
            col = col.to(torch.int16).view(torch.uint8)
        self.register_buffer("crow", _own(crow.to(device)))
        self.register_buffer("col", _own(col))  # not a view keeping all of the given indices alive
        self.register_buffer("order", None if order is None else _own(order.to(device)))
        self._layout = self._new_layout()

    def set_(self, indices: Tensor, where: str = "pattern") -> None:
        """Replace the pattern by ``indices`` (2, nnz) int (validated; distinct entries)."""
        validate_indices(indices, self.shape, where)
        try:
            crow, col, order = compress_indices(indices, self.shape)
        except ValueError as e:
            raise ValueError(f"shira_indices for {where}: {e}") from None
        self._store(crow, col, order, self.col.device)

    @torch.no_grad()
    def copy_(self, indices: Tensor, where: str = "pattern") -> None:
        """Replace the pattern by ``indices`` (2, nnz) in place where the stored form allows (same
        buffers, e.g. for a compiled model), else as :meth:`set_` does."""
        validate_indices(indices, self.shape, where)
        try:
            crow, col, order = compress_indices(indices, self.shape)
        except ValueError as e:
            raise ValueError(f"shira_indices for {where}: {e}") from None
        if order is not None or self.order is not None or col.numel() != self.nnz:
            self._store(crow, col, order, self.col.device)
            return
        self.crow.copy_(crow)
        self.columns().copy_(col)
        self._layout = self._new_layout()  # derived data (dense blocks) follows the new entries

    def indices(self) -> Tensor:
        """(2, nnz) int indices in the stored order (a new tensor)."""
        return expand_indices(self.crow, self.columns(), self.order)

    def layout(self) -> CsrLayout:
        """The kernels' view of these buffers (no copies)."""
        if self._layout is None:
            raise RuntimeError(f"a pattern on the {self.col.device.type} device has no layout; move it to the "
                               "device its layer computes on")
        return self._layout

    def _new_layout(self) -> Optional[CsrLayout]:
        """The kernels' view of the buffers as they are now (None on the meta device: no data)."""
        if self.col.device.type == "meta":
            return None
        return csr_layout(self.shape, self.crow, self.col, self.order)

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._layout = self._new_layout()  # the buffers were replaced (moved, converted)
        return out

    def __getstate__(self) -> dict:  # pickling: the buffers only (the layout views them as int16)
        return {**self.__dict__, "_layout": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._layout = self._new_layout()

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

    def tensors(self) -> list[Tensor]:
        """The stored tensors (for checksums)."""
        return [t for t in (self.crow, self.col, self.order) if t is not None]

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}, row_major={self.order is None}"


def make_pattern(shape: tuple[int, int], nnz: int, where: str, mask: Optional[Tensor] = None,
                 indices: Optional[Tensor] = None, csr: Optional[tuple[Tensor, Tensor]] = None) -> SparsePattern:
    """The one way into a :class:`SparsePattern`, from exactly one of:

    mask     (out, in) 0/1, dense or sparse COO, with ``nnz`` ones (a mask function's output);
    indices  (2, nnz) int, PEFT's form (a checkpoint's), any order, distinct;
    csr      (crow (out+1,), col (nnz,)) from shira_dist's own sampler (random_csr): row-major
             and distinct by construction, so not re-validated.
    """
    if sum(t is not None for t in (mask, indices, csr)) != 1:
        raise ValueError(f"{where}: give exactly one of mask, indices or csr")
    if csr is not None:
        crow, col = csr
        if crow.shape != (shape[0] + 1,) or col.shape != (nnz,):
            raise ValueError(f"{where}: a csr pattern of shapes {tuple(crow.shape)}, {tuple(col.shape)} does not fit "
                             f"{tuple(shape)} with nnz={nnz} (crow (out+1,), col (nnz,) expected)")
        return SparsePattern(shape, crow, col)
    if mask is not None:
        indices = mask_to_indices(mask, shape, nnz, where)
    else:
        validate_indices(indices, shape, where)
        if indices.shape[1] != nnz:
            raise ValueError(f"{where} has {indices.shape[1]} indices, expected r*(in+out)={nnz}")
    try:
        crow, col, order = compress_indices(indices, shape)
    except ValueError as e:
        raise ValueError(f"shira_indices for {where}: {e}") from None
    return SparsePattern(shape, crow, col, order)


class PatternDict(nn.Module):
    """Adapter name -> :class:`SparsePattern`; reads and ``state_dict()`` give PEFT's (2, nnz) indices."""

    def __init__(self, where: str = "layer") -> None:
        super().__init__()
        self.where = where
        self.patterns = nn.ModuleDict()
        self.register_state_dict_post_hook(_indices_to_state_dict)
        self.register_load_state_dict_pre_hook(_indices_from_state_dict)
        self.register_load_state_dict_post_hook(_missing_as_indices)

    def __getattr__(self, name: str):
        """``shira_indices.<adapter>`` as an attribute too: tools that resolve state_dict keys
        as attribute paths (torch.distributed.checkpoint, FSDP2's full state dict) find it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            patterns = self._modules.get("patterns")
            if patterns is not None and name in patterns:
                return patterns[name].indices()
            raise

    def __setitem__(self, name: str, pattern: SparsePattern) -> None:
        self.patterns[name] = pattern

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
        for key, _ in pattern.named_buffers():
            state_dict.pop(f"{prefix}patterns.{name}.{key}", None)
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
            pattern.set_(indices.to(pattern.col.device), f"{module.where} adapter {name!r}")
        except ValueError as e:
            errors.append(str(e))
            continue
        for key, t in pattern.named_buffers():
            state_dict[f"{prefix}patterns.{name}.{key}"] = t


_PATTERN_BUFFER = re.compile(r"^(.*)patterns\.([^.]+)\.(?:crow|col|order)$")


def _missing_as_indices(module: PatternDict, incompatible) -> None:
    """load_state_dict post-hook: a missing pattern is reported under its state_dict key
    ``<prefix><name>``, not as the buffers behind it."""
    keys, seen = [], set()
    for key in incompatible.missing_keys:
        match = _PATTERN_BUFFER.match(key)
        key = f"{match.group(1)}{match.group(2)}" if match else key
        if key not in seen:
            seen.add(key)
            keys.append(key)
    incompatible.missing_keys[:] = keys
