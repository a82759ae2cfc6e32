"""Combining SHiRA adapters into one: sparse deltas added on the union of their entries.

Per layer, each adapter a is a sparse delta Δ_a (its values times its scale at its entries).
All adapters are laid out over the union U of their entries as a matrix

    D: (n_adapters, |U|)      D[a, j] = Δ_a at union entry j (0 where a has no entry)

and a combination maps D and the weights w (n_adapters,) to one row (|U|,):

    linear            Σ_a w_a D[a]
    magnitude_prune   Σ_a w_a trim(D[a])            trim: keep each adapter's `density` share
                                                    of its own entries, largest |value| first
    ties              elect a sign per entry from w·trim(D) ("total": the sign of the sum,
                      "frequency": of the count), then average the weighted values that agree
    dare_linear       Σ_a w_a drop(D[a])            drop: keep each of an adapter's entries with
                                                    probability `density`, rescaled by 1/density
    dare_ties         ties on drop(D) instead of trim(D)

The math is in pure functions over D; :func:`union_layout` builds D from indices. Densities
count an adapter's own entries (a SHiRA delta is sparse already), and the random draws of
``drop`` go through each adapter's entries in row-major order, so a dense reference with the
same generator draws the same entries.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

COMBINATIONS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def union_layout(indices: list[Tensor], values: list[Tensor], shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """indices: per adapter (2, nnz_a) int; values: per adapter (nnz_a,) scaled deltas.

    Returns (flat positions of the union (|U|,) int64, sorted row-major; D (n, |U|) float32).
    """
    flats = [i[0].long() * shape[1] + i[1].long() for i in indices]
    union = torch.unique(torch.cat(flats))  # sorted
    dense = torch.zeros(len(indices), union.numel(), dtype=torch.float32, device=union.device)
    for a, (flat, v) in enumerate(zip(flats, values)):
        dense[a, torch.searchsorted(union, flat)] = v.detach().float()
    return union, dense


def trim(d: Tensor, present: Tensor, density: float) -> Tensor:
    """Keep, per adapter (row), the ⌈density·nnz_a⌉ entries of largest |value| among its own
    (``present``: (n, |U|) bool). Ties at the threshold go to the lowest positions."""
    out = torch.zeros_like(d)
    for a in range(d.shape[0]):
        own = torch.nonzero(present[a]).squeeze(1)
        keep = int(torch.ceil(torch.tensor(density * own.numel())).item())
        if keep:
            order = torch.argsort(d[a, own].abs(), descending=True, stable=True)[:keep]
            out[a, own[order]] = d[a, own[order]]
    return out


def drop(d: Tensor, present: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each of an adapter's own entries with probability ``density`` (one uniform draw
    per entry, adapters in order, entries in row-major order), rescaled by 1/density."""
    out = torch.zeros_like(d)
    for a in range(d.shape[0]):
        own = torch.nonzero(present[a]).squeeze(1)
        kept = torch.rand(own.numel(), generator=generator, device=d.device) < density
        out[a, own[kept]] = d[a, own[kept]] / density
    return out


def ties_merge(weighted: Tensor, majority_sign_method: str) -> Tensor:
    """weighted: (n, |U|) already multiplied by the weights -> (|U|,): per entry, the mean of the
    values whose sign agrees with the elected one (0 where none)."""
    if majority_sign_method == "total":
        elected = torch.sign(weighted.sum(0))
    else:
        elected = torch.sign(torch.sign(weighted).sum(0))
    agree = (torch.sign(weighted) == elected) & (weighted != 0)
    count = agree.sum(0).clamp(min=1)
    return (weighted * agree).sum(0) / count


def combine(d: Tensor, present: Tensor, weights: Tensor, combination_type: str, density: Optional[float] = None,
            majority_sign_method: str = "total", generator: Optional[torch.Generator] = None) -> Tensor:
    """D (n, |U|), present (n, |U|) bool, weights (n,) -> the combined delta (|U|,) float32."""
    w = weights.to(d.dtype)[:, None]
    if combination_type == "linear":
        return (w * d).sum(0)
    if combination_type in ("magnitude_prune", "ties"):
        d = trim(d, present, density)
    elif combination_type in ("dare_linear", "dare_ties"):
        d = drop(d, present, density, generator)
    if combination_type.endswith("ties"):
        return ties_merge(w * d, majority_sign_method)
    return (w * d).sum(0)


def pad_positions(taken: Tensor, total: int, count: int) -> Tensor:
    """``count`` positions of [0, total) not in ``taken`` (sorted flat positions): the lowest
    free ones, so padding is deterministic. Returns (count,) int64."""
    if count == 0:
        return taken.new_empty(0)
    free_before = taken - torch.arange(taken.numel(), device=taken.device)  # non-decreasing
    ranks = torch.arange(count, device=taken.device)
    return ranks + torch.searchsorted(free_before, ranks, right=True)
