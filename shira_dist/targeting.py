"""Which modules of a model get a SHiRA adapter (and which are saved in full)."""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

# Default targets by ``config.model_type`` when ``target_modules`` is None (attention q/v,
# as PEFT does for LoRA/SHiRA).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "t5": ["q", "v"],
}

ALL_LINEAR = "all-linear"


def _is_internal(name: str) -> bool:
    """Submodules that adapters themselves own (never targets of a new adapter)."""
    parts = name.split(".")
    return "base_layer" in parts or "modules_to_save" in parts or "original_module" in parts


def name_matches(name: str, pattern: Union[list[str], str]) -> bool:
    """List: exact name or dotted suffix; string: full regex match."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (AttributeError, NotImplementedError):
            return None
    return None


def resolve_targets(model: nn.Module, target_modules: Optional[Union[list[str], str]]) -> Union[list[str], str]:
    if target_modules is not None:
        return target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ValueError(
        f"target_modules=None and model_type={model_type!r} has no default targets "
        f"(defaults exist for {sorted(DEFAULT_TARGETS)}); pass target_modules explicitly"
    )


def find_targets(model: nn.Module, target_modules: Optional[Union[list[str], str]]) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs to adapt, in model order; errors if nothing matches."""
    targets = resolve_targets(model, target_modules)
    if targets == ALL_LINEAR:
        head = _output_head(model)
        from .layer import ShiraLinear  # late import: layer does not depend on targeting

        found = [(n, m) for n, m in model.named_modules()
                 if not _is_internal(n) and isinstance(m, (nn.Linear, ShiraLinear)) and m is not head]
    else:
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"target_modules={targets!r} is not a valid regex: {e}") from e
        found = [(n, m) for n, m in model.named_modules() if n and not _is_internal(n) and name_matches(n, targets)]
    if not found:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _is_internal(n)]
        raise ValueError(
            f"target_modules={targets!r} matches no module of the model; "
            f"linear layers available include {linear[:12]}{' ...' if len(linear) > 12 else ''}"
        )
    return found


def find_modules_to_save(model: nn.Module, names: Optional[list[str]]) -> list[tuple[str, nn.Module]]:
    if not names:
        return []
    found = [(n, m) for n, m in model.named_modules() if n and not _is_internal(n) and name_matches(n, names)]
    matched = {t for t in names for n, _ in found if n == t or n.endswith("." + t)}
    missing = sorted(set(names) - matched)
    if missing:
        raise ValueError(f"modules_to_save={names!r}: {missing} match no module of the model")
    return found


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
