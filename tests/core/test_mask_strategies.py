"""The paper's masks: struct, weight magnitude, gradient and SNIP, and calibration for the last two."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shira_dist import ShiraConfig, get_peft_model
from shira_dist.masks import calibrate_masks, calibration_scores
from shira_dist.masks import (gradient_mask, snip_mask, struct_mask, topk_mask, topk_positions,
                                        weight_magnitude_mask)
from shira_dist.masks import MASK_FUNCTIONS, validate_indices
from shira_dist.targeting import find_targets
from tests.conftest import tiny_llama

STRATEGIES = ["struct", "weight_magnitude", "gradient", "snip"]


def _mask(mask_type: str, layer: nn.Linear, r: int, seed: int | None = 0) -> torch.Tensor:
    """Any strategy on a real layer; data-driven ones get random scores."""
    scores = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(5))
    return MASK_FUNCTIONS[mask_type](layer, r, random_seed=seed, scores=scores)


def _flat(mask: torch.Tensor) -> torch.Tensor:
    idx = mask.coalesce().indices()
    return idx[0] * mask.shape[1] + idx[1]


def _reference_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by a stable descending sort: ties go to the lowest row-major position."""
    return torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:k].sort().values


# ---- budget -------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_type", STRATEGIES)
@pytest.mark.parametrize("out_f,in_f,r", [(7, 13, 1), (7, 13, 4), (13, 7, 4), (40, 3, 1), (40, 3, 2),
                                          (3, 40, 2), (100, 3, 2), (5, 5, 2), (64, 48, 16)])
def test_every_strategy_selects_exactly_r_in_plus_out_distinct_entries(mask_type, out_f, in_f, r):
    layer = nn.Linear(in_f, out_f)
    mask = _mask(mask_type, layer, r)
    assert mask.is_sparse and mask.is_coalesced() and mask.shape == (out_f, in_f)
    assert bool((mask.values() == 1).all())
    flat = _flat(mask)
    assert flat.numel() == r * (in_f + out_f) and flat.unique().numel() == flat.numel()
    assert mask.device == layer.weight.device and mask.dtype == layer.weight.dtype


@pytest.mark.parametrize("mask_type", STRATEGIES)
@pytest.mark.parametrize("out_f,in_f,r", [(1, 40, 1),   # a single row never fits r*(in+out)
                                          (50, 3, 4),   # in < r
                                          (3, 50, 4),   # out < r
                                          (5, 5, 3)])   # 30 > 25
def test_budget_larger_than_the_layer_is_a_clear_value_error(mask_type, out_f, in_f, r):
    k = r * (in_f + out_f)
    with pytest.raises(ValueError, match=rf"r={r} too large .*r\*\(in\+out\)={k} > in\*out={in_f * out_f}"):
        _mask(mask_type, nn.Linear(in_f, out_f), r)


def test_calibration_budget_error_names_the_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    cfg = ShiraConfig(r=2, mask_type="gradient", target_modules=["0", "1"])
    with pytest.raises(ValueError, match=r"r=2 too large for 0 \(4x3\)"):
        calibrate_masks(model, cfg, [{"input": torch.ones(1, 3)}], loss_fn=lambda m, b: m(b["input"]).sum())


# ---- struct -------------------------------------------------------------------------------


@pytest.mark.parametrize("out_f,in_f,r", [(40, 30, 4), (30, 40, 5), (7, 13, 3), (13, 7, 1), (100, 3, 2),
                                          (64, 64, 31), (9, 200, 8)])
def test_struct_has_whole_rows_whole_columns_and_the_diagonal(out_f, in_f, r):
    mask = struct_mask(nn.Linear(in_f, out_f), r, random_seed=3)
    dense = mask.to_dense().bool()
    assert int(dense.sum()) == r * (in_f + out_f)
    assert int(dense.all(dim=1).sum()) >= (r + 1) // 2  # full rows
    assert int(dense.all(dim=0).sum()) >= r // 2  # full columns
    d = min(out_f, in_f)
    assert bool(dense[torch.arange(d), torch.arange(d)].all())


