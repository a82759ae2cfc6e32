"""What the commands share: the saved adapter, the base model it applies to, and loading both.

    check_adapter_dir(dir)            a saved adapter (adapter_config.json + weights), else CommandError
    resolve_base(adapter_dir, base)   --base, else the adapter's recorded base_model_name_or_path,
                                      as a local model directory:
                                        a directory with config.json        used as is
                                        smollm2-135m-instruct, ...          a built-in model (models.py),
                                        (or builtin:<name>)                 converted once, offline
                                        inline:<type>, a hub id, nothing    CommandError: pass --base
    load_adapted(base, ..., adapter)  the base model with the adapter on it (a shira_dist.PeftModel);
                                      an adapter trained on a base of another shape is a CommandError
                                      naming the layer and both shapes (check_fits), before the model
                                      changes
    load_hf_tokenizer(dirs...)        the first directory's Hugging Face tokenizer that has one

Nothing here downloads: every model and tokenizer is a local directory.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from ... import PeftModel
from ...checkpoint import INDICES_SUFFIX, KEY_PREFIX, WEIGHT_SUFFIX, read_adapter_tensors, weights_path
from ..models import BUILTIN_MODELS, builtin_model_dir, default_cache_dir

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BUILTIN_PREFIX = "builtin:"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class CommandError(Exception):
    """Bad input to a command: the message names the argument, the value and what is allowed."""


# ---- the adapter ------------------------------------------------------------------------------
def check_adapter_dir(adapter: str, peft_types: tuple[str, ...] = ("SHIRA",)) -> dict:
    """The adapter's config (adapter_config.json), after checking ``adapter`` is a saved adapter of one of
    ``peft_types``."""
    if not os.path.isdir(adapter):
        raise CommandError(f"--adapter={adapter!r} is not a directory; give a saved adapter directory (the job "
                           "writes <output_dir>/final and <output_dir>/checkpoints/step-<N>)")
    config_path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise CommandError(f"--adapter={adapter!r} has no adapter_config.json: not a saved adapter")
    if not os.path.isfile(weights_path(adapter)):
        raise CommandError(f"--adapter={adapter!r} has no adapter_model.safetensors (or .bin): not a saved adapter")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CommandError(f"{config_path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict) or config.get("peft_type") not in peft_types:
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise CommandError(f"{config_path}: peft_type={found!r}; this command takes adapters of peft_type "
                           f"{' or '.join(map(repr, peft_types))}")
    return config


# ---- the base model ---------------------------------------------------------------------------
def resolve_base(adapter: str, adapter_config: dict, base: Optional[str]) -> str:
    """The local model directory the adapter applies to: ``base`` (--base), else what the adapter records."""
    if base is not None:
        name, where = base, f"--base={base!r}"
    else:
        name = adapter_config.get("base_model_name_or_path")
        where = f"the adapter's base_model_name_or_path={name!r} (in {os.path.join(adapter, 'adapter_config.json')})"
        if not name:
            raise CommandError(f"{where} names no base model; pass --base DIR (a local Hugging Face model directory)")
    if name.startswith(_BUILTIN_PREFIX):
        name = name[len(_BUILTIN_PREFIX):]
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise CommandError(f"{where}: the directory has no config.json, so it is not a Hugging Face model "
                               "directory; pass --base DIR")
        return name
    if name in BUILTIN_MODELS:
        try:
            return str(builtin_model_dir(name, default_cache_dir()))
        except (FileNotFoundError, ValueError) as e:
            raise CommandError(f"{where}: {e}") from None
    if name.startswith("inline:"):
        raise CommandError(f"{where} is a random-init model the job built from a run config's model.inline_config; "
                           "it has no weights to load. Pass --base DIR, or score the adapter with "
                           "`shira-dist eval --adapter DIR --config <the run's config>`")
    raise CommandError(f"{where} is neither a local directory nor a built-in model {list(BUILTIN_MODELS)}; nothing "
                       "is downloaded. Pass --base DIR (a local Hugging Face model directory)")


def quantization_of(base_dir: str) -> Optional[str]:
    """The quantization method config.json records (e.g. 'torchao', 'bitsandbytes'); None: a float model."""
    with open(os.path.join(base_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    quant = config.get("quantization_config")
    if not quant:
        return None
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else "unknown"


def load_base(base_dir: str, dtype: str, device: torch.device) -> nn.Module:
    """The causal LM in ``base_dir``, in eval mode (``dtype``: a DTYPES key; "auto" keeps the stored one)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError) as e:
        raise CommandError(f"base model {base_dir!r} does not load as a causal LM: {e}") from None
    return model.to(device).eval()


