"""Bad adapters and bad names: each refused with a message naming the file, key or argument,
and a failed load leaves the caller's model exactly as it was."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from shira_dist import PeftModel, ShiraConfig, get_peft_model
from tests.conftest import tiny_llama

KEY = "base_model.model.model.layers.0.self_attn.q_proj"
BAD_NAMES = ["/abs/path/evil", "../up", "a/b", "with space", "dot.name", "", "ü", 5]


def _saved(tmp_path, **cfg) -> str:
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], random_seed=0,
                                                     init_weights=False, **cfg))
    directory = str(tmp_path / "adapter")
    model.save_pretrained(directory)
    return directory


def _rewrite(directory: str, change) -> str:
    path = os.path.join(directory, "adapter_model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    return path


def _snapshot(model: torch.nn.Module) -> dict:
    return {"modules": {n: type(m).__name__ for n, m in model.named_modules()},
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def _assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"] and after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


@pytest.mark.parametrize("name", BAD_NAMES)
def test_adapter_names_that_could_form_a_path_are_refused_everywhere(tmp_path, name):
    directory = _saved(tmp_path)
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], random_seed=0))
    rule = r"an adapter name is one or more of A-Z a-z 0-9 _ -"
    with pytest.raises(ValueError, match=re.escape(f"adapter_name={name!r} is invalid: ") + rule):
        model.add_adapter(name, ShiraConfig(r=2, target_modules=["q_proj"], random_seed=1))
    with pytest.raises(ValueError, match=rule):
        model.load_adapter(directory, name)
    base = tiny_llama()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=rule):
        PeftModel.from_pretrained(base, directory, adapter_name=name)
    _assert_unchanged(base, before)
    with pytest.raises(ValueError, match=rule):
        get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"]), adapter_name=name)
    assert list(model.peft_config) == ["default"]


def test_saves_stay_inside_the_target_directory(tmp_path):
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], random_seed=0))
    model.add_adapter("second", ShiraConfig(r=2, target_modules=["q_proj"], random_seed=1))
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "second")  # a subfolder that leads out of the target
    with pytest.raises(ValueError, match=r"adapter 'second' would be saved to .*outside"):
        model.save_pretrained(str(out), selected_adapters=["second"])
    assert list(elsewhere.iterdir()) == []
    os.unlink(out / "second")
    model.save_pretrained(str(out))
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["adapter_config.json", "adapter_model.safetensors", "second/adapter_config.json",
                       "second/adapter_model.safetensors"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_unless_asked_for(tmp_path, bad):
    directory = _saved(tmp_path)

    def poison(tensors):
        tensors[KEY + ".shira_weight"][3] = bad

    path = _rewrite(directory, poison)
    base = tiny_llama()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=rf"{path}: {KEY}.shira_weight holds 1 non-finite values.*allow_non_finite"):
        PeftModel.from_pretrained(base, directory)
    _assert_unchanged(base, before)
    model = PeftModel.from_pretrained(tiny_llama(), directory, allow_non_finite=True)  # explicit opt-in
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not bool(torch.isfinite(layer.shira_weight["default"]).all())


def test_indices_must_be_whole_numbers(tmp_path):
    directory = _saved(tmp_path)
    reference = PeftModel.from_pretrained(tiny_llama(), directory)
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits

    path = _rewrite(directory, lambda t: t.update({KEY + ".shira_indices": t[KEY + ".shira_indices"].float()}))
    with torch.no_grad():  # whole numbers stored as floats load exactly
        torch.testing.assert_close(PeftModel.from_pretrained(tiny_llama(), directory)(ids).logits, expected,
                                   rtol=0, atol=0)
    _rewrite(directory, lambda t: t.update({KEY + ".shira_indices": t[KEY + ".shira_indices"] + 0.7}))
    base = tiny_llama()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=rf"{path}: {KEY}.shira_indices holds \d+ non-integer values .*whole numbers"):
        PeftModel.from_pretrained(base, directory)
    _assert_unchanged(base, before)
    _rewrite(directory, lambda t: t.update({KEY + ".shira_indices": torch.ones(t[KEY + ".shira_indices"].shape,
                                                                                 dtype=torch.bool)}))
    with pytest.raises(ValueError, match=rf"{KEY}.shira_indices is torch.bool; indices must be integers"):
        PeftModel.from_pretrained(tiny_llama(), directory)


def test_a_corrupt_weights_file_is_named(tmp_path):
    directory = _saved(tmp_path)
    path = os.path.join(directory, "adapter_model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=rf"{path}: not a readable adapter weights file"):
        PeftModel.from_pretrained(tiny_llama(), directory)


@pytest.mark.parametrize("content,match", [
    ([1, 2, 3], "an adapter config is a JSON object of fields, got a list"),
    ({"peft_type": "SHIRA", "r": 2, "target_modules": 5}, "target_modules=5 is invalid: expected a list"),
    ({"peft_type": "SHIRA", "r": "2"}, "r='2' is invalid"),
    ({"peft_type": "SHIRA", "r": 2, "target_modules": ["q_proj"], "random_seed": 1.5},
     "random_seed=1.5 is invalid: expected an integer or null"),
])
def test_bad_adapter_configs_name_the_file_and_field(tmp_path, content, match):
    directory = _saved(tmp_path)
    config = os.path.join(directory, "adapter_config.json")
    with open(config, "w") as f:
        json.dump(content, f)
    base = tiny_llama()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=rf"{config}: {match}"):
        PeftModel.from_pretrained(base, directory)
    _assert_unchanged(base, before)


def test_a_failed_load_leaves_the_model_as_it_was_and_a_retry_works(tmp_path):
    """A wrong-shape modules_to_save tensor is found before anything is injected."""
    directory = _saved(tmp_path, modules_to_save=["lm_head"])
    good = load_file(os.path.join(directory, "adapter_model.safetensors"))
    head_key = next(k for k in good if k.startswith("base_model.model.lm_head.modules_to_save") or
                    k.startswith("base_model.model.lm_head."))
    path = _rewrite(directory, lambda t: t.update({head_key: torch.zeros(3, 3)}))
    base = tiny_llama()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=rf"{path}: modules_to_save 'lm_head'.*shape \(3, 3\)"):
        PeftModel.from_pretrained(base, directory)
    _assert_unchanged(base, before)

    wrapped = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], random_seed=0))
    before = _snapshot(wrapped)
    with pytest.raises(ValueError, match="modules_to_save 'lm_head'"):
        wrapped.load_adapter(directory, "other")
    _assert_unchanged(wrapped, before)
    assert list(wrapped.peft_config) == ["default"]

    save_file(good, path)  # the same objects load once the file is right
    model = PeftModel.from_pretrained(base, directory)
    wrapped.load_adapter(directory, "other")
    assert torch.equal(model.base_model.model.lm_head.modules_to_save["default"].weight, good[head_key])
