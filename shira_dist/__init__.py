"""shira_dist: Sparse High Rank Adapters with PEFT's API, built for sharded training."""

from .masks import calibrate_masks
from .config import ShiraConfig
from .layer import ShiraLayer, ShiraLinear
from .masks import MASK_FUNCTIONS, random_mask
from .model import ShiraModel
from .peft_model import PeftModel, get_peft_model
from .overlap import adapter_overlap

__version__ = "0.1.0"

__all__ = [
    "ShiraConfig",
    "ShiraLayer",
    "ShiraLinear",
    "ShiraModel",
    "PeftModel",
    "get_peft_model",
    "random_mask",
    "MASK_FUNCTIONS",
    "calibrate_masks",
    "adapter_overlap",
]
