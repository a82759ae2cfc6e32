"""Fused mode bookkeeping: the base weight holds ``W0 + Σ scale_a·values_a`` in place.

    W[idx_a] = W0[idx_a] + s_a · v_a      for every fused adapter a (written in order)

The entries ``W0[idx_a]`` are kept, so the weight is always re-written from the originals
(never by adding to the previous write): no rounding drift however many optimizer steps
run, and restoring is bit-exact. A write is stamped with the values' version counter,
storage and scale; any change (an optimizer step, a load, ``set_scale``) makes it stale
and the next forward re-writes the nnz entries, with no call from the user.
"""

from __future__ import annotations

from torch import Tensor, nn

from .buffer_dict import BufferDict
from .kernels import scatter_merge_, scatter_restore_, scatter_rewrite_


def _stamp(values: Tensor, scale: float) -> tuple:
    return (values._version, values.data_ptr(), values.device, float(scale))


def _index_stamp(indices: Tensor) -> tuple:
    return (indices._version, indices.data_ptr(), indices.device)


class FusedDelta(nn.Module):
    """Which adapters are fused into one weight, and the original entries under them."""

    def __init__(self) -> None:
        super().__init__()
        self.originals = BufferDict(persistent=False)  # name -> W0[idx] (nnz,)
        self.order: list[str] = []
        self._stamps: dict[str, tuple] = {}
        self._index_stamps: dict[str, tuple] = {}

    @property
    def active(self) -> bool:
        return bool(self.order)

    def is_current(self, names: list[str], values: dict[str, Tensor], scales: dict[str, float]) -> bool:
        return names == self.order and all(self._stamps[n] == _stamp(values[n], scales[n]) for n in names)

    def write(self, weight: Tensor, names: list[str], indices: dict[str, Tensor], values: dict[str, Tensor],
              scales: dict[str, float]) -> None:
        """Make ``weight`` = W0 + Σ deltas of ``names`` (restoring the previous write first)."""
        n = names[0] if len(names) == 1 else None
        if n is not None and self.order == [n] and self._index_stamps[n] == _index_stamp(indices[n]):
            # the usual step (one adapter, new values): its saved W0 entries are still under the write
            scatter_rewrite_(weight, indices[n], self.originals[n], values[n], scales[n])
            self._stamps[n] = _stamp(values[n], scales[n])
            return
        self.restore(weight, indices)
        for n in names:
            self.originals[n] = scatter_merge_(weight, indices[n], values[n], scales[n])
            self.order.append(n)
            self._stamps[n] = _stamp(values[n], scales[n])
            self._index_stamps[n] = _index_stamp(indices[n])

    def restore(self, weight: Tensor, indices: dict[str, Tensor]) -> None:
        """Put W0 back at every fused index, bit-exactly (last written first)."""
        while self.order:
            n = self.order.pop()
            scatter_restore_(weight, indices[n], self.originals[n])
            del self.originals[n]
            del self._stamps[n]
            del self._index_stamps[n]

    def unfused_copy(self, weight: Tensor, indices: dict[str, Tensor]) -> Tensor:
        """A copy of ``weight`` with W0 at the fused indices (for state_dict)."""
        out = weight.detach().clone()
        for n in reversed(self.order):
            scatter_restore_(out, indices[n], self.originals[n])
        return out
