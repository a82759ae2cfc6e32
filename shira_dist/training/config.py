"""Load a run config: YAML file + ``key=value`` overrides -> a checked :class:`RunConfig`.

    load_run_config("configs/tiny.yaml", ["training.max_steps=3", "shira.r=4"])

Unknown keys are errors naming the key and the allowed ones; a bad value names the value
and what is allowed. Override values are parsed as YAML (``3`` is an int, ``null`` is None,
``[a, b]`` a list). Relative paths become absolute (against the current directory), so the
resolved config written to ``<output_dir>/resolved_config.yaml`` runs from anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
import typing
from typing import Any, Literal, Union

import yaml

from ..masks import CALIBRATED_MASKS
from .errors import ConfigError
from .formats import templates_set
from .lora_baseline import check_lora_config
from .quantize import check_quantization
from .schema import RunConfig

__all__ = ["ConfigError", "load_run_config", "config_from_dict", "config_to_yaml"]


# ---- raw YAML + overrides -------------------------------------------------------------------
def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: no such file")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of keys, got a {type(data).__name__}")
    return data


def apply_override(data: dict, override: str) -> None:
    """``a.b.c=value`` sets data["a"]["b"]["c"] (value parsed as YAML)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is invalid: use dotted.key=value, e.g. training.max_steps=3")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {e}") from e
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None or child == "none" and part == "tracking":
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