# ---- the base with the adapter on it ------------------------------------------------------------
def shape_mismatch(base: nn.Module, adapter: str, r: int) -> Optional[str]:
    """The first adapter tensor that cannot sit on ``base``, described with both shapes; None if all fit.

    A SHiRA layer stores r*(in+out) entries with indices (2, nnz) = (output row, input column),
    so its trained shape shows as (out, in) with out + in = nnz / r (exact when the entries reach
    the last row and column, as random and structured masks of that size do)."""
    modules = dict(base.named_modules())
    params = dict(base.named_parameters())
    tensors = read_adapter_tensors(adapter)
    for key in sorted(tensors, key=lambda k: (not k.endswith(INDICES_SUFFIX), k)):  # SHiRA layers first
        tensor = tensors[key]
        path = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        if key.endswith(INDICES_SUFFIX):
            layer = path[: -len(INDICES_SUFFIX)]
            module = modules.get(layer)
            if not isinstance(module, nn.Linear):
                found = "missing" if module is None else f"a {type(module).__name__}"
                return f"the adapter has a SHiRA layer {layer}, which is {found} in this base model"
            out_f, in_f = module.out_features, module.in_features
            nnz = tensor.shape[-1]
            rows, cols = (int(tensor[0].max()) + 1, int(tensor[1].max()) + 1) if nnz else (0, 0)
            if nnz != r * (in_f + out_f) or rows > out_f or cols > in_f:
                trained = f"({rows}, {cols})" if rows + cols == nnz // max(r, 1) else \
                    f"at least ({rows}, {cols}) with out+in={nnz // max(r, 1)}"
                return (f"layer {layer} is ({out_f}, {in_f}) (out, in) in this base model, but the adapter was "
                        f"trained on a {trained} weight ({nnz} entries at r={r})")
        elif not key.endswith(WEIGHT_SUFFIX) and path in params and tuple(params[path].shape) != tuple(tensor.shape):
            return (f"{path} is {tuple(params[path].shape)} in this base model, but the adapter saved it as "
                    f"{tuple(tensor.shape)} (modules_to_save)")
    return None


def does_not_fit(adapter: str, adapter_config: dict, base_dir: str, problem: str,
                 remedy: str = "pass that model as --base") -> CommandError:
    recorded = adapter_config.get("base_model_name_or_path")
    return CommandError(f"the adapter in {adapter!r} does not fit the base model {base_dir!r}: {problem}. It was "
                        f"trained on another base (its adapter_config.json records base_model_name_or_path="
                        f"{recorded!r}); {remedy}")


def check_fits(base: nn.Module, base_dir: str, adapter: str, adapter_config: dict,
               remedy: str = "pass that model as --base") -> None:
    """CommandError naming the first layer whose shape differs between ``base`` and the SHiRA adapter."""
    problem = shape_mismatch(base, adapter, int(adapter_config.get("r") or 0))
    if problem is not None:
        raise does_not_fit(adapter, adapter_config, base_dir, problem, remedy)


def load_adapted(base: nn.Module, base_dir: str, adapter: str, adapter_config: dict) -> PeftModel:
    """``base`` with the adapter from ``adapter`` (for inference); CommandError if it was trained on another base."""
    check_fits(base, base_dir, adapter, adapter_config)
    try:
        return PeftModel.from_pretrained(base, adapter)
    except ValueError as e:  # the checkpoint's own checks (finite values, indices, keys)
        raise does_not_fit(adapter, adapter_config, base_dir, str(e)) from None


def load_hf_tokenizer(*directories: Optional[str]):
    """The Hugging Face tokenizer of the first directory that holds one; None if none does."""
    from transformers import AutoTokenizer

    for directory in directories:
        if directory and any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return None


def pick_device(name: str) -> torch.device:
    """``name``: auto (CUDA when available), cpu, cuda or cuda:<i>."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device={name!r}: CUDA is not available on this machine; allowed here: auto, cpu")
    return torch.device(name)
