"""The SHiRA paper's other masks: structured, weight magnitude, gradient and SNIP.

Every mask keeps PEFT's signature ``mask_fn(base_layer, r, random_seed=None, **kwargs)``
and returns a coalesced sparse COO (out, in) tensor of ones with exactly r*(in+out)
entries, like :func:`shira_dist.masks.random_mask`::

    mask_type          entries trained                                     needs
    struct             ⌈r/2⌉ rows + ⌊r/2⌋ columns + diagonal, rest random   nothing (seed)
    weight_magnitude   top-k |W|                                           the weights
    gradient           top-k Σ_batches |dL/dW|                             scores=
    snip               top-k Σ_batches |W ⊙ dL/dW|                         scores=

Data-driven masks get their importance as ``scores=``, an (out, in) tensor where larger
means "train this entry"; :func:`shira_dist.calibration.calibrate_masks` computes it from
calibration batches with the score functions below. The math is in pure functions
(``*_scores``, :func:`topk_positions`, :func:`struct_positions`); mask functions only
read the layer and pick which function to call. Scores are fp32 whatever the weight dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .masks import _generator, _sparse_mask, _weight_of, layer_shape, sample_distinct, shira_budget
from .partitioned import full_shape, gathered

# ---- scores (pure) ------------------------------------------------------------------------


def weight_magnitude_scores(weight: Tensor) -> Tensor:
    """|W| in fp32. weight: (out, in), any float dtype -> (out, in) float32."""
    return weight.detach().float().abs()


def gradient_scores(weight: Tensor, grad: Tensor) -> Tensor:
    """|dL/dW| in fp32 for one batch. grad: (out, in) -> (out, in) float32.

    ``weight`` is unused; it is taken so every calibration score has the same signature.
    """
    return grad.detach().float().abs()


def snip_scores(weight: Tensor, grad: Tensor) -> Tensor:
    """SNIP's |W ⊙ dL/dW| in fp32 for one batch. weight, grad: (out, in) -> (out, in) float32."""
    return (grad.detach().float() * weight.detach()).abs_()


# ---- selection (pure) ---------------------------------------------------------------------


def _kth_largest(flat: Tensor, k: int) -> Tensor:
    """Exact k-th largest value of ``flat`` (n,) without a full top-k of a huge layer.

    A fixed-seed sample of 2^20 entries gives a threshold a little below the k-th largest;
    the exact top-k then runs only over the entries above it (falls back to kthvalue if the
    threshold overshoots). The answer is exact either way; only the time depends on the sample.
    """
    n = flat.numel()
    if n > (1 << 22) and k < n // 4:
        gen = torch.Generator(device=flat.device).manual_seed(0)
        sample = flat[torch.randint(0, n, (1 << 20,), generator=gen, device=flat.device)].float()
        lo = torch.quantile(sample, max(0.0, 1.0 - 1.25 * k / n - 1e-3))
        candidates = flat[flat >= lo]
        if candidates.numel() >= k:
            return torch.topk(candidates, k, sorted=False).values.min()
    return torch.kthvalue(flat.float(), n - k + 1).values.to(flat.dtype)


