"""Masks that keep the r*(in+out) highest-scoring entries: weight magnitude (SHiRA-WM), and
the data-driven gradient (SHiRA-Grad) and SNIP (SHiRA-SNIP), whose scores come from
calibration batches (calibration.py). The math is in pure functions (``*_scores``,
:func:`topk_positions`); mask functions only read the layer. Scores are fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..partitioned import full_shape, gathered
from .common import exclude_positions, layer_shape, mask_device, shira_budget, sparse_mask, weight_of

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
    return sparse_mask(topk_positions(scores, k), tuple(scores.shape), scores.dtype)


def _loaded_weight(base_layer: nn.Module, mask_type: str) -> Tensor:
    weight = weight_of(base_layer)
    if weight.device.type == "meta":
        raise ValueError(
            f"mask_type={mask_type!r} ranks the layer's weight values, but this "
            f"{type(base_layer).__name__} ({tuple(weight.shape)}) is on the meta device (weights not loaded); "
            "load the weights first, or use mask_type='random' or 'struct', which need no weights"
        )
    return weight


def weight_magnitude_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None, **kwargs) -> Tensor:
    """SHiRA-WM: the r*(in+out) entries of largest |W| (ties: lowest row-major position).

    Deterministic: ``random_seed`` and extra kwargs are ignored; ``exclude=`` (flat positions)
    keeps other adapters' entries out. Needs loaded weights (not meta); a ZeRO-3 partitioned
    weight is gathered for the ranking and freed (collective: every rank must build the adapter,
    as it must anyway). Returns a coalesced sparse COO (out, in) tensor of ones on the weight's
    device.
    """
    weight = _loaded_weight(base_layer, "weight_magnitude")
    shape = full_shape(weight)
    if shape != layer_shape(base_layer) or type(weight) not in (Tensor, nn.Parameter):
        raise TypeError(f"mask_type='weight_magnitude' ranks the weight's values, but this {type(base_layer).__name__}'s "
                        f"weight is a {type(weight).__name__} of shape {shape} (quantized or packed); compute the mask "
                        "on the float model, or use mask_type='random' or 'struct'")
    k = shira_budget(*shape, r)
    exclude = exclude_positions(kwargs.get("exclude"), shape, r, mask_device(weight))
    with gathered([weight]):
        flat = topk_positions(_without(weight_magnitude_scores(weight), exclude), k)
    return sparse_mask(flat, shape, weight.dtype)


def _without(scores: Tensor, exclude: Optional[Tensor]) -> Tensor:
    """Non-negative scores (out, in) with the ``exclude`` entries ranked last (-1)."""
    if exclude is None:
        return scores
    scores = scores.clone()
    scores.view(-1)[exclude.to(scores.device)] = -1.0
    return scores


def _scored_mask(base_layer: nn.Module, r: int, scores: Optional[Tensor], mask_type: str,
                 exclude: Optional[Tensor] = None) -> Tensor:
    weight = weight_of(base_layer)
    if scores is None:
        raise ValueError(
            f"mask_type={mask_type!r} needs calibration scores, got none: pass calibration data "
            "(shira_dist.masks.calibrate_masks(model, config, batches)), or call this mask "
            "function with scores=<(out, in) tensor>"
        )
    shape = layer_shape(base_layer)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != shape:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores for mask_type={mask_type!r} must be a tensor of the weight's shape "
                         f"{shape} (out, in), got {got}")
    k = shira_budget(*shape, r)
    exclude = exclude_positions(exclude, shape, r, scores.device)
    flat = topk_positions(_without(scores.float(), exclude), k).to(mask_device(weight))
    return sparse_mask(flat, shape, weight.dtype)


def gradient_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None,
                  scores: Optional[Tensor] = None, **kwargs) -> Tensor:
    """SHiRA-Grad: the r*(in+out) entries of largest accumulated |dL/dW|.

    scores: (out, in) Σ_batches |dL/dW| (:func:`gradient_scores` summed, as computed by
    ``calibrate_masks``); required. Ties: lowest row-major position. ``exclude=`` (flat
    positions) keeps other adapters' entries out; ``random_seed`` and other kwargs are ignored.
    Returns a coalesced sparse COO (out, in) tensor of ones.
    """
    return _scored_mask(base_layer, r, scores, "gradient", kwargs.get("exclude"))


def snip_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None,
              scores: Optional[Tensor] = None, **kwargs) -> Tensor:
    """SHiRA-SNIP: the r*(in+out) entries of largest accumulated |W ⊙ dL/dW|.

    scores: (out, in) Σ_batches |W ⊙ dL/dW| (:func:`snip_scores` summed, as computed by
    ``calibrate_masks``); required. Ties: lowest row-major position. ``exclude=`` (flat
    positions) keeps other adapters' entries out; ``random_seed`` and other kwargs are ignored.
    Returns a coalesced sparse COO (out, in) tensor of ones.
    """
    return _scored_mask(base_layer, r, scores, "snip", kwargs.get("exclude"))
