"""How much two adapters interfere when fused: per layer and overall.

For two adapters' deltas Δ1, Δ2 (out, in) of one layer (values × scale at their entries):

    shared     |E1 ∩ E2| / min(|E1|, |E2|)     the fraction of entries both adapters train
    awom       ‖Δ1ᵀ Δ2‖_F                       adapter weight orthogonality magnitude (the
                                               SHiRA paper's AWOM; 0 when no output row is shared)
    awor       1 − nnz(Δ1ᵀ Δ2) / in²           adapter weight orthogonality ratio (AWOR): the
                                               structural sparsity of Δ1ᵀ Δ2, from the patterns

Δ1ᵀ Δ2 is computed as a sparse product (never an (out, in) or (in, in) dense tensor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import ShiraModel


def _sparse(indices: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_coo_tensor(indices.long(), values.detach().double(), shape).coalesce()


def layer_overlap(idx1: Tensor, v1: Tensor, idx2: Tensor, v2: Tensor, shape: tuple[int, int]) -> dict:
    """idx: (2, nnz) int, v: (nnz,) scaled deltas, shape (out, in) -> {shared, awom, awor}."""
    flat1, flat2 = idx1[0].long() * shape[1] + idx1[1].long(), idx2[0].long() * shape[1] + idx2[1].long()
    shared = int(torch.isin(flat1, flat2).sum()) / max(1, min(flat1.numel(), flat2.numel()))
    product = torch.sparse.mm(_sparse(idx1, v1, shape).t().coalesce(), _sparse(idx2, v2, shape)).coalesce()
    pattern = torch.sparse.mm(_sparse(idx1, torch.ones(idx1.shape[1]), shape).t().coalesce(),
                              _sparse(idx2, torch.ones(idx2.shape[1]), shape)).coalesce()
    return {"shared": shared, "awom": float(product.values().norm()),
            "awor": 1.0 - pattern.values().numel() / (shape[1] * shape[1])}


def adapter_overlap(model: "ShiraModel", first: str, second: str) -> dict:
    """{"layers": {path: {shared, awom, awor}}, "overall": {...}} over the layers holding both
    adapters; overall: shared weighted by entries, awom as the root of the layers' squares,
    awor averaged over layers."""
    model._check_adapters([first, second])
    layers, shared_entries, entries = {}, 0.0, 0
    for path, layer in model.shira_layers():
        if first not in layer.shira_weight or second not in layer.shira_weight:
            continue
        shape = (layer.out_features, layer.in_features)
        stats = layer_overlap(layer.shira_indices[first], layer.shira_weight[first] * layer.scaling[first],
                              layer.shira_indices[second], layer.shira_weight[second] * layer.scaling[second], shape)
        layers[path] = stats
        n = min(layer.shira_weight[first].numel(), layer.shira_weight[second].numel())
        shared_entries, entries = shared_entries + stats["shared"] * n, entries + n
    if not layers:
        raise ValueError(f"adapters {first!r} and {second!r} share no layer")
    overall = {"shared": shared_entries / entries,
               "awom": sum(s["awom"] ** 2 for s in layers.values()) ** 0.5,
               "awor": sum(s["awor"] for s in layers.values()) / len(layers)}
    return {"layers": layers, "overall": overall}