# ---- typed conversion -------------------------------------------------------------------
def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin is Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a section (mapping)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}={value!r} is invalid: expected {_describe(tp)}")
    if tp is Any:
        return value
    if origin is Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} is invalid; allowed: {list(typing.get_args(tp))}")
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build_section(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise bad
        if not math.isfinite(number):
            raise ConfigError(f"{where}={value!r} is invalid: expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"schema type {tp!r} of {where} is not supported by the config loader")


def build_section(cls: type, data: dict, where: str) -> Any:
    """A dataclass from a mapping: unknown keys are errors, every value is type-checked."""
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in allowed:
            place = f"in {where!r}" if where else "at the top level"
            raise ConfigError(f"unknown key {(where + '.' if where else '') + str(key)!r}; allowed keys {place}: {allowed}")
    values = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**values)


# ---- semantic checks -------------------------------------------------------------------
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _template_fields(template: str, where: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{where}={template!r} is not a valid format string: {e}") from e


def check_run_config(cfg: RunConfig) -> None:
    """Cross-field rules the types cannot express."""
    m, t, d, s, tr, dist = cfg.model, cfg.task, cfg.data, cfg.shira, cfg.training, cfg.distributed
    sources = [k for k in ("path", "builtin", "inline_config") if getattr(m, k) is not None]
    _require(len(sources) == 1, f"model: set exactly one of path, builtin, inline_config (got {sources or 'none'})")
    if m.inline_config is not None:
        _require(isinstance(m.inline_config.get("model_type"), str),
                 f"model.inline_config={m.inline_config!r} needs a model_type (e.g. llama)")
        _require(m.tokenizer is not None, "model.inline_config has no tokenizer of its own: set model.tokenizer "
                                          "to 'bytes' or a local tokenizer directory")

    fields = _template_fields(t.prompt_template, "task.prompt_template")
    _require(bool(fields), f"task.prompt_template={t.prompt_template!r} uses no example field (e.g. '{{text}}')")
    if t.response_template is not None:
        _require(t.type == "causal_lm", f"task.response_template is for task.type='causal_lm', not {t.type!r}")
        _template_fields(t.response_template, "task.response_template")
    if t.format not in ("auto", "template"):
        _require(t.type == "causal_lm", f"task.format={t.format!r} is for task.type='causal_lm'; task.type={t.type!r} "
                                        "reads template rows (task.format auto or template, with task.prompt_template "
                                        "and task.label_field)")
        _require(not templates_set(t), f"task.prompt_template/response_template are read by task.format 'template' "
                                       f"only, but task.format={t.format!r} renders rows itself: remove them, or set "
                                       "task.format: template")
    if t.type == "causal_lm":
        _require(t.labels is None and t.label_words is None,
                 "task.labels/label_words are for classification tasks, not task.type='causal_lm'")
    else:
        _require(t.labels is not None and len(t.labels) >= 2 and len(set(t.labels)) == len(t.labels),
                 f"task.labels={t.labels!r} is invalid: task.type={t.type!r} needs two or more distinct labels")
    if t.type == "lm_classification":
        _require(t.label_words is not None and len(t.label_words) == len(t.labels),
                 f"task.label_words={t.label_words!r} is invalid: give one word per label in task.labels={t.labels}")
    elif t.label_words is not None:
        _require(False, f"task.label_words is only for task.type='lm_classification', not {t.type!r}")
    _require(t.max_length >= 4, f"task.max_length={t.max_length} is invalid: must be >= 4")
    _require(not t.packing or t.type == "causal_lm",
             f"task.packing=true is for task.type='causal_lm' (several examples per row), not {t.type!r}: "
             "classification scores one example per row; set task.packing=false")
    if t.sample_prompts:
        _require(t.type == "causal_lm", f"task.sample_prompts is for task.type='causal_lm' (generated answers), "
                                        f"not {t.type!r}; remove it")
        _require(all(isinstance(p, str) and p.strip() for p in t.sample_prompts),
                 f"task.sample_prompts={t.sample_prompts!r} is invalid: every prompt must be non-empty text")
        _require(cfg.distributed.strategy in ("single", "ddp"),
                 f"task.sample_prompts needs distributed.strategy single or ddp (rank 0 generates alone), not "
                 f"{cfg.distributed.strategy!r}: a sharded model generates only with every rank; remove the prompts")
        _require(cfg.model.tokenizer != "bytes", "task.sample_prompts needs a transformers tokenizer, not "
                                                 "model.tokenizer='bytes'")
    _require(t.sample_max_new_tokens >= 1,
             f"task.sample_max_new_tokens={t.sample_max_new_tokens} is invalid: must be >= 1")

    if d.prepare is not None:
        _require(not d.train_files and not d.eval_files,
                 f"data.prepare={d.prepare!r} writes its own files: leave data.train_files and data.eval_files empty")
    else:
        _require(bool(d.train_files), "data: set data.train_files (local csv/json/jsonl/parquet/txt) or data.prepare")
    for key in ("max_train_examples", "max_eval_examples"):
        value = getattr(d, key)
        _require(value is None or value >= 1, f"data.{key}={value} is invalid: must be >= 1 or null")

    _require(s.r >= 1, f"shira.r={s.r} is invalid: must be >= 1")
    _require(s.calibration_batches >= 1, f"shira.calibration_batches={s.calibration_batches} is invalid: must be >= 1")

    for key in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "log_every"):
        _require(getattr(tr, key) >= 1, f"training.{key}={getattr(tr, key)} is invalid: must be >= 1")
    for key in ("warmup_steps", "eval_every", "save_every", "weight_decay", "max_nonfinite_steps"):
        _require(getattr(tr, key) >= 0, f"training.{key}={getattr(tr, key)} is invalid: must be >= 0")
    _require(tr.learning_rate > 0, f"training.learning_rate={tr.learning_rate} is invalid: must be > 0")
    _require(0.0 <= tr.min_lr_ratio <= 1.0, f"training.min_lr_ratio={tr.min_lr_ratio} is invalid: must be in [0, 1]")
    _require(len(tr.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in tr.adam_betas),
             f"training.adam_betas={tr.adam_betas} is invalid: two numbers in [0, 1)")
    _require(tr.max_grad_norm is None or tr.max_grad_norm > 0,
             f"training.max_grad_norm={tr.max_grad_norm} is invalid: must be > 0 or null (no clipping)")
    for key in ("keep_checkpoints", "eval_batch_size", "stop_after_step"):
        value = getattr(tr, key)
        _require(value is None or value >= 1, f"training.{key}={value} is invalid: must be >= 1 or null")
    _require(tr.num_threads in (None, "auto") or tr.num_threads >= 1,
             f"training.num_threads={tr.num_threads} is invalid: must be >= 1, 'auto' or null")
    _require(tr.resume != "", "training.resume='' is invalid; allowed: auto, never, or a checkpoint directory")

    _require(dist.timeout_minutes >= 1, f"distributed.timeout_minutes={dist.timeout_minutes} is invalid: must be >= 1")
    if dist.strategy != "deepspeed":
        _require(dist.deepspeed_config is None and dist.zero_stage is None,
                 f"distributed.deepspeed_config/zero_stage are for strategy 'deepspeed', not {dist.strategy!r}")
        _require(dist.zero_init is not True,
                 f"distributed.zero_init=true is for strategy 'deepspeed' with ZeRO stage 3, not {dist.strategy!r}")
    _require(not (dist.zero_init is True and cfg.model.inline_config is not None),
             "distributed.zero_init=true needs weights loaded from model.path or model.builtin: a random-init "
             "model.inline_config is built whole, so every engine and every resumed run draws the same weights")
    _require(not (dist.zero_init is True and s.mask_type in CALIBRATED_MASKS),
             f"distributed.zero_init=true with shira.mask_type={s.mask_type!r} is invalid: data-driven masks score "
             "the whole model before it is sharded; use zero_init auto/false (the model is then built whole first)")
    check_quantization(cfg)
    check_lora_config(cfg)


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def resolve_paths(cfg: RunConfig) -> None:
    cfg.output_dir = _absolute(cfg.output_dir)
    cfg.model.path = _absolute(cfg.model.path)
    cfg.model.cache_dir = _absolute(cfg.model.cache_dir)
    if cfg.model.tokenizer not in (None, "bytes"):
        cfg.model.tokenizer = _absolute(cfg.model.tokenizer)
    cfg.data.train_files = [_absolute(p) for p in cfg.data.train_files]
    cfg.data.eval_files = [_absolute(p) for p in cfg.data.eval_files]
    cfg.data.cache_dir = _absolute(cfg.data.cache_dir) or os.path.join(cfg.output_dir, "cache", "datasets")
    cfg.distributed.deepspeed_config = _absolute(cfg.distributed.deepspeed_config)
    if cfg.training.resume not in ("auto", "never"):
        cfg.training.resume = _absolute(cfg.training.resume)


# ---- entry points -------------------------------------------------------------------
def config_from_dict(data: dict) -> RunConfig:
    data = dict(data)
    if data.get("tracking") == "none":  # short form
        data["tracking"] = {"backend": "none"}
    cfg = build_section(RunConfig, data, "")
    check_run_config(cfg)
    resolve_paths(cfg)
    return cfg


def load_run_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path)
    for override in overrides or []:
        apply_override(data, override)
    return config_from_dict(data)


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
