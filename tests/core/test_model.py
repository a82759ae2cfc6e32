"""ShiraModel: injection, training, multiple adapters, disable, merge/unload, modules_to_save, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shira_dist import ShiraConfig, ShiraLinear, ShiraModel, get_peft_model
from tests.conftest import tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _cfg(**kw):
    kw.setdefault("r", 2)
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    kw.setdefault("random_seed", 0)
    return ShiraConfig(**kw)


def test_fresh_adapter_gives_base_output_and_init_false_changes_it(llama, ids):
    y0 = _logits(llama, ids)
    model = get_peft_model(llama, _cfg())
    assert torch.equal(_logits(model, ids), y0)
    model2 = get_peft_model(tiny_llama(), _cfg(init_weights=False))
    assert not torch.allclose(_logits(model2, ids), y0)


def test_wrapped_model_paths_and_fallthrough(llama):
    model = get_peft_model(llama, _cfg())
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, ShiraLinear) and isinstance(q.base_layer, nn.Linear)
    assert model.config.model_type == "llama"  # attribute fall-through
    assert model.get_base_model() is llama
    assert model.peft_config["default"].r == 2 and model.active_adapter == "default"
    assert model.active_adapters == ["default"]


def test_all_linear_skips_output_head_and_regex_targets(llama):
    model = get_peft_model(llama, _cfg(target_modules="all-linear"))
    names = [n for n, m in model.named_modules() if isinstance(m, ShiraLinear)]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    model2 = get_peft_model(tiny_llama(), _cfg(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"))
    names2 = sorted(n for n, m in model2.named_modules() if isinstance(m, ShiraLinear))
    assert names2 == ["base_model.model.model.layers.1.self_attn.q_proj", "base_model.model.model.layers.1.self_attn.v_proj"]


def test_default_targets_by_model_type(llama):
    model = get_peft_model(llama, ShiraConfig(r=2))
    names = sorted(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, ShiraLinear))
    assert names == ["q_proj", "q_proj", "v_proj", "v_proj"]


def test_training_changes_only_shira_values(llama, ids):
    model = get_peft_model(llama, _cfg())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".shira_weight.default" in n for n in trainable)
    # state_dict() reports base weights as W0 even while fused deltas sit in them.
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.state_dict().items():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), n
    assert len(trainable) == 4


def test_multiple_adapters_switch_add_up_and_disable(llama, ids):
    y0 = _logits(llama, ids)
    model = get_peft_model(llama, _cfg(init_weights=False), adapter_name="a")
    model.add_adapter("b", _cfg(init_weights=False, random_seed=1, target_modules=["q_proj", "k_proj"]))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".b"))
    ya = _logits(model, ids)
    model.set_adapter("b")
    yb = _logits(model, ids)
    assert model.active_adapter == "b"
    assert any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".b"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".a"))
    assert not torch.allclose(ya, yb) and not torch.allclose(ya, y0)
    # Several active adapters add up: compare at the layer level, where the sum is exact.
    model.set_adapter(["a", "b"])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    w0 = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach()
    x = torch.randn(3, 32)
    dense = q.get_delta_weight("a").to_dense() + q.get_delta_weight("b").to_dense()
    torch.testing.assert_close(q(x), x @ (w0 + dense).t(), atol=1e-5, rtol=0)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), y0)
    assert model.active_adapters == ["a", "b"]
    torch.testing.assert_close(q(x), x @ (w0 + dense).t(), atol=1e-5, rtol=0)


def test_disable_adapter_restores_merged_state(llama, ids):
    y0 = _logits(llama, ids)
    model = get_peft_model(llama, _cfg(init_weights=False))
    y1 = _logits(model, ids)
    model.merge_adapter()
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), y0)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.merged_adapters == ["default"]
    torch.testing.assert_close(_logits(model, ids), y1, atol=1e-5, rtol=0)


def test_merge_and_unload_and_unload(llama, ids):
    base_state = {k: v.clone() for k, v in llama.state_dict().items()}
    model = get_peft_model(llama, _cfg(init_weights=False))
    y1 = _logits(model, ids)
    merged = get_peft_model(tiny_llama(), _cfg(init_weights=False)).merge_and_unload()
    assert not any(isinstance(m, ShiraLinear) for m in merged.modules())
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(merged, ids), y1, atol=1e-5, rtol=0)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, ShiraLinear) for m in plain.modules())
    for k, v in plain.state_dict().items():
        assert torch.equal(v, base_state[k]), k


def test_merge_twice_warns_and_changes_nothing(llama):
    model = get_peft_model(llama, _cfg(init_weights=False))
    model.merge_adapter()
    w = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, w)


def test_delete_adapter(llama, ids):
    model = get_peft_model(llama, _cfg(init_weights=False), adapter_name="a")
    model.add_adapter("b", _cfg(init_weights=False, random_seed=5))
    model.merge_adapter(["a"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'a' is merged"):
        model.delete_adapter("a")
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.unmerge_adapter()
    model.delete_adapter("a")
    assert list(model.peft_config) == ["b"] and model.active_adapters == ["b"]
    assert not any(k.endswith(".a") for k in model.state_dict())
    with pytest.raises(ValueError, match="unknown adapter 'a'"):
        model.set_adapter("a")


def test_modules_to_save_copy_per_adapter(llama, ids):
    model = get_peft_model(llama, _cfg(modules_to_save=["lm_head"]), adapter_name="a")
    head = model.base_model.model.lm_head
    assert head.modules_to_save["a"].weight.requires_grad
    assert not head.original_module.weight.requires_grad
    with torch.no_grad():
        head.modules_to_save["a"].weight.add_(1.0)
    y_a = _logits(model, ids)
    model.add_adapter("b", _cfg(modules_to_save=["lm_head"]))
    model.set_adapter("b")
    assert head.modules_to_save["b"].weight.requires_grad and not head.modules_to_save["a"].weight.requires_grad
    y_b = _logits(model, ids)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), y_b)  # b's head is an untouched copy, b's values are zero
    model.set_adapter("a")
    assert torch.equal(_logits(model, ids), y_a) and not torch.allclose(y_a, y_b)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(r=0), ValueError, r"r=0 is invalid"),
        (dict(r=-3), ValueError, r"r=-3 is invalid"),
        (dict(target_modules=["nope"]), ValueError, r"matches no module.*available include"),
        (dict(target_modules=["embed_tokens"]), TypeError, r"Embedding.*supported module types: torch.nn.Linear"),
        (dict(target_modules="(("), ValueError, r"not a valid regex"),
        (dict(r=40), ValueError, r"r=40 too large for model.layers.0.self_attn.q_proj"),
        (dict(modules_to_save=["missing_head"]), ValueError, r"missing_head"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(kwargs, exc, match):
    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(exc, match=match):
        get_peft_model(model, _cfg(**{**dict(r=2), **kwargs}))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_unknown_mask_type_needs_mask_fn(llama):
    with pytest.warns(UserWarning, match="not built in"):
        cfg = _cfg(mask_type="mystery")
    with pytest.raises(ValueError, match="mask_type='mystery' is unknown.*built-in mask types"):
        get_peft_model(llama, cfg)


def test_unknown_adapter_names_error(llama):
    model = get_peft_model(llama, _cfg())
    for call in (lambda: model.set_adapter("x"), lambda: model.delete_adapter("x"),
                 lambda: model.merge_adapter(["x"]), lambda: model.save_pretrained("/tmp/never", selected_adapters=["x"])):
        with pytest.raises(ValueError, match="unknown adapter 'x'"):
            call()
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", _cfg())
    with pytest.raises(KeyError, match="unknown adapter 'x'"):
        model.base_model.model.model.layers[0].self_attn.q_proj.set_scale("x", 2.0)


def test_trainable_parameter_report(llama, capsys):
    model = get_peft_model(llama, _cfg())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * (2 * (32 + 32) + 2 * (16 + 32))  # q: 32x32, v: 16x32, 2 layers
    assert total == sum(p.numel() for p in llama.parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out
    assert not any(".shira_indices." in name for name, _ in model.named_parameters())  # indices are buffers


def test_wrapping_twice_is_an_error(llama):
    model = get_peft_model(llama, _cfg())
    with pytest.raises(TypeError, match="already has SHiRA adapters"):
        get_peft_model(model, _cfg())
    with pytest.raises(TypeError, match="already a ShiraModel"):
        ShiraModel(model.base_model, _cfg())
