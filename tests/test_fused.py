"""Fused mode: the base weight holds W0 + deltas in place; same results as unfused and as PEFT SHiRA."""

from __future__ import annotations

import peft
import pytest
import torch

from shira_dist import ShiraConfig, ShiraLinear, get_peft_model
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(n=4):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 101, (2, 9), generator=g) for _ in range(n)]


def _train(model, steps, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for ids in _batches(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ShiraLinear)]


@pytest.mark.parametrize("mask_type", ["random", "struct"])
def test_fused_training_matches_unfused_and_peft(mask_type):
    cfg = dict(r=2, target_modules=TARGETS, mask_type=mask_type, random_seed=0)
    fused = get_peft_model(tiny_llama(), ShiraConfig(**cfg))
    unfused = get_peft_model(tiny_llama(), ShiraConfig(**cfg))
    unfused.set_fuse_mode("unfused")
    # PEFT SHiRA on the same mask: copy our indices into its layers.
    pm = peft.get_peft_model(tiny_llama(), peft.ShiraConfig(r=2, target_modules=TARGETS, random_seed=0))
    peft_layers = {n: m for n, m in pm.named_modules() if hasattr(m, "shira_indices") and isinstance(m.shira_indices, dict)}
    for name, layer in _layers(fused):
        peft_layers["base_model." + name].shira_indices["default"] = layer.shira_indices["default"].clone()

    l_fused, l_unfused, l_peft = _train(fused, 4), _train(unfused, 4), _train(pm, 4)
    assert all(layer.fused for _, layer in _layers(fused)) and not any(layer.fused for _, layer in _layers(unfused))
    torch.testing.assert_close(l_fused, l_unfused, rtol=1e-5, atol=0)  # fp32: only summation order differs
    torch.testing.assert_close(l_fused, l_peft, rtol=1e-5, atol=0)
    # Values: AdamW divides by sqrt(v), so fp32 summation-order noise in near-zero gradients can
    # move a value by a small fraction of one step (lr=1e-2); 1e-4 is 1 % of a step.
    for (name, a), (_, b) in zip(_layers(fused), _layers(unfused)):
        torch.testing.assert_close(a.shira_weight["default"], b.shira_weight["default"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a.shira_weight["default"], peft_layers["base_model." + name].shira_weight["default"],
                                   atol=1e-4, rtol=0)


def test_fused_weight_outside_mask_is_bit_identical_and_no_drift():
    base = tiny_llama()
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = get_peft_model(base, ShiraConfig(r=2, target_modules=TARGETS, random_seed=0))
    _train(model, 4)
    with torch.no_grad():
        model(_batches(1)[0])  # the forward after an optimizer step re-writes the fused entries
    for name, layer in _layers(model):
        w = layer.base_layer.weight.detach()
        ref0 = w0[name[len("model."):]]
        idx = layer.shira_indices["default"].long()
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[idx[0], idx[1]] = True
        assert torch.equal(w[~mask], ref0[~mask]), name
        # After 4 steps the nnz entries are exactly one rounding of W0 + v (re-written, not accumulated).
        expected = (ref0[idx[0], idx[1]] + layer.shira_weight["default"].detach()).to(w.dtype)
        assert torch.equal(w[idx[0], idx[1]], expected), name
        assert torch.equal(model.state_dict()[name + ".base_layer.weight"], ref0)  # state_dict reports W0
        layer.unfuse()
        assert torch.equal(layer.base_layer.weight, ref0)


def test_fused_switch_disable_and_merge_roundtrip():
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False, random_seed=0),
                           adapter_name="a")
    model.add_adapter("b", ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False, random_seed=1))
    ref = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False, random_seed=0),
                         adapter_name="a")
    ref.add_adapter("b", ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False, random_seed=1))
    ref.set_fuse_mode("unfused")
    with torch.no_grad():
        for name_src, name_dst in zip(_layers(ref), _layers(model)):
            for a in ("a", "b"):
                name_dst[1].shira_weight[a].copy_(name_src[1].shira_weight[a])
    ids = _batches(1)[0]
    base = tiny_llama()
    with torch.no_grad():
        y0 = base(ids).logits
        for active in ("a", "b", ["a", "b"], "a"):
            model.set_adapter(active)
            ref.set_adapter(active)
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, y0)
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
        plain = model.unload()
        assert torch.equal(plain(ids).logits, y0)


def test_auto_falls_back_for_tied_and_half_precision_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, tie_word_embeddings=True)
    torch.manual_seed(0)
    tied = LlamaForCausalLM(cfg)
    model = get_peft_model(tied, ShiraConfig(r=2, target_modules=["lm_head", "q_proj"], init_weights=False))
    ids = _batches(1)[0]
    model(ids)
    layers = dict(_layers(model))
    assert not layers["model.lm_head"].fused and layers["model.model.layers.0.self_attn.q_proj"].fused
    assert "tied" in layers["model.lm_head"].fuse_blocker()
    model.set_fuse_mode("fused")
    with pytest.raises(RuntimeError, match="lm_head.*cannot fuse.*tied"):
        model(ids)
    with pytest.raises(ValueError, match="fuse mode 'sometimes' is invalid"):
        model.set_fuse_mode("sometimes")

    half = get_peft_model(tiny_llama(dtype=torch.bfloat16), ShiraConfig(r=2, target_modules=["q_proj"]))
    half(ids)
    assert not any(layer.fused for _, layer in _layers(half))


def test_base_layer_hooks_fire_in_fused_mode():
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"]))
    q = dict(_layers(model))["model.model.layers.0.self_attn.q_proj"]
    seen = []
    q.base_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    model(_batches(1)[0])
    assert q.fused and len(seen) == 1
