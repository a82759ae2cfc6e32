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
        peft_layers[name].shira_indices["default"] = layer.shira_indices["default"].clone()

    l_fused, l_unfused, l_peft = _train(fused, 4), _train(unfused, 4), _train(pm, 4)
    assert all(layer.fused for _, layer in _layers(fused)) and not any(layer.fused for _, layer in _layers(unfused))
    torch.testing.assert_close(l_fused, l_unfused, rtol=1e-5, atol=0)  # fp32: only summation order differs
    torch.testing.assert_close(l_fused, l_peft, rtol=1e-5, atol=0)
    # Values: AdamW divides by sqrt(v), so fp32 summation-order noise in near-zero gradients can
    # move a value by a small fraction of one step (lr=1e-2); 1e-4 is 1 % of a step.
    for (name, a), (_, b) in zip(_layers(fused), _layers(unfused)):
        torch.testing.assert_close(a.shira_weight["default"], b.shira_weight["default"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a.shira_weight["default"], peft_layers[name].shira_weight["default"],
                                   atol=1e-4, rtol=0)


def test_fused_weight_outside_mask_is_bit_identical_and_no_drift():
    base = tiny_llama()
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = get_peft_model(base, ShiraConfig(r=2, target_modules=TARGETS, random_seed=0))
    _train(model, 4)
    model(_batches(1)[0])  # a training forward after the last optimizer step re-writes the fused entries
    for name, layer in _layers(model):
        w = layer.base_layer.weight.detach()
        ref0 = w0[name[len("base_model.model."):]]
        idx = layer.shira_indices["default"].long()
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[idx[0], idx[1]] = True
        assert torch.equal(w[~mask], ref0[~mask]), name
        # After 4 steps the nnz entries are exactly one rounding of W0 + v (re-written, not accumulated).
        expected = (ref0[idx[0], idx[1]] + layer.shira_weight["default"].detach()).to(w.dtype)
        assert torch.equal(w[idx[0], idx[1]], expected), name
        assert torch.equal(model.state_dict()[name + ".base_layer.weight"], ref0)  # state_dict reports W0
    with torch.no_grad():  # a forward without autograd runs unfused, on W0 restored bit for bit
        model(_batches(1)[0])
    for name, layer in _layers(model):
        assert not layer.fused and torch.equal(layer.base_layer.weight, w0[name[len("base_model.model."):]]), name


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
    assert not layers["base_model.model.lm_head"].fused and layers["base_model.model.model.layers.0.self_attn.q_proj"].fused
    assert "tied" in layers["base_model.model.lm_head"].fuse_blocker()
    with pytest.raises(ValueError, match="lm_head: cannot run fused: its weight is shared.*tied"):
        model.set_fuse_mode("fused")
    assert {layer.fuse_mode for layer in layers.values()} == {"auto"}  # checked before any layer changed
    with pytest.raises(ValueError, match="fuse mode 'sometimes' is invalid"):
        model.set_fuse_mode("sometimes")

    half = get_peft_model(tiny_llama(dtype=torch.bfloat16), ShiraConfig(r=2, target_modules=["q_proj"]))
    half(ids)
    assert not any(layer.fused for _, layer in _layers(half))


def test_base_layer_hooks_fire_in_fused_mode():
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"]))
    q = dict(_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
    seen = []
    q.base_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    model(_batches(1)[0])
    assert q.fused and len(seen) == 1


def _reference_logits(model, ids):
    """The same model's logits in the pure mode (base forward + sparse product), then back to auto."""
    model.set_fuse_mode("unfused")
    with torch.no_grad():
        out = model(ids).logits
    model.set_fuse_mode("auto")
    return out


def test_fuses_only_into_the_weight_it_wrapped():
    """A weight swapped in by someone else (an engine's gathered copy) is never written into: the
    layer runs unfused on it and leaves it untouched."""
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False, random_seed=0))
    ids = _batches(1)[0]
    q = dict(_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
    original = q.base_layer.weight
    swapped = torch.nn.Parameter(original.detach().clone(), requires_grad=False)
    q.base_layer.weight = swapped
    before = swapped.detach().clone()
    loss = model(ids, labels=ids).loss
    assert not q.fused and "not the parameter this layer wrapped" in q.fuse_blocker()
    assert torch.equal(swapped, before)
    q.base_layer.weight = original
    torch.testing.assert_close(loss, model(ids, labels=ids).loss, rtol=1e-6, atol=0)
    assert q.fused


def test_a_weight_replaced_while_fused_is_a_clear_error():
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False, random_seed=0))
    ids = _batches(1)[0]
    q = dict(_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
    model(ids, labels=ids)  # a training forward: W0 + delta written in place
    carried = torch.nn.Parameter(q.base_layer.weight.detach().clone(), requires_grad=False)  # e.g. a sharding copy
    original, q.base_layer.weight = q.base_layer.weight, carried
    with pytest.raises(RuntimeError, match=r"^model.layers.0.self_attn.q_proj: its base weight was replaced.*"
                                           r"model.unfuse\(\)"):
        model(ids)
    q.base_layer.weight = original
    model.unfuse()  # the way to hand the model over: W0 again, bit for bit
    assert not q.fused
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _reference_logits(model, ids), rtol=0, atol=1e-6)