@pytest.mark.parametrize("out_f,in_f", [(24, 24), (20, 50), (50, 20)])
def test_struct_delta_is_full_rank(out_f, in_f):
    mask = struct_mask(nn.Linear(in_f, out_f), 2, random_seed=0)
    delta = mask.to_dense() * torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1))
    assert int(torch.linalg.matrix_rank(delta)) == min(out_f, in_f)  # rows/columns alone: rank <= 2r


def test_struct_seeds_reproduce_differ_and_none_is_fresh():
    layer = nn.Linear(30, 40)
    a, b, c = (_flat(struct_mask(layer, 2, random_seed=s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = _flat(struct_mask(layer, 2))
    torch.manual_seed(0)
    e = _flat(struct_mask(layer, 2))
    assert not torch.equal(d, e)


def test_struct_on_meta_weights_and_bf16():
    meta = struct_mask(nn.Linear(13, 7, device="meta"), 2, random_seed=4)
    real = struct_mask(nn.Linear(13, 7), 2, random_seed=4)
    assert meta.device.type == "cpu" and torch.equal(_flat(meta), _flat(real))
    half = struct_mask(nn.Linear(13, 7).to(torch.bfloat16), 2, random_seed=4)
    assert half.dtype == torch.bfloat16 and torch.equal(_flat(half), _flat(real))


# ---- weight magnitude and top-k -----------------------------------------------------------

HAND_W = torch.tensor([[0.1, -9.0, 0.3, 4.0, -0.2],
                       [-5.0, 0.05, 7.0, -0.4, 0.6],
                       [3.0, -6.0, 0.7, 8.0, -1.0]])  # (3, 5): r=1 keeps 8 of 15


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_weight_magnitude_picks_the_largest_absolute_values():
    mask = weight_magnitude_mask(_linear_with(HAND_W), 1)
    # |W| = 9, 8, 7, 6, 5, 4, 3, 1 are kept; 0.7 and smaller are not.
    assert mask.indices().tolist() == [[0, 0, 1, 1, 2, 2, 2, 2], [1, 3, 0, 2, 0, 1, 3, 4]]


def test_weight_magnitude_ignores_seed_and_works_in_bf16():
    layer = _linear_with(HAND_W)
    assert torch.equal(_flat(weight_magnitude_mask(layer, 1, random_seed=1)),
                       _flat(weight_magnitude_mask(layer, 1, random_seed=2)))
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    half = weight_magnitude_mask(_linear_with(w.float()).to(torch.bfloat16), 4)
    assert half.dtype == torch.bfloat16
    assert torch.equal(_flat(half), _reference_topk(w.float().abs(), 4 * 70))


def test_ties_go_to_the_lowest_row_major_positions():
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 4)  # |W| all equal
    assert _flat(weight_magnitude_mask(_linear_with(signs), 1)).tolist() == list(range(8))
    scores = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 2.0]])
    assert topk_positions(scores, 3).tolist() == [1, 2, 3]
    assert topk_mask(scores, 3).to_dense().tolist() == [[0, 1, 1], [1, 0, 0]]


def test_topk_positions_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        topk_positions(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match=r"k=3 is invalid .*0 < k <= 2"):
        topk_positions(torch.ones(1, 2), 3)


def test_weight_magnitude_on_meta_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="weight_magnitude.*meta device.*load the weights"):
        weight_magnitude_mask(nn.Linear(13, 7, device="meta"), 2)


# ---- gradient / SNIP on a hand-checkable model ----------------------------------------------

W1 = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.5, -1.0], [-0.7, 0.2, 2.0], [1.2, 0.4, 0.9]])  # (4, 3)
W2 = torch.tensor([[2.0, 1.0, 1.0, -0.5], [2.0, 2.0, 1.0, 1.5]])  # (2, 4); column sums 4, 3, 2, 1
X = [torch.tensor([[3.0, 1.0, -2.0]]), torch.tensor([[-3.0, 1.0, -1.0]])]  # two 1-row batches


def _two_layer() -> nn.Sequential:
    return nn.Sequential(_linear_with(W1), _linear_with(W2))


def _sum_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"]).sum()


def _hand_grads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # L = Σ W2 W1 x:  dL/dW1 = (Σ_j W2[j, :]) ⊗ x,  dL/dW2 = 1 ⊗ (W1 x)
    return torch.outer(W2.sum(0), x[0]), torch.outer(torch.ones(2), W1 @ x[0])


