"""Random masks done right: exact count, distinct, O(nnz), per-layer seeds, fresh without a seed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from shira_dist import ShiraConfig, get_peft_model, random_mask
from shira_dist.masks import mask_to_indices


@pytest.mark.parametrize("out_f,in_f,r", [(7, 13, 1), (13, 7, 2), (64, 64, 32), (100, 3, 2), (5, 5, 2)])
def test_random_mask_exact_distinct_count(out_f, in_f, r):
    layer = nn.Linear(in_f, out_f)
    mask = random_mask(layer, r, random_seed=0)
    assert mask.is_sparse and mask.is_coalesced() and mask.shape == (out_f, in_f)
    idx = mask.indices()
    assert idx.shape[1] == r * (in_f + out_f)
    flat = idx[0] * in_f + idx[1]
    assert flat.unique().numel() == flat.numel()
    assert mask.device == layer.weight.device and mask.dtype == layer.weight.dtype


def test_r_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match=r"r=4 too large .*r\*\(in\+out\)=40 > in\*out=25"):
        random_mask(nn.Linear(5, 5), 4)


def test_seeded_masks_reproduce_and_unseeded_are_fresh():
    layer = nn.Linear(30, 40)
    a = random_mask(layer, 2, random_seed=7).indices()
    b = random_mask(layer, 2, random_seed=7).indices()
    c = random_mask(layer, 2, random_seed=8).indices()
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = random_mask(layer, 2).indices()
    torch.manual_seed(0)
    e = random_mask(layer, 2).indices()
    assert not torch.equal(d, e)  # PEFT's randperm would repeat here


def _qv_indices(model):
    return {n: m.shira_indices["default"].clone() for n, m in model.named_modules() if hasattr(m, "shira_indices")}


def test_model_masks_differ_per_layer_and_reproduce_across_runs(llama):
    from tests.conftest import tiny_llama

    m1 = get_peft_model(llama, ShiraConfig(r=2, target_modules=["q_proj", "o_proj"], random_seed=3))
    m2 = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj", "o_proj"], random_seed=3))
    i1, i2 = _qv_indices(m1), _qv_indices(m2)
    assert i1.keys() == i2.keys() and all(torch.equal(i1[k], i2[k]) for k in i1)
    same_shape = [i1[k] for k in sorted(i1)]  # q_proj and o_proj are all 32x32
    assert all(not torch.equal(same_shape[0], other) for other in same_shape[1:])
    torch.manual_seed(0)
    m3 = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"]))
    torch.manual_seed(0)
    m4 = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"]))
    k = "base_model.model.model.layers.0.self_attn.q_proj"
    assert not torch.equal(_qv_indices(m3)[k], _qv_indices(m4)[k])


@pytest.mark.parametrize("mask_type", ["random", "struct"])
def test_large_layer_mask_is_O_nnz_memory(mask_type):
    # 4096 x 14336 on the meta device: a dense mask would need 235 MB (fp32), a dense bool 59 MB,
    # PEFT's randperm 470 MB. Measured in a fresh process by peak RSS growth.
    code = f"""
