"""Adapter deltas written into a base weight in place, with W0 kept at their entries.

    W[idx_a] = W0[idx_a] + s_a · v_a      for every written adapter a (in order)

A layer keeps two of these: what a merge wrote (until unmerge) and what fused training
wrote. The fused write is re-done from the originals and the values as they are now at
*every* fused forward (:meth:`WrittenDeltas.write`), so the result never depends on how, or
whether anyone noticed that, the values changed: any optimizer, engine or ``p.data`` write.
Writing from the originals (never adding to a previous write) means no rounding drift, and
restoring is bit-exact.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .kernels import CsrLayout, scatter_merge_, scatter_restore_, scatter_rewrite_

Adapter = tuple[str, CsrLayout, Tensor, float]  # (name, pattern layout, values (nnz,), scale)


class WrittenDeltas:
    """Which adapters a weight holds in place, each with the layout written and W0[idx] (nnz,).

    Plain attributes, not buffers: W0 entries are a copy of the frozen weight, not adapter
    state (``state_dict()`` reports W0 through :meth:`unwritten_copy`).
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, CsrLayout, Tensor]] = []

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.entries]

    def add(self, weight: Tensor, adapter: Adapter, check_finite: bool = False) -> None:
        """Write one more adapter's delta into ``weight`` (out, in)."""
        name, layout, values, scale = adapter
        self.entries.append((name, layout, scatter_merge_(weight, layout, values, scale, check_finite=check_finite)))

    def write(self, weight: Tensor, adapters: list[Adapter]) -> None:
        """Make ``weight`` = W0 + Σ deltas of ``adapters``, from their values now."""
        if len(adapters) == 1 and len(self.entries) == 1 and self.entries[0][:2] == adapters[0][:2]:
            # the usual step: one adapter, its saved W0 entries still under the write. (With
            # several, one adapter's saved entries may hold another's delta where they overlap.)
            _, layout, values, scale = adapters[0]
            scatter_rewrite_(weight, layout, self.entries[0][2], values, scale)
            return
        self.restore(weight)
        for adapter in adapters:
            self.add(weight, adapter)

    def restore(self, weight: Tensor) -> None:
        """Put W0 back at every written entry, bit-exactly (last written first), with the layouts
        that were written (even if a pattern was replaced since)."""
        while self.entries:
            _, layout, originals = self.entries.pop()
            scatter_restore_(weight, layout, originals)

    def unwritten_copy(self, weight: Tensor) -> Tensor:
        """A copy of ``weight`` with W0 at the written entries."""
        out = weight.detach().clone()
        for _, layout, originals in reversed(self.entries):
            scatter_restore_(out, layout, originals)
        return out

    def convert(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a module conversion (``.to()``, ``.half()``) to the saved W0 entries, as to buffers."""
        self.entries = [(name, layout, fn(originals)) for name, layout, originals in self.entries]