def test_copies_moves_and_pickles_of_a_fused_model_hold_w0():
    import copy
    import io

    base_w = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False, random_seed=0))
    ids = _batches(1)[0]
    model(ids, labels=ids)
    expected = _reference_logits(model, ids)
    model(ids, labels=ids)
    q = lambda m: dict(_layers(m))["base_model.model.model.layers.0.self_attn.q_proj"]  # noqa: E731
    assert q(model).fused
    twin = copy.deepcopy(model)
    assert torch.equal(q(twin).base_layer.weight, base_w) and torch.equal(q(model).base_layer.weight, base_w)
    buf = io.BytesIO()
    model(ids, labels=ids)
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(q(loaded).base_layer.weight, base_w)
    for other in (twin, loaded):
        other(ids, labels=ids)
        assert q(other).fused  # each copy fuses into its own weight
        with torch.no_grad():
            torch.testing.assert_close(other(ids).logits, expected, rtol=0, atol=1e-6)
    model(ids, labels=ids)
    model.double()  # converts W0, not W0 + delta
    assert not q(model).fused and torch.equal(q(model).base_layer.weight, base_w.double())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected.double(), rtol=0, atol=1e-5)


def test_several_active_adapters_train_fused_like_unfused():
    """Two adapters active at once, their patterns overlapping: every fused forward re-merges
    both from W0 (one adapter's saved entries may hold the other's delta)."""
    def build(mode):
        m = get_peft_model(tiny_llama(), ShiraConfig(r=8, target_modules=["q_proj", "up_proj"], random_seed=0),
                           adapter_name="a")
        m.add_adapter("b", ShiraConfig(r=8, target_modules=["q_proj", "up_proj"], random_seed=1))
        m.set_adapter(["a", "b"])
        m.set_fuse_mode(mode)
        return m

    fused, unfused = build("auto"), build("unfused")
    q = dict(_layers(fused))["base_model.model.model.layers.0.self_attn.q_proj"]
    a, b = (set(map(tuple, q.shira_indices[n].t().tolist())) for n in ("a", "b"))
    assert a & b  # r=8 of a 32x32 weight: the two patterns share entries
    torch.testing.assert_close(_train(fused, 4), _train(unfused, 4), rtol=1e-5, atol=0)
    assert q.fused
    for (_, x), (_, y) in zip(_layers(fused), _layers(unfused)):
        for n in ("a", "b"):
            torch.testing.assert_close(x.shira_weight[n], y.shira_weight[n], atol=1e-5, rtol=0)


def test_disabling_unmerges_and_merging_needs_enabled_adapters():
    """The forward never changes merges: disabling adapters unmerges them at the call."""
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False, random_seed=0))
    ids = _batches(1)[0]
    with torch.no_grad():
        y0 = tiny_llama()(ids).logits
        model.merge_adapter()
        q = dict(_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
        q.enable_adapters(False)
        assert not q.merged
        with pytest.raises(ValueError, match="q_proj: adapters are disabled; enable them before merging"):
            q.merge()
        for _, layer in _layers(model):
            layer.enable_adapters(False)
        assert torch.equal(model(ids).logits, y0)
