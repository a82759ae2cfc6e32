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
import io
import os
import re
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
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's safe_serialization=False
KEY_PREFIX = "base_model.model."
WEIGHT_SUFFIX = ".shira_weight"
INDICES_SUFFIX = ".shira_indices"


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_adapter_name(adapter_name: object, argument: str = "adapter_name") -> str:
    """Adapter names are names: letters, digits, '_' and '-' (a name is also a subfolder of saves)."""
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name):
        raise ValueError(f"{argument}={adapter_name!r} is invalid: an adapter name is one or more of "
                         "A-Z a-z 0-9 _ - (it names a subfolder when saved, so no '/', '.', spaces or others)")
    return adapter_name


def adapter_dir(save_directory: str | os.PathLike, adapter_name: str) -> str:
    """Where adapter ``adapter_name`` is saved: ``save_directory`` itself for "default", else a
    subfolder; never outside ``save_directory``."""
    check_adapter_name(adapter_name)
    if adapter_name == "default":
        return str(save_directory)
    directory = os.path.join(save_directory, adapter_name)
    root = os.path.realpath(save_directory)
    if os.path.commonpath([root, os.path.realpath(directory)]) != root:
        raise ValueError(f"adapter {adapter_name!r} would be saved to {directory!r}, outside {str(save_directory)!r} "
                         "(a symlink?); save it elsewhere")
    return directory


def write_adapter_tensors(directory: str, tensors: dict[str, Tensor], safe_serialization: bool = True) -> None:
    """``adapter_model.safetensors``, or PEFT's pickled ``adapter_model.bin`` when not
    ``safe_serialization``; the other form, if present from an earlier save, is removed."""
    os.makedirs(directory, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if safe_serialization:
        blob = st_save(plain, metadata={"format": "pt"})
    else:
        buffer = io.BytesIO()
        torch.save(plain, buffer)
        blob = buffer.getvalue()
    name, stale = (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME) if safe_serialization else (PICKLE_WEIGHTS_NAME, WEIGHTS_NAME)
    atomic_write_bytes(os.path.join(directory, name), blob)
    if os.path.exists(os.path.join(directory, stale)):
        os.remove(os.path.join(directory, stale))


def write_adapter(save_directory: str | os.PathLike, adapter_name: str, tensors: dict[str, Tensor],
                  config: "ShiraConfig", safe_serialization: bool = True) -> None:
    """Write one adapter (tensors under PEFT keys + its config, as inference_mode) in PEFT's layout."""
    directory = adapter_dir(save_directory, adapter_name)
    write_adapter_tensors(directory, tensors, safe_serialization)
    dataclasses.replace(config, inference_mode=True).save_pretrained(directory)


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of ``adapter_model.safetensors`` (or PEFT's ``adapter_model.bin``, read
    with ``weights_only=True``: tensors only, no code)."""
    path = weights_path(directory)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {str(directory)!r}: not a saved SHiRA adapter")
    with open(path, "rb") as f:
        data = f.read()
    try:
        if path.endswith(PICKLE_WEIGHTS_NAME):
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
                raise TypeError("not a dict of tensors")
            return tensors
        return st_load(data)
    except Exception as e:  # safetensors and torch raise their own error types, none naming the file
        raise ValueError(f"{path}: not a readable adapter weights file ({type(e).__name__}: {e})") from None


def weights_path(directory: str | os.PathLike) -> str:
    """The adapter's weights file: safetensors, else PEFT's pickled form where only that exists."""
    safe = os.path.join(directory, WEIGHTS_NAME)
    pickled = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    return pickled if not os.path.isfile(safe) and os.path.isfile(pickled) else safe


@dataclass
class AdapterTensors:
    """A checkpoint split by module: SHiRA (values, indices) and modules_to_save state."""

    shira: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # path -> (values, indices)
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # path -> that module's state_dict


def split_adapter_tensors(tensors: dict[str, Tensor], saved_paths: list[str], source: str = "checkpoint",
                          allow_non_finite: bool = False) -> AdapterTensors:
    """Group checkpoint keys by module path and check them; ``saved_paths`` are the model's
    modules_to_save. Errors name ``source`` (the file) and the key.

    Values and modules_to_save tensors must be finite (NaN/inf would give non-finite outputs)
    unless ``allow_non_finite``; indices must be integers, or floats holding integers.
    """
    out = AdapterTensors()
    values: dict[str, Tensor] = {}
    indices: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise ValueError(f"{source}: key {key!r} does not start with {KEY_PREFIX!r}: not PEFT's format")
        name = key[len(KEY_PREFIX):]
        if name.endswith(INDICES_SUFFIX):
            indices[name[: -len(INDICES_SUFFIX)]] = _integral(t, key, source)
            continue
        if t.is_floating_point() and not allow_non_finite and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{source}: {key} holds {int((~torch.isfinite(t)).sum())} non-finite values (NaN or "
                             "inf); refusing to load it (allow_non_finite=True loads it anyway)")
        if name.endswith(WEIGHT_SUFFIX):
            if not t.is_floating_point():
                raise ValueError(f"{source}: {key} is {t.dtype}; SHiRA values are floating point")
            values[name[: -len(WEIGHT_SUFFIX)]] = t
            continue
        owner = next((p for p in saved_paths if name.startswith(p + ".")), None)
        if owner is None:
            raise ValueError(f"{source}: key {key!r} belongs to no SHiRA layer and no module in modules_to_save")
        out.saved.setdefault(owner, {})[name[len(owner) + 1:]] = t
    for path in sorted(set(values) | set(indices)):
        if path not in values or path not in indices:
            missing = "shira_weight" if path not in values else "shira_indices"
            raise ValueError(f"{source}: no {missing} for module {path!r}")
        v, i = values[path], indices[path]
        if v.dim() != 1 or i.dim() != 2 or i.shape != (2, v.shape[0]):
            raise ValueError(f"{source}: module {path!r}: shira_weight {tuple(v.shape)} and shira_indices "
                             f"{tuple(i.shape)} do not fit ((nnz,) and (2, nnz))")
        out.shira[path] = (v, i)
    return out


def _integral(t: Tensor, key: str, source: str) -> Tensor:
    """Indices as int32; a float tensor must hold whole numbers (never truncated silently)."""
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{source}: {key} is {t.dtype}; indices must be integers")
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != t.round())
        if bool(bad.any()):
            raise ValueError(f"{source}: {key} holds {int(bad.sum())} non-integer values (e.g. {t[bad][0].item()}); "
                             "indices must be whole numbers")
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > 2**31 - 1):
        raise ValueError(f"{source}: {key} holds indices outside [0, 2^31)")
    return t.to(torch.int32)
