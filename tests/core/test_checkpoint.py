"""Checkpoints in PEFT's format, exact round trips, interop with the real peft package, bad files."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import shira_dist
from shira_dist import PeftModel, ShiraConfig, get_peft_model
from tests.conftest import tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _trained(adapter="default", **kw):
    cfg = ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], random_seed=0, init_weights=False, **kw)
    return get_peft_model(tiny_llama(), cfg, adapter_name=adapter)


def test_format_keys_dtypes_and_subfolders(tmp_path):
    model = _trained(modules_to_save=["lm_head"])
    model.add_adapter("other", ShiraConfig(r=1, target_modules=["k_proj"], random_seed=1))
    model.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SHIRA" and cfg["r"] == 2 and cfg["target_modules"] == ["q_proj", "v_proj"]
    sd = load_file(tmp_path / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert sd[f"{q}.shira_weight"].shape == (2 * 64,)
    assert sd[f"{q}.shira_indices"].dtype == torch.int32 and sd[f"{q}.shira_indices"].shape == (2, 128)
    assert "base_model.model.lm_head.weight" in sd
    assert len(sd) == 2 * 2 * 2 + 1
    sub = load_file(tmp_path / "other" / "adapter_model.safetensors")
    assert set(sub) == {f"base_model.model.model.layers.{i}.self_attn.k_proj.shira_{s}" for i in (0, 1) for s in ("weight", "indices")}
    assert not list(tmp_path.glob("**/.tmp-*"))


def test_selected_adapters(tmp_path):
    model = _trained()
    model.add_adapter("other", ShiraConfig(r=1, target_modules=["k_proj"]))
    model.save_pretrained(str(tmp_path), selected_adapters=["other"])
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()


def test_round_trip_exact(tmp_path, ids):
    model = _trained(modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    y = _logits(model, ids)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert torch.equal(_logits(loaded, ids), y)
    a, b = model.adapter_state_dict("default"), loaded.adapter_state_dict("default")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False
    trainable = PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}


def test_load_adapter_second_name(tmp_path, ids):
    src = _trained()
    src.save_pretrained(str(tmp_path))
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"]))
    model.load_adapter(str(tmp_path), "loaded")
    assert model.active_adapters == ["default"]
    model.set_adapter("loaded")
    torch.testing.assert_close(_logits(model, ids), _logits(src, ids), atol=1e-6, rtol=0)


def test_shira_dist_adapter_loads_in_peft(tmp_path, ids):
    model = _trained(modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    model.save_pretrained(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(_logits(pm, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_peft_adapter_loads_in_shira_dist(tmp_path, ids):
    cfg = peft.ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], random_seed=0, init_weights=False,
                           modules_to_save=["lm_head"])
    pm = peft.get_peft_model(tiny_llama(), cfg)
    pm.save_pretrained(str(tmp_path))
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(_logits(model, ids), _logits(pm, ids), atol=1e-5, rtol=0)
    # The same import-only switch: shira_dist.PeftModel
    model2 = shira_dist.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert torch.equal(_logits(model2, ids), _logits(model, ids))


def test_unsorted_indices_round_trip_exactly(tmp_path, ids):
    src = _trained()
    src.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    g = torch.Generator().manual_seed(0)
    for k in [k for k in sd if k.endswith(".shira_weight")]:
        perm = torch.randperm(sd[k].numel(), generator=g)
        sd[k] = sd[k][perm].contiguous()
        idx = k.replace("shira_weight", "shira_indices")
        sd[idx] = sd[idx][:, perm].contiguous()
    save_file(sd, path)
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(_logits(model, ids), _logits(src, ids), atol=1e-5, rtol=0)
    out = tmp_path / "again"
    model.save_pretrained(str(out))
    sd2 = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def _saved(tmp_path):
    _trained().save_pretrained(str(tmp_path))
    return tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"


def test_load_errors_name_the_problem(tmp_path):
    weights, config = _saved(tmp_path)
    sd = load_file(weights)
    k = "base_model.model.model.layers.1.self_attn.v_proj"

    def load():
        return PeftModel.from_pretrained(tiny_llama(), str(tmp_path))

    bad = dict(sd)
    bad[f"{k}.shira_indices"] = bad[f"{k}.shira_indices"].clone()
    bad[f"{k}.shira_indices"][0, 0] = 10_000
    save_file(bad, weights)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.v_proj.*out of range"):
        load()

    bad = {kk.replace("layers.1.", "layers.7."): v for kk, v in sd.items()}
    save_file(bad, weights)
    with pytest.raises(ValueError, match=r"model.layers.7.self_attn.*not a target"):
        load()

    bad = {kk: v for kk, v in sd.items() if not kk.startswith(k)}
    save_file(bad, weights)
    with pytest.raises(ValueError, match=r"no SHiRA tensors for targeted module 'model.layers.1.self_attn.v_proj'"):
        load()

    bad = dict(sd)
    bad[f"{k}.shira_weight"] = torch.zeros(5)
    bad[f"{k}.shira_indices"] = torch.zeros(2, 5, dtype=torch.int32)
    save_file(bad, weights)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.v_proj.*has 5 indices, expected"):
        load()

    save_file(sd, weights)
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="peft_type='LORA' is not supported"):
        load()
    os.unlink(config)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load()
    config.write_text(json.dumps(data))
    os.unlink(weights)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load()


def test_load_into_a_model_of_other_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _saved(tmp_path)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=101))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*expected r\*\(in\+out\)"):
        PeftModel.from_pretrained(other, str(tmp_path))


def test_interrupted_save_leaves_no_half_written_file(tmp_path, monkeypatch):
    model = _trained()
    model.save_pretrained(str(tmp_path))
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    real_fsync = os.fsync

    def crash(fd):
        real_fsync(fd)
        raise KeyboardInterrupt("simulated crash during save")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(tmp_path))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert not list(tmp_path.glob(".tmp-*"))


def test_config_round_trip_and_validation(tmp_path):
    cfg = ShiraConfig(r=4, target_modules=["a", "b"], random_seed=3, modules_to_save=["head"])
    cfg.save_pretrained(str(tmp_path))
    back = ShiraConfig.from_pretrained(str(tmp_path))
    assert back == cfg and back.mask_fn is shira_dist.random_mask
    assert cfg.to_dict()["peft_type"] == "SHIRA" and "mask_fn" not in cfg.to_dict()
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.warns(UserWarning, match="ignoring unknown adapter_config keys"):
        ShiraConfig.from_dict({**d, "brand_new_field": 1})
    with pytest.raises(ValueError, match="peft_type='LORA'"):
        ShiraConfig(peft_type="LORA")
    # PEFT's own config class reads ours
    pc = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert pc.r == 4 and pc.peft_type == peft.PeftType.SHIRA
