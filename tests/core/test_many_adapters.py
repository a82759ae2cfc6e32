"""Many adapters: combined (add_weighted_adapter), disjoint masks, overlap metrics, hot-swapping.

References are dense and built by hand: each adapter's (out, in) delta, and TIES / DARE
computed on those dense tensors with the same density and generator. fp32; tolerances 1e-6.
"""

from __future__ import annotations

import peft
import pytest
import torch

from shira_dist import PeftModel, ShiraConfig, adapter_overlap, get_peft_model
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj"]
WEIGHTS = [1.0, 0.5, -0.7]
DENSITY = 0.6


def _model(names=("a", "b", "c"), r=2):
    model = get_peft_model(tiny_llama(), ShiraConfig(r=r, target_modules=TARGETS, random_seed=0, init_weights=False),
                           adapter_name=names[0])
    for i, name in enumerate(names[1:], start=1):
        model.add_adapter(name, ShiraConfig(r=r, target_modules=TARGETS, random_seed=i, init_weights=False))
    return model


def _dense(layer, name) -> torch.Tensor:
    return layer.get_delta_weight(name).to_dense().double()


def _own_rowmajor(layer, name) -> torch.Tensor:
    """(nnz,) flat positions of an adapter's entries, row-major."""
    idx = layer.shira_indices[name].long()
    return (idx[0] * layer.in_features + idx[1]).sort().values


def _reference(layer, combination: str, generator: torch.Generator) -> torch.Tensor:
    """The combined delta (out, in), computed on dense tensors."""
    deltas, kept = [], []
    for name, w in zip("abc", WEIGHTS):
        dense, own = _dense(layer, name).flatten(), _own_rowmajor(layer, name)
        if combination in ("magnitude_prune", "ties"):
            keep = -(-int(DENSITY * own.numel() * 1e6) // int(1e6))  # ceil without float surprises
            order = torch.argsort(dense[own].abs(), descending=True, stable=True)[:keep]
            out = torch.zeros_like(dense)
            out[own[order]] = dense[own[order]]
            dense = out
        elif combination.startswith("dare"):
            keep = torch.rand(own.numel(), generator=generator) < DENSITY
            out = torch.zeros_like(dense)
            out[own[keep]] = dense[own[keep]] / DENSITY
            dense = out
        deltas.append(w * dense)
        kept.append(dense != 0)
    stack = torch.stack(deltas)
    if combination.endswith("ties"):
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        result = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    else:
        result = stack.sum(0)
    return result.reshape(layer.out_features, layer.in_features)


@pytest.mark.parametrize("combination", ["linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
def test_weighted_adapter_equals_the_dense_reference_and_is_an_ordinary_adapter(tmp_path, combination):
    model = _model()
    model.add_weighted_adapter(["a", "b", "c"], WEIGHTS, "mix", combination_type=combination,
                               density=None if combination == "linear" else DENSITY, seed=7)
    generator = torch.Generator().manual_seed(7)
    r = model.peft_config["mix"].r
    for path, layer in model.shira_layers():
        expected = _reference(layer, combination, generator)
        torch.testing.assert_close(_dense(layer, "mix"), expected, atol=1e-6, rtol=0, msg=lambda m: f"{path}: {m}")
        assert layer.shira_weight["mix"].numel() == r * (layer.in_features + layer.out_features)  # padded budget
    assert r >= 2 and "mix" not in model.active_adapters

    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    model.set_adapter("mix")
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
        model.save_pretrained(str(tmp_path), selected_adapters=["mix"])
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mix"))(ids).logits
        reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mix"))(ids).logits
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)  # PEFT loads it (r' budget)
        torch.testing.assert_close(reloaded, ours, atol=1e-6, rtol=0)
        weights = {p: layer.base_layer.weight.detach().clone() for p, layer in model.shira_layers()}
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, ours, atol=1e-5, rtol=0)
        model.unmerge_adapter()
        assert all(torch.equal(layer.base_layer.weight, weights[p]) for p, layer in model.shira_layers())


def test_weighted_adapter_refuses_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="weights has 2 entries for 3 adapters"):
        model.add_weighted_adapter(["a", "b", "c"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="combination_type='svd' is invalid"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="svd")
    with pytest.raises(ValueError, match=r"needs density in \(0, 1\]"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="ties")
    with pytest.raises(ValueError, match="unknown adapter 'z'"):
        model.add_weighted_adapter(["a", "z"], [1.0, 1.0], "mix")
    assert list(model.peft_config) == ["a", "b", "c"]


def _calibration():
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 101, (2, 2, 9), generator=g)]


