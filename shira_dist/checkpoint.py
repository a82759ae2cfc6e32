"""Adapter checkpoints in PEFT's format: adapter_config.json + adapter_model.safetensors.

    <dir>/adapter_config.json, <dir>/adapter_model.safetensors       adapter "default"
    <dir>/<name>/...                                                 any other adapter

Keys: ``base_model.model.<path>.shira_weight`` (values, (nnz,)),
``base_model.model.<path>.shira_indices`` ((2, nnz) int32, row 0 = output index,
row 1 = input index) and ``base_model.model.<path>.<param>`` for modules_to_save copies.
Files are written to a temp file and renamed, never half-written.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .io import atomic_write_bytes

if TYPE_CHECKING:
    from .config import ShiraConfig

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
WEIGHT_SUFFIX = ".shira_weight"
INDICES_SUFFIX = ".shira_indices"


def adapter_dir(save_directory: str | os.PathLike, adapter_name: str) -> str:
    return str(save_directory) if adapter_name == "default" else os.path.join(save_directory, adapter_name)


def write_adapter_tensors(directory: str, tensors: dict[str, Tensor]) -> None:
    os.makedirs(directory, exist_ok=True)
    blob = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write_bytes(os.path.join(directory, WEIGHTS_NAME), blob)


def write_adapter(save_directory: str | os.PathLike, adapter_name: str, tensors: dict[str, Tensor],
                  config: "ShiraConfig") -> None:
    """Write one adapter (tensors under PEFT keys + its config, as inference_mode) in PEFT's layout."""
    directory = adapter_dir(save_directory, adapter_name)
    write_adapter_tensors(directory, tensors)
    dataclasses.replace(config, inference_mode=True).save_pretrained(directory)


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {str(directory)!r}: not a saved SHiRA adapter")
    with open(path, "rb") as f:
        return st_load(f.read())


@dataclass
class AdapterTensors:
    """A checkpoint split by module: SHiRA (values, indices) and modules_to_save state."""

    shira: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # path -> (values, indices)
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # path -> that module's state_dict


def split_adapter_tensors(tensors: dict[str, Tensor], saved_paths: list[str]) -> AdapterTensors:
    """Group checkpoint keys by module path; ``saved_paths`` are the modules_to_save of the model."""
    out = AdapterTensors()
    values: dict[str, Tensor] = {}
    indices: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise ValueError(f"checkpoint key {key!r} does not start with {KEY_PREFIX!r}: not PEFT's format")
        name = key[len(KEY_PREFIX):]
        if name.endswith(WEIGHT_SUFFIX):
            values[name[: -len(WEIGHT_SUFFIX)]] = t
            continue
        if name.endswith(INDICES_SUFFIX):
            indices[name[: -len(INDICES_SUFFIX)]] = t
            continue
        owner = next((p for p in saved_paths if name.startswith(p + ".")), None)
        if owner is None:
            raise ValueError(f"checkpoint key {key!r} belongs to no SHiRA layer and no module in modules_to_save")
        out.saved.setdefault(owner, {})[name[len(owner) + 1:]] = t
    for path in sorted(set(values) | set(indices)):
        if path not in values or path not in indices:
            missing = "shira_weight" if path not in values else "shira_indices"
            raise ValueError(f"checkpoint has no {missing} for module {path!r}")
        v, i = values[path], indices[path]
        if v.dim() != 1 or i.dim() != 2 or i.shape != (2, v.shape[0]):
            raise ValueError(f"module {path!r}: shira_weight {tuple(v.shape)} and shira_indices {tuple(i.shape)} "
                             "do not fit ((nnz,) and (2, nnz))")
        out.shira[path] = (v, i.to(torch.int32) if i.dtype.is_floating_point else i)
    return out
