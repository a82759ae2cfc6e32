"""Calibration for the data-driven SHiRA masks (SHiRA-Grad and SHiRA-SNIP).

    model.eval(); only the targeted Linear weights require grad
    for batch in batches:
        loss = model(**batch).loss            (or loss_fn(model, batch))
        loss.backward() ──► as soon as W.grad is complete, a hook on W does
                              score[W] += |W.grad|          mask_type="gradient"
                              score[W] += |W ⊙ W.grad|      mask_type="snip"
                              W.grad = None                  (no set of .grad tensors builds up)
    indices[name] = mask_fn(layer, r, scores=score[W])   top r*(in+out) entries

Extra memory: one fp32 score per targeted weight plus one layer's gradient at a time.
Weights are never written; requires_grad flags, pre-existing .grad tensors and every
module's train/eval mode are restored, even when a batch fails.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from ..targeting import find_targets
from .common import layer_shape, mask_to_indices, shira_budget
from .scored import gradient_mask, gradient_scores, snip_mask, snip_scores

if TYPE_CHECKING:
    from ..config import ShiraConfig

Batch = Mapping[str, Any]
LossFn = Callable[[nn.Module, Batch], Tensor]

# mask_type -> (per-batch score of (weight, grad), mask function taking scores=)
CALIBRATED_MASKS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[..., Tensor]]] = {
    "gradient": (gradient_scores, gradient_mask),
    "snip": (snip_scores, snip_mask),
}


def _target_weights(model: nn.Module, config: "ShiraConfig") -> list[tuple[str, nn.Linear]]:
    """(module path, base Linear) per target; checks type, loaded weights and budget first."""
    found = []
    for name, module in find_targets(model, config.target_modules):
        base = getattr(module, "base_layer", module)  # a SHiRA layer's frozen Linear
        if not isinstance(base, nn.Linear):
            raise TypeError(f"target {name!r} is a {type(module).__name__}; calibration supports torch.nn.Linear")
        weight = base.weight
        _require_whole(name, base)
        if weight.device.type == "meta":
            raise ValueError(f"calibration needs loaded weights, but {name!r} is on the meta device; "
                             "load the weights first, or use mask_type='random' or 'struct'")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"calibration needs floating-point weights, but {name!r} has {weight.dtype}")
        shira_budget(*layer_shape(base), config.r, where=name)
        found.append((name, base))
    return found


def _batch_loss(model: nn.Module, batch: Batch, i: int, loss_fn: Optional[LossFn]) -> Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(f"calibration batch {i} is a {type(batch).__name__}; expected a dict of model "
                        "inputs, passed as model(**batch)")
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        output = model(**batch)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise ValueError(f"the model returned no loss for calibration batch {i} (keys {sorted(batch)}); "
                             "include 'labels' in each batch, or pass loss_fn=lambda model, batch: <scalar>")
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"calibration loss for batch {i} must be a scalar tensor, got {got}")
    if not loss.requires_grad:
        raise ValueError(f"calibration loss for batch {i} does not depend on any targeted weight "
                         "(no gradient flows back); check target_modules and loss_fn")
    return loss


def _require_whole(name: str, base: nn.Linear) -> None:
    """Scores need every entry of a plain weight on this rank: refuse a sharded or quantized one."""
    weight = base.weight
    if type(weight) not in (Tensor, nn.Parameter) or tuple(weight.shape) != layer_shape(base):
        raise ValueError(f"{name}.weight is a {type(weight).__name__} {tuple(weight.shape)}, not a whole plain weight "
                         "on this rank (sharded by FSDP, a DeepSpeed ZeRO-3 partition, or quantized): "
                         "data-driven masks (mask_type gradient/snip) are computed on the whole model before sharding — "
                         "call get_peft_model(..., calibration_data=...) first, then shira_dist.distributed.sync_adapters "
                         "and shard (the training job does this)")


def calibration_scores(model: nn.Module, config: "ShiraConfig", batches: Iterable[Batch],
                       loss_fn: Optional[LossFn] = None) -> dict[str, Tensor]:
    """Accumulated importance per targeted module: {module path: (out, in) float32 scores}.

    ``config.mask_type`` picks the score ("gradient": Σ|dL/dW|, "snip": Σ|W ⊙ dL/dW|) and
    ``config.target_modules`` the layers (names as :func:`shira_dist.targeting.find_targets`).
    batches: iterable of dicts, each run as ``model(**batch)`` with ``output.loss`` as the
    loss, unless ``loss_fn(model, batch) -> scalar`` is given.
    """
    if config.mask_type not in CALIBRATED_MASKS:
        raise ValueError(f"mask_type={config.mask_type!r} does not use calibration data; calibration "
                         f"applies to mask_type in {sorted(CALIBRATED_MASKS)}")
    score_fn = CALIBRATED_MASKS[config.mask_type][0]
    targets = _target_weights(model, config)  # refuses sharded weights (_require_whole)
    weights = {id(base.weight): base.weight for _, base in targets}  # a tied weight counts once
    scores = {key: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for key, w in weights.items()}

    def accumulate(weight: Tensor) -> None:  # runs once per backward, after the full grad landed
        scores[id(weight)].add_(score_fn(weight, weight.grad))
        weight.grad = None

    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    old_grads = {key: w.grad for key, w in weights.items()}
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    n_batches = 0
    try:
        model.eval()  # no dropout
        for p in params:
            p.requires_grad_(False)
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(accumulate))
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                _batch_loss(model, batch, i, loss_fn).backward()
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, requires_grad):
            p.requires_grad_(flag)
        for key, w in weights.items():
            w.grad = old_grads[key]
        for m, training in modes:
            m.train(training)
    if n_batches == 0:
        raise ValueError("batches is empty: calibration needs at least one batch (a dict of model inputs)")
    return {name: scores[id(base.weight)] for name, base in targets}


def calibrate_masks(model: nn.Module, config: "ShiraConfig", batches: Iterable[Batch],
                    loss_fn: Optional[LossFn] = None,
                    exclude: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
    """SHiRA-Grad / SHiRA-SNIP patterns: {module path: indices (2, r*(in+out)) int32, row-major}.

    Scores come from :func:`calibration_scores` (same arguments); each layer keeps its
    r*(in+out) highest-scoring entries (ties: lowest row-major position), none of the flat
    positions ``exclude[path]`` when given. Indices are on the weight's device, ready for
    ``ShiraLinear(..., indices=...)``.
    """
    scores = calibration_scores(model, config, batches, loss_fn)
    mask_fn = CALIBRATED_MASKS[config.mask_type][1]
    indices = {}
    for name, base in _target_weights(model, config):
        shape = tuple(base.weight.shape)
        mask = mask_fn(base, config.r, scores=scores.pop(name), exclude=(exclude or {}).get(name))
        k = shira_budget(shape[0], shape[1], config.r, where=name)
        indices[name] = mask_to_indices(mask, shape, k, name).to(base.weight.device)
    return indices
