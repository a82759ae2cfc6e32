"""Fused mode bookkeeping: the base weight holds ``W0 + Σ scale_a·values_a`` in place.

    W[idx_a] = W0[idx_a] + s_a · v_a      for every fused adapter a (written in order)

The entries ``W0[idx_a]`` are kept, so the weight is always re-written from the originals
(never by adding to the previous write): no rounding drift however many optimizer steps
run, and restoring is bit-exact. A write is stamped with the values' version counter,
storage and scale; any change (an optimizer step, a load, ``set_scale``) makes it stale
and the next forward re-writes the nnz entries, with no call from the user.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .buffer_dict import BufferDict
from .kernels import CsrLayout, scatter_merge_, scatter_restore_, scatter_rewrite_

LayoutOf = Callable[[str], CsrLayout]  # adapter name -> its pattern's current layout


def _stamp(values: Tensor, scale: float) -> tuple:
    return (values._version, values.data_ptr(), values.device, float(scale))


def _pattern_stamp(layout: CsrLayout) -> tuple:
    return tuple((t.data_ptr(), t.device, t._version) for t in (layout.crow, layout.col))


class FusedDelta(nn.Module):
    """Which adapters are fused into one weight, and the original entries under them."""

    def __init__(self) -> None:
        super().__init__()
        self.originals = BufferDict(persistent=False)  # name -> W0[idx] (nnz,)
        self.order: list[str] = []
        self._stamps: dict[str, tuple] = {}
        self._pattern_stamps: dict[str, tuple] = {}

    @property
    def active(self) -> bool:
        return bool(self.order)

    def is_current(self, names: list[str], values: dict[str, Tensor], scales: dict[str, float]) -> bool:
        return names == self.order and all(self._stamps[n] == _stamp(values[n], scales[n]) for n in names)

    def write(self, weight: Tensor, names: list[str], layout_of: LayoutOf, values: dict[str, Tensor],
              scales: dict[str, float]) -> None:
        """Make ``weight`` = W0 + Σ deltas of ``names`` (restoring the previous write first)."""
        n = names[0] if len(names) == 1 else None
        if n is not None and self.order == [n] and self._pattern_stamps[n] == _pattern_stamp(layout_of(n)):
            # the usual step (one adapter, new values): its saved W0 entries are still under the write
            scatter_rewrite_(weight, layout_of(n), self.originals[n], values[n], scales[n])
            self._stamps[n] = _stamp(values[n], scales[n])
            return
        self.restore(weight, layout_of)
        for n in names:
            layout = layout_of(n)
            self.originals[n] = scatter_merge_(weight, layout, values[n], scales[n])
            self.order.append(n)
            self._stamps[n] = _stamp(values[n], scales[n])
            self._pattern_stamps[n] = _pattern_stamp(layout)

    def restore(self, weight: Tensor, layout_of: LayoutOf) -> None:
        """Put W0 back at every fused index, bit-exactly (last written first)."""
        while self.order:
            n = self.order[-1]
            layout = layout_of(n)
            if self._pattern_stamps[n] != _pattern_stamp(layout):
                raise RuntimeError(f"adapter {n!r}: its indices changed while fused into the weight; "
                                   "unfuse (layer.unfuse()) before replacing indices")
            scatter_restore_(weight, layout, self.originals[n])
            self.order.pop()
            del self.originals[n]
            del self._stamps[n]
            del self._pattern_stamps[n]

    def unfused_copy(self, weight: Tensor, layout_of: LayoutOf) -> Tensor:
        """A copy of ``weight`` with W0 at the fused indices (for state_dict)."""
        out = weight.detach().clone()
        for n in reversed(self.order):
            scatter_restore_(out, layout_of(n), self.originals[n])
        return out