@pytest.mark.parametrize("mask_type", ["gradient", "snip"])
def test_gradient_and_snip_pick_the_top_accumulated_scores(mask_type):
    g = [_hand_grads(x) for x in X]
    expected = {"0": sum(gb[0].abs() for gb in g), "1": sum(gb[1].abs() for gb in g)}
    if mask_type == "snip":
        expected = {"0": W1.abs() * expected["0"], "1": W2.abs() * expected["1"]}
    cfg = ShiraConfig(r=1, mask_type=mask_type, target_modules=["0", "1"])
    batches = [{"x": x} for x in X]
    scores = calibration_scores(_two_layer(), cfg, batches, loss_fn=_sum_loss)
    assert scores.keys() == {"0", "1"} and all(s.dtype == torch.float32 for s in scores.values())
    for name in scores:
        torch.testing.assert_close(scores[name], expected[name])
    indices = calibrate_masks(_two_layer(), cfg, batches, loss_fn=_sum_loss)
    for name, w in (("0", W1), ("1", W2)):
        k = w.shape[0] + w.shape[1]
        assert indices[name].dtype == torch.int32 and indices[name].shape == (2, k)
        flat = indices[name][0].long() * w.shape[1] + indices[name][1].long()
        assert torch.equal(flat, _reference_topk(expected[name], k))
    # Σ|g_b| is not |Σ g_b|: the batches' x disagree in sign on column 0.
    summed = (g[0][0] + g[1][0]).abs()
    assert not torch.equal(_reference_topk(summed, 7), _reference_topk(expected["0"], 7))


def test_scored_masks_without_scores_ask_for_calibration_data():
    for fn in (gradient_mask, snip_mask):
        with pytest.raises(ValueError, match="needs calibration scores.*calibrate_masks"):
            fn(nn.Linear(13, 7), 2, random_seed=0)
    with pytest.raises(ValueError, match=r"weight's shape \(7, 13\)"):
        gradient_mask(nn.Linear(13, 7), 2, scores=torch.ones(13, 7))
    llama = tiny_llama()
    with pytest.raises(ValueError, match="calibration"):
        get_peft_model(llama, ShiraConfig(r=2, mask_type="gradient", target_modules=["q_proj"]))


def test_scored_mask_on_meta_layer_uses_the_given_scores():
    scores = torch.rand(7, 13, generator=torch.Generator().manual_seed(0))
    mask = snip_mask(nn.Linear(13, 7, device="meta"), 2, scores=scores)
    assert mask.device.type == "cpu" and torch.equal(_flat(mask), _reference_topk(scores, 40))


def test_calibration_errors_are_clear():
    cfg = ShiraConfig(r=1, mask_type="gradient", target_modules=["0", "1"])
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate_masks(_two_layer(), cfg, [], loss_fn=_sum_loss)
    with pytest.raises(ValueError, match="no loss.*labels.*loss_fn"):
        calibrate_masks(_two_layer(), cfg, [{"input": X[0]}])  # Sequential returns a tensor
    with pytest.raises(TypeError, match="batch 0 is a Tensor"):
        calibrate_masks(_two_layer(), cfg, [X[0]], loss_fn=_sum_loss)
    with pytest.raises(ValueError, match="mask_type='random' does not use calibration data"):
        calibrate_masks(_two_layer(), ShiraConfig(r=1, target_modules=["0"]), [{"x": X[0]}], loss_fn=_sum_loss)
    meta = nn.Sequential(nn.Linear(3, 4, device="meta"), nn.Linear(4, 2, device="meta"))
    with pytest.raises(ValueError, match="'0' is on the meta device"):
        calibrate_masks(meta, cfg, [{"x": X[0]}], loss_fn=_sum_loss)


def test_calibration_restores_state_even_when_a_batch_fails():
    model = _two_layer()
    model[1].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]

    def failing(m, batch):
        if batch["x"] is X[1]:
            raise RuntimeError("bad batch")
        return _sum_loss(m, batch)

    with pytest.raises(RuntimeError, match="bad batch"):
        calibrate_masks(model, ShiraConfig(r=1, mask_type="snip", target_modules=["0", "1"]),
                        [{"x": x} for x in X], loss_fn=failing)
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(p.grad is None for p in model.parameters())


