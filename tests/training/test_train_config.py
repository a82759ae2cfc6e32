"""Run configs: the shipped ones load; unknown keys and bad values fail with messages that
name the key, the value and what is allowed; overrides; path resolution; round trip."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from shira_dist.training.config import ConfigError, config_from_dict, config_to_yaml, load_run_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _tiny(*overrides: str):
    return load_run_config(str(ROOT / "configs" / "tiny.yaml"), list(overrides))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_run_config(str(path))
    assert os.path.isabs(cfg.output_dir)
    assert cfg.distributed.strategy in ("single", "ddp", "fsdp", "deepspeed")


def test_shipped_configs_cover_the_issue():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "default.yaml", "minilm_sentiment.yaml", "smollm2_chatterbot.yaml"} <= names
    default = load_run_config(str(ROOT / "configs" / "default.yaml"))
    assert default.model.builtin == "smollm2-135m-instruct"
    assert default.data.prepare == "rotten_tomatoes" and default.task.type == "lm_classification"
    minilm = load_run_config(str(ROOT / "configs" / "minilm_sentiment.yaml"))
    assert minilm.task.type == "sequence_classification" and minilm.shira.modules_to_save == ["classifier"]


def test_overrides_set_nested_keys_with_yaml_values():
    cfg = _tiny("training.max_steps=3", "shira.r=4", "output_dir=/tmp/x", "shira.random_seed=null",
                "shira.target_modules=[q_proj, v_proj]", "training.learning_rate=1e-3", "tracking=none")
    assert cfg.training.max_steps == 3 and cfg.shira.r == 4 and cfg.output_dir == "/tmp/x"
    assert cfg.shira.random_seed is None and cfg.shira.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.learning_rate == pytest.approx(1e-3) and cfg.tracking.backend == "none"
    assert _tiny("tracking.mode=offline").tracking.backend == "wandb"  # the short form expands first


@pytest.mark.parametrize("override, words", [
    ("max_stepz=3", ["'max_stepz'", "allowed keys at the top level", "'training'"]),
    ("training.max_stpes=3", ["'training.max_stpes'", "'max_steps'", "'gradient_accumulation_steps'"]),
    ("model.inline_config.hidden_size.x=1", ["model.inline_config.hidden_size", "is a value, not a section"]),
])
def test_unknown_keys_name_the_key_and_the_allowed_ones(override, words):
    with pytest.raises(ConfigError) as err:
        _tiny(override)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("override, words", [
    ("training.max_steps=abc", ["training.max_steps='abc'", "an integer"]),
    ("training.max_steps=true", ["training.max_steps=True", "an integer"]),
    ("training.max_steps=0", ["training.max_steps=0", ">= 1"]),
    ("distributed.strategy=horovod", ["'horovod'", "'single'", "'ddp'", "'fsdp'", "'deepspeed'"]),
    ("shira.mask_type=dense", ["shira.mask_type='dense'", "'random'", "'snip'"]),
    ("training.precision=fp8", ["'fp8'", "'bf16'"]),
    ("training.adam_betas=[0.9]", ["adam_betas", "two numbers"]),
    ("task.label_words=[n]", ["task.label_words", "one word per label"]),
    ("data.train_files=[a.jsonl]", ["data.prepare='synthetic_sentiment'", "leave data.train_files"]),
    ("model.builtin=smollm2-135m-instruct", ["exactly one of path, builtin, inline_config"]),
    ("task.prompt_template=no fields", ["task.prompt_template", "uses no example field"]),
    ("distributed.zero_stage=2", ["zero_stage", "'deepspeed'"]),
    ("tracking.mode=sometimes", ["'sometimes'", "'offline'"]),
    ("training.num_threads=0", ["training.num_threads=0", ">= 1, 'auto' or null"]),
    ("training.num_threads=many", ["training.num_threads='many'", "an integer or one of ['auto'] or null"]),
])
def test_bad_values_name_the_value_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as err:
        _tiny(override)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_bad_override_syntax_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="use dotted.key=value"):
        _tiny("training.max_steps")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        load_run_config(str(tmp_path / "missing.yaml"))
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_run_config(str(listing))


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _tiny("output_dir=runs/a", "data.prepare=null", "data.train_files=[d/train.csv]",
                "data.eval_files=[d/eval.csv]")
    assert cfg.output_dir == str(tmp_path / "runs" / "a")
    assert cfg.data.train_files == [str(tmp_path / "d" / "train.csv")]
    assert cfg.data.cache_dir == str(tmp_path / "runs" / "a" / "cache" / "datasets")


def test_resolved_yaml_round_trips():
    cfg = _tiny("training.max_steps=7", "shira.target_modules=q_proj|v_proj")
    again = config_from_dict(yaml.safe_load(config_to_yaml(cfg)))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
