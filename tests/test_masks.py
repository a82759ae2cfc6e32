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
    k = "model.model.layers.0.self_attn.q_proj"
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