import json, resource, torch
from torch import nn
from shira_dist import MASK_FUNCTIONS
layer = nn.Linear(14336, 4096, device="meta")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = MASK_FUNCTIONS["{mask_type}"](layer, 32, random_seed=0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"nnz": int(m._nnz()), "grow_mb": (after - before) / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["nnz"] == 32 * (4096 + 14336)
    assert res["grow_mb"] < 120, res


def test_custom_mask_fn_result_is_validated_with_layer_name(llama):
    cfg = ShiraConfig(r=2, target_modules=["q_proj"])
    cfg.mask_fn = lambda layer, r, **kw: torch.zeros_like(layer.weight)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*selects 0 entries"):
        get_peft_model(llama, cfg)


def test_mask_to_indices_validation():
    with pytest.raises(ValueError, match="shape"):
        mask_to_indices(torch.ones(3, 4), (4, 3), 12, "L")
    with pytest.raises(ValueError, match="only 0 and 1"):
        mask_to_indices(torch.full((2, 2), 0.5), (2, 2), 4, "L")
    dense = torch.zeros(3, 4)
    dense[1, 2] = dense[0, 3] = 1
    idx = mask_to_indices(dense, (3, 4), 2, "L")
    assert idx.dtype == torch.int32 and idx.tolist() == [[0, 1], [3, 2]]


@pytest.mark.parametrize("out_f,in_f,r", [(7, 13, 1), (13, 7, 2), (64, 64, 31), (3, 40000, 1)])
def test_random_csr_is_random_mask_in_csr_form(out_f, in_f, r):
    # get_peft_model's built-in random path: the same entries as random_mask for the same seed,
    # row-major CSR, without the sparse tensor (in_f=40000 > 2^15: int32 columns in the layer)
    from shira_dist.kernels import compress_indices
    from shira_dist.masks import random_csr

    layer = nn.Linear(in_f, out_f)
    want = mask_to_indices(random_mask(layer, r, random_seed=11), (out_f, in_f), r * (in_f + out_f), "t")
    crow, col = random_csr((out_f, in_f), r, 11, torch.device("cpu"))
    want_crow, want_col, order = compress_indices(want, (out_f, in_f))
    assert order is None  # random_mask's entries are row-major too
    assert crow.dtype == col.dtype == torch.int32
    assert torch.equal(crow, want_crow) and torch.equal(col, want_col)


def test_model_random_masks_match_the_mask_function_per_layer(llama):
    # the CSR fast path of get_peft_model gives exactly what the public mask function gives a
    # user who calls it with the layer's seed (and a custom mask_fn still goes the mask route)
    from shira_dist.masks import layer_seed

    model = get_peft_model(llama, ShiraConfig(r=2, target_modules=["q_proj", "down_proj"], random_seed=5))
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "shira_indices")}
    assert len(layers) == 4
    for name, layer in layers.items():
        mask = random_mask(layer.base_layer, 2, random_seed=layer_seed(5, name))
        want = mask_to_indices(mask, tuple(layer.base_layer.weight.shape), 2 * sum(mask.shape), name)
        assert torch.equal(layer.shira_indices["default"], want), name
    seen = []
    cfg = ShiraConfig(r=2, target_modules=["q_proj"], random_seed=5)
    cfg.mask_fn = lambda layer, r, random_seed=None: seen.append(random_seed) or random_mask(layer, r, random_seed)
    from tests.conftest import tiny_llama

    custom = get_peft_model(tiny_llama(), cfg)
    assert len(seen) == 2
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(custom.get_submodule("model." + name).shira_indices["default"],
                       layers[name].shira_indices["default"])


def test_csr_patterns_are_checked_for_their_shape_and_budget():
    from shira_dist import ShiraLinear
    from shira_dist.patterns import make_pattern

    crow = torch.tensor([0, 2, 3], dtype=torch.int32)
    col = torch.tensor([0, 4, 1], dtype=torch.int32)
    p = make_pattern((2, 5), 3, "p", csr=(crow, col))
    assert torch.equal(p.indices(), torch.tensor([[0, 0, 1], [0, 4, 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"p: a csr pattern of shapes \(3,\), \(3,\) does not fit \(3, 5\) with nnz=3"):
        make_pattern((3, 5), 3, "p", csr=(crow, col))
    with pytest.raises(ValueError, match="p: give exactly one of mask, indices or csr"):
        make_pattern((2, 5), 3, "p")
    with pytest.raises(ValueError, match=r"does not fit \(2, 5\) with nnz=7"):
        ShiraLinear(nn.Linear(5, 2), None, "default", r=1, csr=(crow, col))
    with pytest.raises(ValueError, match="exactly one of mask, indices or csr"):
        ShiraLinear(nn.Linear(5, 2), None, "default", r=1, csr=(crow, col), indices=torch.zeros(2, 7, dtype=torch.int32))
