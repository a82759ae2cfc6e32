"""SHiRA masks: which r*(in+out) entries of an (out, in) weight are trained.

A mask function has PEFT's signature ``mask_fn(base_layer, r, random_seed=None, **kwargs)``
and returns a dense (out, in) tensor of 0/1 (PEFT's form) or a coalesced sparse COO tensor of
ones (the built-ins: O(nnz) memory, never a dense permutation), with exactly r*(in+out)
entries; :func:`mask_to_indices` checks either form.

    mask_type          entries trained                                     module
    random             uniform without replacement                         random.py
    struct             whole rows + whole columns + diagonal, rest random  struct.py
    weight_magnitude   top-k |W|                                           scored.py
    gradient           top-k Σ_batches |dL/dW|                             scored.py, calibration.py
    snip               top-k Σ_batches |W ⊙ dL/dW|                         scored.py, calibration.py
"""

from .calibration import CALIBRATED_MASKS, LossFn, calibrate_masks, calibration_scores
from .common import layer_seed, layer_shape, mask_device, mask_to_indices, sample_distinct, shira_budget, validate_indices
from .random import random_csr, random_mask
from .scored import (gradient_mask, gradient_scores, snip_mask, snip_scores, topk_mask, topk_positions,
                     weight_magnitude_mask, weight_magnitude_scores)
from .struct import struct_mask, struct_positions, struct_shape

MASK_FUNCTIONS = {
    "random": random_mask,
    "struct": struct_mask,
    "weight_magnitude": weight_magnitude_mask,
    "gradient": gradient_mask,
    "snip": snip_mask,
}

__all__ = ["MASK_FUNCTIONS", "CALIBRATED_MASKS", "LossFn", "calibrate_masks", "calibration_scores", "layer_seed",
           "layer_shape", "mask_device", "mask_to_indices", "sample_distinct", "shira_budget", "validate_indices",
           "random_csr", "random_mask", "gradient_mask", "gradient_scores", "snip_mask", "snip_scores", "topk_mask",
           "topk_positions", "weight_magnitude_mask", "weight_magnitude_scores", "struct_mask", "struct_positions",
           "struct_shape"]