# ---- a tiny transformers model ------------------------------------------------------------


def _llama_batches(n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 101, (2, 9), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


@pytest.mark.parametrize("mask_type", ["gradient", "snip"])
def test_llama_calibration_matches_plain_autograd(mask_type):
    model = tiny_llama()
    cfg = ShiraConfig(r=2, mask_type=mask_type, target_modules=["q_proj", "v_proj", "down_proj"])
    batches = _llama_batches()
    indices = calibrate_masks(model, cfg, batches)
    targets = dict(find_targets(model, cfg.target_modules))
    assert indices.keys() == targets.keys() and len(indices) == 6
    reference = {name: torch.zeros_like(m.weight) for name, m in targets.items()}
    for batch in batches:  # the same scores the slow way: full .grad tensors, then |.|
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name, m in targets.items():
            g = m.weight.grad.abs()
            reference[name] += g if mask_type == "gradient" else (m.weight.detach() * m.weight.grad).abs()
    for name, m in targets.items():
        out_f, in_f = m.weight.shape
        validate_indices(indices[name], (out_f, in_f), name)
        assert indices[name].dtype == torch.int32 and indices[name].shape == (2, 2 * (in_f + out_f))
        flat = indices[name][0].long() * in_f + indices[name][1].long()
        assert torch.equal(flat, _reference_topk(reference[name], 2 * (in_f + out_f))), name
    assert all(torch.equal(indices[n], v) for n, v in calibrate_masks(model, cfg, batches).items())


def test_calibration_leaves_weights_flags_modes_grads_and_outputs_unchanged():
    model = tiny_llama()
    ids = _llama_batches(1)[0]["input_ids"]
    with torch.no_grad():
        before_logits = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.embed_tokens.weight.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj.weight
    q.requires_grad_(False)
    old_grad = torch.full_like(q, 0.5)
    q.grad = old_grad
    model.train()
    model.model.layers[1].eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    cfg = ShiraConfig(r=2, mask_type="snip", target_modules=["q_proj", "v_proj"])
    calibrate_masks(model, cfg, _llama_batches(2))

    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert q.grad is old_grad and model.model.layers[0].self_attn.v_proj.weight.grad is None
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before_logits)
    v = model.model.layers[0].self_attn.v_proj.weight  # the accumulation hook is gone
    model(**_llama_batches(1)[0]).loss.backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0


def test_bf16_llama_calibrates_with_fp32_scores_and_untouched_weights():
    model = tiny_llama(dtype=torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ShiraConfig(r=2, mask_type="gradient", target_modules=["q_proj"])
    scores = calibration_scores(model, cfg, _llama_batches(2))
    assert all(s.dtype == torch.float32 and float(s.sum()) > 0 for s in scores.values())
    indices = calibrate_masks(model, cfg, _llama_batches(2))
    assert all(idx.shape == (2, 2 * 64) for idx in indices.values())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mask_type", ["struct", "weight_magnitude"])
def test_data_free_strategies_work_through_get_peft_model(mask_type):
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, mask_type=mask_type, target_modules=["q_proj"],
                                                     random_seed=1))
    layers = [m for _, m in model.shira_layers()]
    assert len(layers) == 2 and all(m.shira_indices["default"].shape == (2, 2 * 64) for m in layers)


def test_topk_positions_large_layer_sampled_threshold_is_exact():
    # Above 2^22 entries the k-th largest is found from a sampled threshold; it must still be exact,
    # including ties at the threshold (values are quantised so many entries tie).
    from shira_dist.masks import topk_positions

    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 2000, (2048, 2100), generator=g).float()
    k = 8 * (2048 + 2100)
    flat = scores.reshape(-1)
    kth = torch.sort(flat, descending=True).values[k - 1]
    expected = torch.cat([torch.nonzero(flat > kth).squeeze(1),
                          torch.nonzero(flat == kth).squeeze(1)[: k - int((flat > kth).sum())]]).sort().values
    assert torch.equal(topk_positions(scores, k), expected)
