"""The compared adapters at one budget, and how each method fuses three task adapters.

Every method trains r·(in+out) values per targeted (out, in) layer, on the same layers:

    lora               PEFT LoRA, rank r, lora_alpha = 2r, dropout 0; fused with PEFT's
                       add_weighted_adapter(combination_type="cat", weights 1): exactly ΣΔ_t
    shira_random       shira_dist SHiRA, random mask (seeded per layer by the cell's seed)
    shira_struct       SHiRA-Struct (rows, columns and the diagonal)
    shira_wm           SHiRA-WM: the largest |W| (the same entries for every task)
    shira_grad         SHiRA-Grad: the largest Σ|∂L/∂W| over the cell's first training batches
    shira_snip         SHiRA-SNIP: the largest Σ|W ⊙ ∂L/∂W| over the same batches
    shira_wm_disjoint  SHiRA-WM non-overlapping: task i's mask avoids the WM-disjoint masks of
                       tasks 0..i-1 (ShiraConfig.disjoint_from), so the fused entries never collide
    every shira_*      fused with shira_dist's add_weighted_adapter("linear", weights 1): ΣΔ_t
                       on the union of the entries

Adapters are saved with save_pretrained (PEFT's files) and fused from those files.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

SHIRA_MASKS = {"shira_random": "random", "shira_struct": "struct", "shira_wm": "weight_magnitude",
               "shira_grad": "gradient", "shira_snip": "snip", "shira_wm_disjoint": "weight_magnitude"}
METHODS = ["lora", *SHIRA_MASKS]
CALIBRATED = {"shira_grad", "shira_snip"}
PAPER_NAMES = {"lora": "LoRA", "shira_random": "SHiRA-Rand", "shira_struct": "SHiRA-Struct", "shira_wm": "SHiRA-WM",
               "shira_grad": "SHiRA-Grad", "shira_snip": "SHiRA-SNIP", "shira_wm_disjoint": "SHiRA-WM-NonOverlap"}


@dataclass(frozen=True)
class Budget:
    r: int
    target_modules: str  # a regex over module paths (full match), read the same by PEFT and shira_dist


def build(method: str, base: nn.Module, budget: Budget, seed: int, task_index: int,
          calibration: Optional[list[dict]] = None, loss_fn: Optional[Callable] = None) -> nn.Module:
    """``base`` (changed in place) wrapped with one trainable adapter named "default"."""
    if method == "lora":
        import peft

        config = peft.LoraConfig(r=budget.r, lora_alpha=2 * budget.r, lora_dropout=0.0,
                                 target_modules=budget.target_modules, task_type="CAUSAL_LM")
        return peft.get_peft_model(base, config)
    if method not in SHIRA_MASKS:
        raise ValueError(f"method={method!r} is unknown; allowed: {METHODS}")
    from shira_dist import ShiraConfig, get_peft_model

    def shira(disjoint_from: Optional[list[str]] = None) -> ShiraConfig:
        return ShiraConfig(r=budget.r, mask_type=SHIRA_MASKS[method], random_seed=seed,
                           target_modules=budget.target_modules, task_type="CAUSAL_LM",
                           disjoint_from=disjoint_from)

    if method != "shira_wm_disjoint" or task_index == 0:
        data = dict(calibration_data=calibration, loss_fn=loss_fn) if method in CALIBRATED else {}
        return get_peft_model(base, shira(), **data)
    # The earlier tasks' masks depend only on the weights: rebuild them (values zero), make this
    # task's mask avoid them, then drop them again.
    earlier = [f"avoid{j}" for j in range(task_index)]
    model = get_peft_model(base, shira(), adapter_name=earlier[0])
    for j in range(1, task_index):
        model.add_adapter(earlier[j], shira(earlier[:j]))
    model.add_adapter("default", shira(list(earlier)))
    model.set_adapter("default")
    for name in earlier:
        model.delete_adapter(name)
    return model


def fuse(method: str, base: nn.Module, adapter_dirs: list[str]) -> tuple[nn.Module, dict]:
    """``base`` (changed in place) with the saved task adapters summed into one active adapter
    "fused"; returns (model, facts: the fused nnz/rank, SHiRA's mean shared-entry fraction)."""
    names = [f"task{i}" for i in range(len(adapter_dirs))]
    if method == "lora":
        import peft

        model = peft.PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
        for name, directory in zip(names[1:], adapter_dirs[1:]):
            model.load_adapter(directory, adapter_name=name)
        model.add_weighted_adapter(names, [1.0] * len(names), "fused", combination_type="cat")
        model.set_adapter("fused")
        return model, {"fused_rank": model.peft_config["fused"].r}
    from shira_dist import PeftModel, adapter_overlap

    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for name, directory in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(directory, adapter_name=name)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    shared = [adapter_overlap(model.base_model, a, b)["overall"]["shared"] for a, b in pairs]
    model.add_weighted_adapter(names, [1.0] * len(names), "fused", combination_type="linear")
    model.set_adapter("fused", inference_mode=True)
    return model, {"fused_rank": model.peft_config["fused"].r, "shared": sum(shared) / len(shared)}


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fresh(base: nn.Module) -> nn.Module:
    """A private copy of the pristine base (adapters wrap their base in place)."""
    return copy.deepcopy(base)