@pytest.mark.parametrize("mask_type", ["random", "struct", "weight_magnitude", "gradient", "snip"])
def test_disjoint_masks_share_no_entry_and_keep_the_budget(mask_type):
    model = get_peft_model(tiny_llama(), ShiraConfig(r=4, target_modules=TARGETS, random_seed=0), adapter_name="a")
    model.add_adapter("b", ShiraConfig(r=4, target_modules=TARGETS, random_seed=1, mask_type="struct"))
    calibration = _calibration() if mask_type in ("gradient", "snip") else None
    model.add_adapter("c", ShiraConfig(r=4, target_modules=TARGETS, random_seed=2, mask_type=mask_type,
                                       disjoint_from=["a", "b"]), calibration_data=calibration)
    for path, layer in model.shira_layers():
        c = set(_own_rowmajor(layer, "c").tolist())
        assert len(c) == 4 * (layer.in_features + layer.out_features), path
        assert not c & set(_own_rowmajor(layer, "a").tolist()) and not c & set(_own_rowmajor(layer, "b").tolist())
    stats = adapter_overlap(model, "a", "c")
    assert stats["overall"]["shared"] == 0.0


def test_overlap_metrics_against_dense():
    model = _model(("a", "b"), r=4)
    with torch.no_grad():
        for _, layer in model.shira_layers():
            layer.set_scale("b", 1.5)
    stats = adapter_overlap(model, "a", "b")
    for path, layer in model.shira_layers():
        d1, d2 = _dense(layer, "a"), _dense(layer, "b")
        s1, s2 = set(_own_rowmajor(layer, "a").tolist()), set(_own_rowmajor(layer, "b").tolist())
        product = d1.t() @ d2
        structure = ((d1 != 0).double().t() @ (d2 != 0).double()) != 0
        got = stats["layers"][path]
        assert got["shared"] == pytest.approx(len(s1 & s2) / min(len(s1), len(s2)))
        assert got["awom"] == pytest.approx(float(product.norm()), rel=1e-9)
        assert got["awor"] == pytest.approx(1 - int(structure.sum()) / layer.in_features ** 2)
    with pytest.raises(ValueError, match="disjoint_from=\\['x'\\]|unknown adapter 'x'"):
        model.add_adapter("d", ShiraConfig(r=4, target_modules=TARGETS, disjoint_from=["x"]))


def test_hotswap_equals_a_fresh_load_and_switching_leaves_the_base_exact(tmp_path):
    donor = _model(("a", "b"))
    donor.save_pretrained(str(tmp_path))
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))  # "a" as "default"
    model.eval()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    buffers = (q.shira_indices.pattern("default").crow, q.shira_weight["default"])
    model.load_adapter(str(tmp_path / "b"), "default", hotswap=True)
    assert q.shira_indices.pattern("default").crow is buffers[0] and q.shira_weight["default"] is buffers[1]
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fresh = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "b"))(ids).logits
        torch.testing.assert_close(model(ids).logits, fresh, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        model.load_adapter(str(tmp_path / "b"), "zz", hotswap=True)

    base = {p: layer.base_layer.weight.detach().clone() for p, layer in donor.shira_layers()}
    for i in range(100):  # switch the fused model between the two adapters
        donor.unmerge_adapter() if i else None
        donor.set_adapter("a" if i % 2 else "b")
        donor.merge_adapter()
    donor.unmerge_adapter()
    assert all(torch.equal(layer.base_layer.weight, base[p]) for p, layer in donor.shira_layers())


def test_switch_adapter_equals_merging_it_and_restores_the_base_exactly():
    """``switch_adapter`` (the adapter bank's switch) leaves the weights bit-identical to
    unmerging and merging the new adapters, serves them (outputs equal to the unmerged model
    with them active), works for a set of adapters, and after 100 switches and an unmerge the
    base weights are bit-identical to the start."""
    model = _model(("a", "b", "c"))
    model.eval()
    layers = dict(model.shira_layers())
    base = {p: layer.base_layer.weight.detach().clone() for p, layer in layers.items()}
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    model.set_adapter("a")
    model.merge_adapter()
    for names in ("b", ["a", "c"], "c", "a"):
        model.switch_adapter(names)
        assert model.active_adapters == ([names] if isinstance(names, str) else names)
        switched = {p: layer.base_layer.weight.detach().clone() for p, layer in layers.items()}
        with torch.no_grad():
            served = model(ids).logits
            model.unmerge_adapter()
            unmerged = model(ids).logits  # unmerged, same active adapters: the sparse product
            model.merge_adapter()
        torch.testing.assert_close(served, unmerged, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(layer.base_layer.weight, switched[p]) for p, layer in layers.items())
    for i in range(100):
        model.switch_adapter("b" if i % 2 else "c")
    model.unmerge_adapter()
    assert all(torch.equal(layer.base_layer.weight, base[p]) for p, layer in layers.items())
    assert all(not layer.shira_weight[n].requires_grad for layer in layers.values() for n in ("a", "b", "c"))
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        model.switch_adapter("zz")