def topk_positions(scores: Tensor, k: int) -> Tensor:
    """Row-major flat positions of the k largest scores, sorted ascending.

    scores: (out, in) float, finite -> (k,) int64 on ``scores.device``.
    Ties at the k-th largest value go to the lowest flat positions (row-major order), so the
    result never depends on ``torch.topk``'s unspecified order among equal values.
    """
    if scores.dim() != 2 or not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a floating (out, in) tensor, got {scores.dtype} {tuple(scores.shape)}")
    flat = scores.detach().reshape(-1)
    if not 0 < k <= flat.numel():
        raise ValueError(f"k={k} is invalid for scores of shape {tuple(scores.shape)}: need 0 < k <= {flat.numel()}")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"scores of shape {tuple(scores.shape)} contain NaN or inf; cannot rank them")
    kth = _kth_largest(flat, k)
    above = torch.nonzero(flat > kth).squeeze(1)  # strictly larger: always selected
    ties = torch.nonzero(flat == kth).squeeze(1)[: k - above.numel()]  # lowest positions first
    return torch.cat([above, ties]).sort().values


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Sparse COO (out, in) mask of ones at the k largest scores (see :func:`topk_positions`)."""
    return _sparse_mask(topk_positions(scores, k), tuple(scores.shape), scores.dtype)


def _sample_outside(taken: Tensor, total: int, m: int, generator: torch.Generator) -> Tensor:
    """m distinct positions of [0, total) not in ``taken`` (sorted, distinct), uniformly, O(m + |taken|).

    Draws m ranks among the total - |taken| free positions and maps rank s to the s-th free
    position: s + #{taken t : t - (number of taken before t) <= s}.
    """
    if m == 0:
        return taken.new_empty(0)
    ranks = sample_distinct(total - taken.numel(), m, generator, taken.device)
    free_before = taken - torch.arange(taken.numel(), device=taken.device)  # non-decreasing
    return ranks + torch.searchsorted(free_before, ranks, right=True)


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
                     device: torch.device) -> Tensor:
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
    extra = _sample_outside(structured, out_features * in_features, k - structured.numel(), generator)
    return torch.cat([structured, extra]).sort().values


# ---- mask functions (PEFT's signature) ----------------------------------------------------


def _sampling_device(weight: Tensor) -> torch.device:
    # A meta weight has no storage; sample its pattern on the CPU (as random_mask does).
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def _loaded_weight(base_layer: nn.Module, mask_type: str) -> Tensor:
    weight = _weight_of(base_layer)
    if weight.device.type == "meta":
        raise ValueError(
            f"mask_type={mask_type!r} ranks the layer's weight values, but this "
            f"{type(base_layer).__name__} ({tuple(weight.shape)}) is on the meta device (weights not loaded); "
            "load the weights first, or use mask_type='random' or 'struct', which need no weights"
        )
    return weight


def struct_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None, **kwargs) -> Tensor:
    """SHiRA-Struct: random whole rows and columns plus the diagonal (see :func:`struct_positions`).

    Returns a coalesced sparse COO (out, in) tensor of ones with r*(in+out) entries on the
    weight's device (CPU for a meta weight). ``random_seed=None`` draws a fresh pattern;
    extra kwargs are ignored.
    """
    weight = _weight_of(base_layer)
    out_f, in_f = layer_shape(base_layer)  # a ZeRO-3 partitioned or packed quantized weight works as it is
    device = _sampling_device(weight)
    return _sparse_mask(struct_positions(out_f, in_f, r, _generator(device, random_seed), device), (out_f, in_f),
                        weight.dtype)


def weight_magnitude_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None, **kwargs) -> Tensor:
    """SHiRA-WM: the r*(in+out) entries of largest |W| (ties: lowest row-major position).

    Deterministic: ``random_seed`` and extra kwargs are ignored. Needs loaded weights (not meta);
    a ZeRO-3 partitioned weight is gathered for the ranking and freed (collective: every rank
    must build the adapter, as it must anyway). Returns a coalesced sparse COO (out, in) tensor
    of ones on the weight's device.
    """
    weight = _loaded_weight(base_layer, "weight_magnitude")
    shape = full_shape(weight)
    if shape != layer_shape(base_layer) or type(weight) not in (Tensor, nn.Parameter):
        raise TypeError(f"mask_type='weight_magnitude' ranks the weight's values, but this {type(base_layer).__name__}'s "
                        f"weight is a {type(weight).__name__} of shape {shape} (quantized or packed); compute the mask "
                        "on the float model, or use mask_type='random' or 'struct'")
    k = shira_budget(*shape, r)
    with gathered([weight]):
        flat = topk_positions(weight_magnitude_scores(weight), k)
    return _sparse_mask(flat, shape, weight.dtype)


def _scored_mask(base_layer: nn.Module, r: int, scores: Optional[Tensor], mask_type: str) -> Tensor:
    weight = _weight_of(base_layer)
    if scores is None:
        raise ValueError(
            f"mask_type={mask_type!r} needs calibration scores, got none: pass calibration data "
            "(shira_dist.calibration.calibrate_masks(model, config, batches)), or call this mask "
            "function with scores=<(out, in) tensor>"
        )
    shape = layer_shape(base_layer)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != shape:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores for mask_type={mask_type!r} must be a tensor of the weight's shape "
                         f"{shape} (out, in), got {got}")
    k = shira_budget(*shape, r)
    flat = topk_positions(scores.float(), k).to(_sampling_device(weight))
    return _sparse_mask(flat, shape, weight.dtype)


def gradient_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None,
                  scores: Optional[Tensor] = None, **kwargs) -> Tensor:
    """SHiRA-Grad: the r*(in+out) entries of largest accumulated |dL/dW|.

    scores: (out, in) Σ_batches |dL/dW| (:func:`gradient_scores` summed, as computed by
    ``calibrate_masks``); required. Ties: lowest row-major position. ``random_seed`` and
    extra kwargs are ignored. Returns a coalesced sparse COO (out, in) tensor of ones.
    """
    return _scored_mask(base_layer, r, scores, "gradient")


def snip_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None,
              scores: Optional[Tensor] = None, **kwargs) -> Tensor:
    """SHiRA-SNIP: the r*(in+out) entries of largest accumulated |W ⊙ dL/dW|.

    scores: (out, in) Σ_batches |W ⊙ dL/dW| (:func:`snip_scores` summed, as computed by
    ``calibrate_masks``); required. Ties: lowest row-major position. ``random_seed`` and
    extra kwargs are ignored. Returns a coalesced sparse COO (out, in) tensor of ones.
    """
    return _scored_mask(base_layer, r, scores, "snip")
