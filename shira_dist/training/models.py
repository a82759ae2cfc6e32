"""The base model and tokenizer a run config names, and the SHiRA adapter around it.

    model.path            a local Hugging Face directory (config.json + weights [+ tokenizer])
    model.builtin         a packaged model (builtin_models.py; SmolLM2 is converted once, cached)
    model.inline_config   a transformers config mapping: random init from training.seed, no weights

The task picks the head: AutoModelForCausalLM (causal_lm, lm_classification) or
AutoModelForSequenceClassification with len(task.labels) outputs (a new head, initialised
from training.seed so every rank builds the same one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from .. import ShiraConfig, ShiraModel, get_peft_model
from ..masks import layer_shape, shira_budget
from ..targeting import find_targets
from .builtin_models import builtin_model_dir, check_builtin_available, default_cache_dir
from .config import ConfigError
from .schema import ModelConfig, RunConfig, ShiraSection, TaskConfig
from .tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_model_source(model: ModelConfig) -> None:
    """Fail fast (nothing loaded) when the model or tokenizer cannot be found."""
    if model.path is not None:
        if not os.path.isdir(model.path):
            raise FileNotFoundError(f"model.path={model.path!r} is not a directory (a local Hugging Face model "
                                    "directory is expected; nothing is downloaded)")
        if not os.path.isfile(os.path.join(model.path, "config.json")):
            raise FileNotFoundError(f"model.path={model.path!r} has no config.json: not a Hugging Face model directory")
    if model.builtin is not None:
        check_builtin_available(model.builtin)
    if model.tokenizer not in (None, "bytes") and not os.path.isdir(model.tokenizer):
        raise FileNotFoundError(f"model.tokenizer={model.tokenizer!r} is not a directory; allowed: null (the model's "
                                "own), 'bytes', or a local tokenizer directory")
    if model.inline_config is not None:
        from transformers import CONFIG_MAPPING

        model_type = model.inline_config["model_type"]
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"model.inline_config.model_type={model_type!r} is not a transformers model type "
                             "(e.g. llama, mistral, bert)")


def model_directory(model: ModelConfig) -> Optional[str]:
    """The directory weights load from (converting a built-in model first if needed)."""
    if model.path is not None:
        return model.path
    if model.builtin is not None:
        cache = Path(model.cache_dir) if model.cache_dir else default_cache_dir()
        return str(builtin_model_dir(model.builtin, cache))
    return None


def _auto_class(task: TaskConfig):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task.type == "sequence_classification" else AutoModelForCausalLM


def load_base_model(cfg: RunConfig, directory: Optional[str]) -> tuple[nn.Module, Tokenizer]:
    """The frozen base model and its tokenizer; new weights (inline model, new head) from training.seed."""
    from transformers import AutoConfig

    m, task = cfg.model, cfg.task
    extra = {"num_labels": len(task.labels)} if task.type == "sequence_classification" else {}
    torch.manual_seed(cfg.training.seed)
    if directory is None:
        settings = {k: v for k, v in m.inline_config.items() if k != "model_type"}
        hf_config = AutoConfig.for_model(m.inline_config["model_type"], **settings, **extra)
        model = _auto_class(task).from_config(hf_config, dtype=_DTYPES[m.dtype])
    else:
        model = _auto_class(task).from_pretrained(directory, dtype=_DTYPES[m.dtype], local_files_only=True, **extra)
    tokenizer = load_tokenizer(m.tokenizer or "", directory)
    embeddings = model.get_input_embeddings()
    if embeddings is not None and tokenizer.vocab_size > embeddings.num_embeddings:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has only "
                         f"{embeddings.num_embeddings} rows; raise vocab_size (model.inline_config) or pick "
                         "another tokenizer")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_id  # sequence classification finds the last token by it
    model.eval()  # dropout off: SHiRA fine-tuning here is deterministic; train() is never needed
    return model, tokenizer


def shira_config(section: ShiraSection, task: TaskConfig, base_name: str) -> ShiraConfig:
    task_type = "SEQ_CLS" if task.type == "sequence_classification" else "CAUSAL_LM"
    return ShiraConfig(r=section.r, mask_type=section.mask_type, random_seed=section.random_seed,
                       target_modules=section.target_modules, modules_to_save=section.modules_to_save,
                       task_type=task_type, base_model_name_or_path=base_name)


def check_adapter_fits(model: nn.Module, section: ShiraSection) -> None:
    """Every targeted layer has room for shira.r*(in+out) entries (works on a meta-device model too)."""
    try:
        targets = find_targets(model, section.target_modules)
    except ValueError as e:
        raise ConfigError(f"shira.target_modules={section.target_modules!r}: {e}") from None
    for name, module in targets:
        try:
            shira_budget(*layer_shape(module), section.r, where=name)
        except ValueError as e:
            raise ConfigError(f"shira.r={section.r} does not fit the model: {e}") from None


def meta_model(cfg: RunConfig) -> Optional[nn.Module]:
    """The configured model's architecture on the meta device (no weights, no memory), when its
    config is at hand without converting anything; else None."""
    from transformers import AutoConfig

    m, task = cfg.model, cfg.task
    extra = {"num_labels": len(task.labels)} if task.type == "sequence_classification" else {}
    if m.inline_config is not None:
        settings = {k: v for k, v in m.inline_config.items() if k != "model_type"}
        hf_config = AutoConfig.for_model(m.inline_config["model_type"], **settings, **extra)
    else:
        directory = m.path if m.path is not None else (
            model_directory(m) if m.builtin == "all-minilm-l6-v2" else None)  # smollm2: converted at first run
        if directory is None:
            return None
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True, **extra)
    with torch.device("meta"):
        return _auto_class(task).from_config(hf_config)


def build_adapter(base: nn.Module, cfg: RunConfig, resume_dir: Optional[str],
                  calibration: Optional[Iterable[dict]], loss_fn) -> ShiraModel:
    """A new adapter from cfg.shira, or the adapter saved in ``resume_dir`` (trainable)."""
    if resume_dir is not None:
        return ShiraModel.from_pretrained(base, resume_dir, is_trainable=True)
    check_adapter_fits(base, cfg.shira)
    base_name = cfg.model.path or cfg.model.builtin or f"inline:{cfg.model.inline_config['model_type']}"
    config = shira_config(cfg.shira, cfg.task, base_name)
    if cfg.shira.mask_type in ("gradient", "snip"):
        return get_peft_model(base, config, calibration_data=calibration, loss_fn=loss_fn)
    return get_peft_model(base, config)
