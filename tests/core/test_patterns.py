"""shira_dist/patterns.py: SHiRA indices stored as CSR buffers, seen as PEFT's (2, nnz) indices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shira_dist.layer import ShiraLinear
from tests.conftest import random_pattern


def _layer(idx: torch.Tensor, out_f: int = 12, in_f: int = 10) -> ShiraLinear:
    torch.manual_seed(0)
    return ShiraLinear(nn.Linear(in_f, out_f), None, "default", r=2, indices=idx, init_weights=False)


def test_row_major_pattern_stores_two_bytes_per_entry():
    idx = random_pattern(12, 10, 44, seed=1, shuffle=False)
    layer = _layer(idx)
    buffers = dict(layer.shira_indices.named_buffers())
    assert sorted(buffers) == ["patterns.default.col", "patterns.default.crow"]  # no row array, no order
    assert buffers["patterns.default.crow"].shape == (13,)
    assert buffers["patterns.default.crow"].dtype == torch.int32
    col = buffers["patterns.default.col"]  # int16 columns kept as bytes (gloo/NCCL broadcast no int16)
    assert col.dtype == torch.uint8 and col.shape == (88,)
    assert col.untyped_storage().nbytes() == 44 * 2  # owns its storage: not a view keeping (2, nnz) alive
    assert torch.equal(layer.shira_indices.pattern("default").columns(), idx[1].to(torch.int16))
    assert torch.equal(layer.shira_indices["default"], idx)  # read back in PEFT's form
    sd = layer.state_dict()
    assert [k for k in sd if "shira_indices" in k] == ["shira_indices.default"]
    assert torch.equal(sd["shira_indices.default"], idx)
    assert sd["shira_indices.default"].dtype == torch.int32  # PEFT's form


def test_columns_past_int16_stay_int32_and_match_dense():
    in_f = 2**15 + 3  # column indices up to 32770 do not fit an int16
    nnz = in_f + 2  # r=1 for a (2, in_f) weight
    idx = random_pattern(2, in_f, nnz, seed=8, shuffle=False)
    assert int(idx[1].max()) >= 2**15
    torch.manual_seed(0)
    layer = ShiraLinear(nn.Linear(in_f, 2, bias=False), None, "default", r=1, indices=idx, init_weights=False)
    assert layer.shira_indices.pattern("default").col.dtype == torch.int32  # no int16 view
    assert torch.equal(layer.shira_indices["default"], idx)
    x = torch.randn(3, in_f)
    dense = torch.zeros(2, in_f)
    dense[idx[0].long(), idx[1].long()] = layer.shira_weight["default"].detach()
    ref = x @ (layer.base_layer.weight.detach() + dense).t()
    for mode in ("unfused", "fused"):
        layer.set_fuse_mode(mode)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-4)


def test_unsorted_indices_keep_their_order_and_values():
    idx = random_pattern(12, 10, 44, seed=2, shuffle=True)
    layer = _layer(idx)
    assert layer.shira_indices.pattern("default").order is not None
    assert torch.equal(layer.shira_indices["default"], idx)  # the stored order, exactly
    layer = layer.double()
    x = torch.randn(3, 10, dtype=torch.float64)
    w0, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach()
    dense = torch.zeros(12, 10, dtype=torch.float64)
    dense[idx[0].long(), idx[1].long()] = layer.shira_weight["default"].detach()  # values in the stored order
    ref = nn.functional.linear(x, w0 + dense, bias)
    for mode in ("fused", "unfused"):
        layer.set_fuse_mode(mode)
        torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.base_layer.weight, w0)  # unfused again: W0 bit for bit


def test_load_state_dict_replaces_the_pattern_either_order():
    src = _layer(random_pattern(12, 10, 44, seed=3, shuffle=True))
    dst = _layer(random_pattern(12, 10, 44, seed=4, shuffle=False))
    x = torch.randn(5, 10)
    dst(x)  # fused, with dst's own pattern written into the weight
    assert dst.load_state_dict(src.state_dict()).missing_keys == []
    assert torch.equal(dst.shira_indices["default"], src.shira_indices["default"])
    assert torch.equal(dst.base_layer.weight, src.base_layer.weight)  # W0 exactly (unfused before loading)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    back = _layer(random_pattern(12, 10, 44, seed=5, shuffle=True))
    back.load_state_dict(_layer(random_pattern(12, 10, 44, seed=6, shuffle=False)).state_dict())
    assert back.shira_indices.pattern("default").order is None  # a row-major load drops the order buffer


def test_bad_indices_are_refused_with_the_reason():
    idx = random_pattern(12, 10, 44, seed=7, shuffle=False)
    dup = idx.clone()
    dup[:, 5] = dup[:, 9]
    with pytest.raises(ValueError, match=r"more than once; a SHiRA pattern has distinct entries"):
        _layer(dup)
    layer = _layer(idx)
    sd = layer.state_dict()
    sd["shira_indices.default"] = idx[:, :40]
    with pytest.raises(RuntimeError, match=r"size mismatch for shira_indices.default: \(2, 44\) indices expected"):
        layer.load_state_dict(sd)
    sd["shira_indices.default"] = dup
    with pytest.raises(RuntimeError, match="more than once"):
        layer.load_state_dict(sd)
    assert torch.equal(layer.shira_indices["default"], idx)  # left as it was


def test_layout_is_made_once_and_follows_replacements_and_moves():
    """The kernels' view is kept between forwards and remade only by set_() and .to()."""
    layer = _layer(random_pattern(12, 10, 44, seed=8, shuffle=True))
    pattern = layer.shira_indices.pattern("default")
    layout = pattern.layout()
    assert pattern.layout() is layout and layout.col.dtype == torch.int16
    assert torch.equal(layout.indices(), layer.shira_indices["default"])
    other = random_pattern(12, 10, 44, seed=9, shuffle=False)
    pattern.set_(other)
    assert pattern.layout() is not layout and torch.equal(pattern.layout().indices(), other)
    layout = pattern.layout()
    layer.double()  # buffers are integer: same values, new layout object over the module's buffers
    assert pattern.layout() is not layout and pattern.layout().crow is pattern.crow
    x = torch.randn(5, 10, dtype=torch.float64)
    dense = torch.zeros(12, 10, dtype=torch.float64)
    dense[other[0].long(), other[1].long()] = layer.shira_weight["default"].detach()
    ref = nn.functional.linear(x, layer.base_layer.weight.detach() + dense, layer.base_layer.bias.detach())
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
