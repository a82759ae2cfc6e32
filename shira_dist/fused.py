"""Fused training: the base weight holds ``W0 + Σ scale_a·values_a`` in place.

    W[idx_a] = W0[idx_a] + s_a · v_a      for every fused adapter a (written in order)

The entries ``W0[idx_a]`` are kept, and :meth:`FusedWeight.write` runs at *every* fused
forward: the weight is re-written from the originals and the values as they are now, so the
result never depends on how (or whether anyone noticed that) the values changed: any
optimizer, engine or ``p.data`` write. Re-writing from the originals (never adding to the
previous write) means no rounding drift, and restoring is bit-exact.
"""

from __future__ import annotations

from torch import Tensor

from .kernels import CsrLayout, scatter_merge_, scatter_restore_, scatter_rewrite_

Adapter = tuple[str, CsrLayout, Tensor, float]  # (name, pattern layout, values (nnz,), scale)


class FusedWeight:
    """Which adapters a weight holds in place, each with its layout and W0 at its entries.

    Plain attributes, not buffers: a cache of the frozen weight, not adapter state (the
    layer restores W0 before anything copies, moves or saves the weight).
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, CsrLayout, Tensor]] = []  # (name, layout written, W0[idx] (nnz,))

    @property
    def active(self) -> bool:
        return bool(self.entries)

    def write(self, weight: Tensor, adapters: list[Adapter]) -> None:
        """Make ``weight`` (out, in) = W0 + Σ deltas of ``adapters``, from their values now."""
        if len(adapters) == 1 and len(self.entries) == 1 and self.entries[0][:2] == adapters[0][:2]:
            # the usual step: one adapter, its saved W0 entries still under the write. (With
            # several, one adapter's saved entries may hold another's delta where they overlap.)
            name, layout, values, scale = adapters[0]
            scatter_rewrite_(weight, layout, self.entries[0][2], values, scale)
            return
        self.restore(weight)
        for name, layout, values, scale in adapters:
            self.entries.append((name, layout, scatter_merge_(weight, layout, values, scale)))

    def restore(self, weight: Tensor) -> None:
        """Put W0 back at every fused entry, bit-exactly (last written first), with the layouts
        that were written (even if the pattern was replaced since)."""
        while self.entries:
            _, layout, originals = self.entries.pop()
            scatter_restore_(weight, layout, originals)

    def unfused_copy(self, weight: Tensor) -> Tensor:
        """A copy of ``weight`` with W0 at the fused entries (for state_dict)."""
        out = weight.detach().clone()
        for _, layout, originals in reversed(self.entries):
            scatter_restore_(out, layout, originals)
        return out
