"""ShiraLinear: forward against the dense reference, dtypes, merge/unmerge state transitions."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from shira_dist import ShiraLinear, random_mask


def _layer(out_f=24, in_f=20, r=2, init_weights=False, dtype=torch.float32, seed=0, bias=True):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    return ShiraLinear(base, random_mask(base, r, random_seed=seed), "default", r=r, init_weights=init_weights)


def _dense_delta(layer: ShiraLinear, name="default") -> torch.Tensor:
    return layer.get_delta_weight(name).to_dense()


def test_fresh_adapter_is_exactly_the_base():
    layer = _layer(init_weights=True)
    x = torch.randn(5, 20)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_forward_equals_dense_reference_fp32(mode):
    layer = _layer()
    layer.set_fuse_mode(mode)
    x = torch.randn(3, 7, 20)
    w, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias
    ref = x.double() @ (w.double() + _dense_delta(layer).double()).t() + b.double()
    y = layer(x)
    assert layer.fused == (mode == "fused")
    assert not torch.allclose(y, x @ w.t() + b)  # init_weights=False changes the output
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad", [True, False])
def test_unfused_forward_with_and_without_autograd(grad):
    # With autograd off the kernel adds each adapter's delta into the base output in place;
    # with it on, y + delta. Both equal the dense reference, and the base weight is untouched.
    layer = _layer()
    layer.update_layer("other", random_mask(layer.base_layer, 2, random_seed=5), r=2, init_weights=False)
    layer.set_adapter(["default", "other"])
    layer.set_fuse_mode("unfused")
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(2, 9, 20)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert y.requires_grad == grad
    delta = _dense_delta(layer, "default").double() + _dense_delta(layer, "other").double()
    ref = x.double() @ (w0.double() + delta).t() + layer.base_layer.bias.double()
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)
    assert torch.equal(layer.base_layer.weight, w0)


def test_scale_is_applied():
    layer = _layer()
    x = torch.randn(4, 20)
    base = layer.base_layer(x)
    d1 = layer(x) - base
    layer.set_scale("default", 2.5)
    torch.testing.assert_close(layer(x) - base, 2.5 * d1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype(dtype):
    layer = _layer(dtype=dtype)
    assert layer.shira_weight["default"].dtype == dtype
    x = torch.randn(4, 20).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = x.double() @ (layer.base_layer.weight.double() + _dense_delta(layer).double()).t() + layer.base_layer.bias.double()
    torch.testing.assert_close(y.double(), ref, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_gradients_only_on_values_and_match_dense(mode):
    layer = _layer(bias=False)
    layer.set_fuse_mode(mode)
    layer.base_layer.requires_grad_(False)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, 20, dtype=torch.float32, requires_grad=True)
    layer(x).pow(2).sum().backward()
    v = layer.shira_weight["default"]
    idx = layer.shira_indices["default"].long()
    x_ref = x.detach().clone().requires_grad_(True)
    w_full = (w0 + _dense_delta(layer).detach()).requires_grad_(True)
    (x_ref @ w_full.t()).pow(2).sum().backward()
    torch.testing.assert_close(v.grad, w_full.grad[idx[0], idx[1]], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert layer.base_layer.weight.grad is None


def test_delta_weight_is_coalesced_sparse_with_budget_nnz():
    layer = _layer(out_f=24, in_f=20, r=3)
    delta = layer.get_delta_weight("default")
    assert delta.is_sparse and delta.is_coalesced()
    assert delta.shape == (24, 20) and delta._nnz() == 3 * (24 + 20)


def test_merge_unmerge_bit_exact_and_guarded():
    layer = _layer()
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 20)
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer(x), y_unmerged, atol=1e-5, rtol=0)
    merged_w = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged_w)  # merging twice changes nothing
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight.view(torch.int32), w0.view(torch.int32))
    with pytest.warns(UserWarning, match="already unmerged"):
        layer.unmerge()


def test_safe_merge_raises_on_nonfinite_and_leaves_weight():
    layer = _layer()
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.shira_weight["default"][0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_only_linear_is_supported():
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        ShiraLinear(nn.Embedding(10, 4), torch.ones(10, 4), "default", r=1)


def test_base_layer_hooks_fire():
    layer = _layer()
    seen = []
    layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    layer(torch.randn(2, 20))
    assert seen == [torch.Size([2, 24])]


def test_indices_and_values_are_registered_state():
    layer = _layer()
    sd = layer.state_dict()
    assert "shira_weight.default" in sd and "shira_indices.default" in sd
    assert sd["shira_indices.default"].dtype == torch.int32 and sd["shira_indices.default"].shape == (2, 2 * 44)
    layer.to(torch.float64)
    assert layer.shira_indices["default"].dtype == torch.int32  # .to(dtype) leaves int buffers alone
