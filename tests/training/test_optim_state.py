"""By-name optimizer state (shira_dist.training.strategies.common): the form every strategy saves."""

from __future__ import annotations

import pytest
import torch

from shira_dist.training.strategies import common as optim_state


def _adamw_after_one_step(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(params, lr=0.1)
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i + 1))
    opt.step()
    return opt


def test_round_trip_follows_names_not_positions():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    named = optim_state.to_named(_adamw_after_one_step([a, b]).state_dict(), ["layer.a", "layer.b"])
    assert optim_state.is_named(named) and set(named["state"]) == {"layer.a", "layer.b"}
    assert named["param_groups"][0]["params"] == ["layer.a", "layer.b"]
    # a fresh optimizer holding the same tensors in the other order gets each its own moments
    b2, a2 = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))
    fresh = torch.optim.AdamW([b2, a2], lr=0.5)
    fresh.load_state_dict(optim_state.from_named(named, ["layer.b", "layer.a"], fresh.param_groups))
    assert torch.equal(fresh.state[a2]["exp_avg"], named["state"]["layer.a"]["exp_avg"])
    assert torch.equal(fresh.state[b2]["exp_avg_sq"], named["state"]["layer.b"]["exp_avg_sq"])
    assert fresh.state[a2]["exp_avg"].shape == (3,) and fresh.param_groups[0]["lr"] == 0.1  # saved hyperparameters


def test_a_different_trainable_set_is_refused_by_name():
    a = torch.nn.Parameter(torch.zeros(3))
    named = optim_state.to_named(_adamw_after_one_step([a]).state_dict(), ["layer.a"])
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="lacks 'layer.c'"):
        optim_state.from_named(named, ["layer.c"], other.param_groups)
    with pytest.raises(ValueError, match="is not 'shira_dist.optimizer_by_name/1'"):
        optim_state.from_named(other.state_dict(), ["layer.a"], other.param_groups)
