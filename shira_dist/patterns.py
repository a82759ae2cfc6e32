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
Under DeepSpeed ZeRO-3 and FSDP2, ``col`` (nearly all of a pattern's bytes) becomes a frozen
parameter that the engine shards like the base weights (shira_dist/distributed/zero.py and
fsdp.py): each rank then keeps 1/world of it, whole only while its layer runs forward or
backward (ZeRO-3), or only around its own sparse product (FSDP2: the pattern is a unit of its
own, see :meth:`SparsePattern.whole`), and inside ``shira_dist.distributed.whole_patterns``.
PEFT's form appears wherever a user or a file sees indices: ``layer.shira_indices[name]`` is
a fresh (2, nnz) tensor in the stored order, ``state_dict()`` holds it under
``<prefix>shira_indices.<name>``, and ``load_state_dict`` takes it back.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .kernels import CsrLayout, compress_indices, csr_layout, expand_indices
from .masks import validate_indices
from .partitioned import full_numel, is_partitioned


_INT16_LIMIT = 2**15  # in_features up to this: every column index fits an int16


def _own(t: Tensor) -> Tensor:
    """``t`` itself if it owns exactly its storage, else a compact copy."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _engine_sharded(t: Tensor) -> bool:
    """A ZeRO-3 partitioned parameter or an FSDP2 DTensor: the engine owns its data."""
    return is_partitioned(t) or isinstance(t, DTensor)


class SparsePattern(nn.Module):
    """One adapter's pattern of an (out, in) weight, as buffers ``crow``, ``col`` (and ``order``)."""

    def __init__(self, indices: Optional[Tensor], shape: tuple[int, int], where: str = "layer",
                 csr: Optional[tuple[Tensor, Tensor]] = None) -> None:
        """From ``indices`` (2, nnz) int (validated), or from ``csr`` = (crow (out+1,), col (nnz,))
        int, row-major, trusted as a pattern (e.g. :func:`shira_dist.masks.random_csr`'s)."""
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.where = where
        self._whole_depth = 0  # open whole() blocks
        if (indices is None) == (csr is None):
            raise ValueError(f"{where}: give a pattern's indices or its csr, exactly one")
        if csr is None:
            self.set_(indices)
            return
        crow, col = csr
        if crow.shape != (self.shape[0] + 1,) or col.dim() != 1:
            raise ValueError(f"{where}: csr of shapes {tuple(crow.shape)}, {tuple(col.shape)} does not fit a "
                             f"{self.shape} pattern (crow (out+1,), col (nnz,) expected)")
        self._store(crow, col, None, col.device)

    @property
    def nnz(self) -> int:
        n = full_numel(self.col)
        return n // 2 if self.col.dtype == torch.uint8 else n

    def is_available(self) -> bool:
        """False while this rank holds only its shard of ``col`` (outside its layer's
        forward/backward and outside ``shira_dist.distributed.whole_patterns``)."""
        if isinstance(self.col, DTensor):
            return False
        return not is_partitioned(self.col) or self.col.numel() == full_numel(self.col)

    def _check_available(self, what: str) -> None:
        if not self.is_available():
            raise RuntimeError(f"{what} of {self.where}: its indices are sharded by ZeRO-3/FSDP2; read them "
                               "inside shira_dist.distributed.whole_patterns(model) (collective), or use "
                               "shira_dist.distributed.save_adapter / gather_adapter_state_dict")

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
        stored = self._parameters.get("col", self._buffers.get("col"))
        if stored is not None and _engine_sharded(stored):
            raise RuntimeError(f"cannot replace the indices of {self.where}: ZeRO-3/FSDP2 shards them; load or "
                               "broadcast adapters before sharding the model")
        self._parameters.pop("col", None)
        self._store(crow, col, order, stored.device if stored is not None else indices.device)

    def _store(self, crow: Tensor, col: Tensor, order: Optional[Tensor], device: torch.device) -> None:
        col = col.to(device)
        if self.shape[1] <= _INT16_LIMIT:
            col = col.to(torch.int16).view(torch.uint8)
        self.register_buffer("crow", _own(crow.to(device)))
        self.register_buffer("col", _own(col))  # not a view keeping all of ``indices`` alive
        self.register_buffer("order", None if order is None else _own(order.to(device)))

    def col_as_parameter_(self) -> nn.Parameter:
        """Hold ``col`` as a frozen parameter (same name and data) instead of a buffer, for an
        engine that shards parameters only (DeepSpeed ZeRO-3, FSDP2); returns it. Idempotent."""
        if "col" not in self._parameters:
            self.col = nn.Parameter(self._buffers.pop("col"), requires_grad=False)
        return self._parameters["col"]

    def whole(self) -> ContextManager[None]:
        """Inside the block ``col`` holds the whole pattern on this rank.

        A pattern that :func:`shira_dist.distributed.shard_fsdp2` made an FSDP2 unit of its own
        is all-gathered on entering and resharded when the outermost block exits (blocks nest:
        the layer holds one around its product, the kernels open their own, for the backward
        too); collective then: every rank enters it. Anywhere else a no-op (ZeRO-3 gathers the
        columns with their layer's forward and backward).
        """
        return _UnitGather(self) if isinstance(self, FSDPModule) else contextlib.nullcontext()

    def indices(self) -> Tensor:
        """(2, nnz) int indices in the stored order (a new tensor)."""
        self._check_available("reading the indices")
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
        """The kernels' view of these tensors (no copies). It holds ``col`` itself, not a view
        of its data, so under ZeRO-3/FSDP2 it reads whatever the engine has gathered at each use;
        it carries :meth:`whole` (a no-op unless FSDP2 shards the columns), which the kernels enter
        around each read (build it inside one)."""
        self._check_available("building the layout")
        return csr_layout(self.shape, self.crow, self.col, self.order, access=self.whole)

    def tensors(self) -> list[Tensor]:
        """The stored tensors (for in-place broadcasts and checksums)."""
        return [t for t in (self.crow, self.col, self.order) if t is not None]

    def named_tensors(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) of :meth:`tensors`: buffers, and ``col`` a parameter under ZeRO-3/FSDP2."""
        return [(n, t) for n, t in (("crow", self.crow), ("col", self.col), ("order", self.order)) if t is not None]

    def stamp(self) -> tuple:
        """Changes whenever a stored tensor is replaced or written in place. A ``col`` that an
        engine shards cannot change (:meth:`set_` refuses), while each gather may give it new
        storage: a parameter is stamped by identity (FSDP2 shows the same unsharded parameter
        object in every forward and backward, ZeRO-3 the same partitioned one)."""
        return tuple((id(t),) if isinstance(t, nn.Parameter) else (t.data_ptr(), t.device, t._version)
                     for t in self.tensors())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}, row_major={self.order is None}"


class _UnitGather:
    """:meth:`SparsePattern.whole` of an FSDP2 pattern unit: ``unshard()`` when the first block
    opens, ``reshard()`` when the last one closes."""

    def __init__(self, pattern: SparsePattern) -> None:
        self.pattern = pattern

    def __enter__(self) -> None:
        if self.pattern._whole_depth == 0:
            self.pattern.unshard()
        self.pattern._whole_depth += 1

    def __exit__(self, *exc) -> None:
        self.pattern._whole_depth -= 1
        if self.pattern._whole_depth == 0:
            self.pattern.reshard()


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

    def set_csr(self, name: str, crow: Tensor, col: Tensor) -> None:
        """Adapter ``name``'s pattern from its CSR (row-major, trusted: see :class:`SparsePattern`)."""
        self.patterns[name] = SparsePattern(None, self.shape, f"{self.where} adapter {name!r}", csr=(crow, col))

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
        keys = [f"{prefix}patterns.{name}.{tensor}" for tensor, _ in pattern.named_tensors()]
        if not all(key in state_dict for key in keys) or not pattern.is_available():
            continue  # a ZeRO-3 partition / FSDP2 shard stays as it is, like the engine's other parameters
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
        for key, t in pattern.named_tensors():
            state_dict[inner + key] = t
