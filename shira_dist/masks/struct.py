"""SHiRA-Struct: whole rows and columns plus the diagonal (full rank), topped up at random."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .common import (exclude_positions, generator, layer_shape, mask_device, sample_distinct, sample_outside,
                     shira_budget, sparse_mask, weight_of)


def struct_shape(out_features: int, in_features: int, r: int) -> tuple[int, int]:
    """(R, C): how many whole rows and columns SHiRA-Struct takes (see struct_positions)."""
    k = r * (in_features + out_features)

    def size(nr: int, nc: int) -> int:
        return nr * in_features + nc * out_features - nr * nc + min(out_features, in_features)

    n_rows, n_cols = (r + 1) // 2, r // 2
    grow_rows = True
    while True:
        cand = (n_rows + 1, n_cols) if grow_rows else (n_rows, n_cols + 1)
        if cand[0] > out_features or cand[1] > in_features or size(*cand) > k:
            other = (n_rows, n_cols + 1) if grow_rows else (n_rows + 1, n_cols)
            if other[0] > out_features or other[1] > in_features or size(*other) > k:
                return n_rows, n_cols
            cand = other
        n_rows, n_cols = cand
        grow_rows = not grow_rows


def struct_positions(out_features: int, in_features: int, r: int, generator: torch.Generator,
                     device: torch.device, exclude: Optional[Tensor] = None) -> Tensor:
    """SHiRA-Struct pattern as sorted row-major flat positions: (r*(in+out),) int64.

    Exact rule, all draws from ``generator`` in this order:
      1. R distinct rows and C distinct columns, uniformly at random; all their entries
         are selected (whole rows and whole columns). (R, C) starts at (⌈r/2⌉, ⌊r/2⌋)
         and grows by one row, then one column, alternately, while
         R·in + C·out − R·C + min(in, out) <= r·(in+out): as much of the budget as
         possible goes to whole rows/columns (about r of each), which the values'
         gradient computes with dense sub-GEMMs;
      2. the main diagonal (i, i), i < min(out, in), is selected (this makes the update
         full rank: rows/columns alone give rank <= r);
      3. the union of 1-2 is topped up with uniformly random other positions until it
         holds exactly r*(in+out) entries.
    Step 3 never has to remove anything: the union has at most
    R·in + C·out − R·C + min(in, out) <= r·(in+out) entries (true at the start for every
    r >= 1 and kept by the growth rule), so chosen
    rows, columns and the diagonal are always complete. Memory is O(r*(in+out)).
    ``exclude``: sorted flat positions that must not be chosen (another adapter's entries):
    they are removed from 1-2 (which are then no longer whole) and never drawn in 3.
    """
    k = shira_budget(out_features, in_features, r)
    n_rows, n_cols = struct_shape(out_features, in_features, r)
    rows = sample_distinct(out_features, n_rows, generator, device)
    cols = sample_distinct(in_features, n_cols, generator, device)
    every_col = torch.arange(in_features, device=device)
    every_row = torch.arange(out_features, device=device)
    diag = torch.arange(min(out_features, in_features), device=device)
    structured = torch.unique(torch.cat([
        (rows[:, None] * in_features + every_col).reshape(-1),  # whole rows: (⌈r/2⌉ * in,)
        (every_row[:, None] * in_features + cols).reshape(-1),  # whole columns: (out * ⌊r/2⌋,)
        diag * (in_features + 1),                               # diagonal: (min(out, in),)
    ]))  # sorted, distinct
    assert structured.numel() <= k, "R·in + C·out − R·C + min(in, out) <= r·(in+out)"
    taken = structured
    if exclude is not None:
        structured = structured[~torch.isin(structured, exclude)]
        taken = torch.unique(torch.cat([structured, exclude]))
    extra = sample_outside(taken, out_features * in_features, k - structured.numel(), generator)
    return torch.cat([structured, extra]).sort().values


def struct_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None, **kwargs) -> Tensor:
    """SHiRA-Struct: random whole rows and columns plus the diagonal (see :func:`struct_positions`).

    Returns a coalesced sparse COO (out, in) tensor of ones with r*(in+out) entries on the
    weight's device (CPU for a meta weight). ``random_seed=None`` draws a fresh pattern;
    ``exclude=`` (flat positions) keeps other adapters' entries out; other kwargs are ignored.
    """
    weight = weight_of(base_layer)
    out_f, in_f = layer_shape(base_layer)  # a ZeRO-3 partitioned or packed quantized weight works as it is
    device = mask_device(weight)
    exclude = exclude_positions(kwargs.get("exclude"), (out_f, in_f), r, device)
    flat = struct_positions(out_f, in_f, r, generator(device, random_seed), device, exclude)
    return sparse_mask(flat, (out_f, in_f), weight.dtype)
