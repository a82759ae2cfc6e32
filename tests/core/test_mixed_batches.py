"""``adapter_names=``: one batch, each row with its own adapter (or "__base__"), exactly as if
each row ran alone with that adapter (fp32: atol 1e-6), in forward and in greedy generate."""

from __future__ import annotations

import pytest
import torch

from shira_dist import ShiraConfig, get_peft_model
from tests.conftest import tiny_llama

NAMES = ["a", "__base__", "b", "a"]


@pytest.fixture
def model():
    targets = ["q_proj", "v_proj", "down_proj"]
    m = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=targets, random_seed=0, init_weights=False,
                                                 modules_to_save=["lm_head"]), adapter_name="a")
    # "b" adapts fewer layers, and has its own head copy
    m.add_adapter("b", ShiraConfig(r=4, target_modules=["q_proj", "v_proj"], random_seed=1, init_weights=False,
                                   modules_to_save=["lm_head"]))
    with torch.no_grad():
        m.base_model.model.lm_head.modules_to_save["b"].weight.add_(0.5)
    return m.eval()


def _ids(rows=len(NAMES)):
    return torch.randint(0, 101, (rows, 7), generator=torch.Generator().manual_seed(0))


def _alone(model, name, fn):
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


def test_forward_rows_equal_each_adapter_alone(model):
    ids = _ids()
    with torch.no_grad():
        mixed = model(ids, adapter_names=NAMES).logits
        alone = torch.cat([_alone(model, n, lambda i=i: model(ids[i:i + 1]).logits) for i, n in enumerate(NAMES)])
        base = tiny_llama()(ids[1:2]).logits
    torch.testing.assert_close(mixed, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1:2], base, atol=1e-6, rtol=0)  # "__base__": the untouched model
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)  # the adapters really differ


def test_generate_rows_equal_each_adapter_alone(model):
    ids = _ids()
    with torch.no_grad():
        mixed = model.generate(ids, adapter_names=NAMES, max_new_tokens=6, do_sample=False)
        alone = torch.cat([_alone(model, n, lambda i=i: model.generate(ids[i:i + 1], max_new_tokens=6, do_sample=False))
                           for i, n in enumerate(NAMES)])
    assert torch.equal(mixed, alone)


def test_mixed_batches_leave_state_alone_and_refuse_bad_input(model):
    ids = _ids()
    model.set_adapter("a")
    with torch.no_grad():
        before = model(ids).logits
        model(ids, adapter_names=NAMES)
        assert torch.equal(model(ids).logits, before)  # no hook and no adapter switch left behind
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]"):
        model(ids, adapter_names=["a", "c", "b", "a"])
    with pytest.raises(ValueError, match="has 2 entries for a batch of 4 rows"):
        with torch.no_grad():
            model(ids, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="a list of adapter names"):
        model(ids, adapter_names="a")
    model.train()
    with pytest.raises(ValueError, match="adapter_names= is for inference"):
        model(ids, adapter_names=NAMES)
    model.eval()
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="cannot run adapter_names with merged adapters"):
        with torch.no_grad():
            model(ids, adapter_names=NAMES)
