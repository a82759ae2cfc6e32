"""shira_dist: Sparse High Rank Adapters with PEFT's API, built for sharded training."""

from .config import ShiraConfig
from .layer import ShiraLayer, ShiraLinear
from .masks import MASK_FUNCTIONS, calibrate_masks, random_mask
from .model import ShiraModel
from .overlap import adapter_overlap

__version__ = "0.1.0"


def __getattr__(name: str):
    """``PeftModel`` and ``get_peft_model`` import ``peft`` (and, through it, transformers) on
    first use, so ``import shira_dist`` alone (the launcher, the job's argument checks) stays light."""
    if name in ("PeftModel", "get_peft_model"):
        from . import peft_model

        return getattr(peft_model, name)
    raise AttributeError(f"module 'shira_dist' has no attribute {name!r}")

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
