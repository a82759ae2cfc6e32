"""Data-driven masks through the model API: calibration_data wiring, checkpoints without data, PEFT interop."""

from __future__ import annotations

import peft
import pytest
import torch

from shira_dist import PeftModel, ShiraConfig, calibrate_masks, get_peft_model
from tests.conftest import tiny_llama


def _batches():
    g = torch.Generator().manual_seed(9)
    out = []
    for _ in range(2):
        ids = torch.randint(0, 101, (2, 8), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


@pytest.mark.parametrize("mask_type", ["gradient", "snip"])
def test_get_peft_model_uses_calibration_data(mask_type):
    cfg = ShiraConfig(r=2, target_modules=["q_proj", "down_proj"], mask_type=mask_type)
    expected = calibrate_masks(tiny_llama(), cfg, _batches())
    model = get_peft_model(tiny_llama(), cfg, calibration_data=_batches())
    got = {n[len("base_model.model."):]: m.shira_indices["default"] for n, m in model.named_modules() if hasattr(m, "shira_indices")}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_calibration_errors():
    with pytest.raises(ValueError, match="mask_type='gradient' chooses entries from gradients: pass calibration"):
        get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], mask_type="gradient"))
    with pytest.raises(ValueError, match="calibration_data was given but mask_type='random'"):
        get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"]), calibration_data=_batches())


def test_add_adapter_with_calibration_and_struct():
    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], mask_type="struct", random_seed=0))
    model.add_adapter("snip", ShiraConfig(r=2, target_modules=["q_proj"], mask_type="snip"), calibration_data=_batches())
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.shira_indices["snip"].shape == (2, 2 * 64)
    assert not torch.equal(q.shira_indices["snip"], q.shira_indices["default"])


@pytest.mark.parametrize("mask_type", ["snip", "struct", "weight_magnitude"])
def test_checkpoints_need_no_data_and_load_in_peft(tmp_path, mask_type):
    cfg = ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], mask_type=mask_type, random_seed=0, init_weights=False)
    data = _batches() if mask_type == "snip" else None
    model = get_peft_model(tiny_llama(), cfg, calibration_data=data)
    model.save_pretrained(str(tmp_path))
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        y = model(ids).logits
        assert torch.equal(PeftModel.from_pretrained(tiny_llama(), str(tmp_path))(ids).logits, y)
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
        torch.testing.assert_close(pm(ids).logits, y, atol=1e-5, rtol=0)
