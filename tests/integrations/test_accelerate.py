"""Accelerate trains a shira_dist model and saves it with its documented PEFT pattern (CPU).

    accelerator.unwrap_model(model).save_pretrained(dir, is_main_process=accelerator.is_main_process,
                                                    save_function=accelerator.save, safe_serialization=True)

must write a PEFT adapter (adapter_config.json + adapter_model.safetensors, nothing else of
the model) that shira_dist and PEFT load with the trained model's loss (rtol 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from tests.integrations import common

EPOCHS = 2


@pytest.fixture
def accelerator():
    """A fresh Accelerator (CPU); accelerate's process-wide state is reset before and after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_prepare_train_and_save_with_accelerate_pattern(accelerator, tmp_path):
    from accelerate.utils import is_peft_model

    model = common.shira_model()
    rows = common.token_rows()
    untrained = common.loss_of(model, rows).item()
    values = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(values, lr=1e-2)
    loader = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=False)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    assert is_peft_model(prepared) and accelerator.unwrap_model(prepared) is model
    prepared.train()
    for _ in range(EPOCHS):  # 2 batches each
        for ids in loader:
            accelerator.backward(prepared(input_ids=ids, labels=ids).loss)
            optimizer.step()
            optimizer.zero_grad()
    trained = common.loss_of(model, rows).item()
    assert trained < untrained, (trained, untrained)

    saved = tmp_path / "adapter"
    accelerator.unwrap_model(prepared).save_pretrained(str(saved), is_main_process=accelerator.is_main_process,
                                                       save_function=accelerator.save, safe_serialization=True)
    common.assert_adapter_files_only(saved)
    common.assert_reloads_equal(saved, trained, rows)


def test_save_from_accelerate_state_dict(accelerator, tmp_path):
    """The sharded-engine variant of the pattern: the values saved are those of
    ``state_dict=accelerator.get_state_dict(model)`` (the whole model's, keys
    ``base_model.model...``), not the live ones (here zeroed after the state dict was taken)."""
    model = common.shira_model()
    prepared = accelerator.prepare(model)
    values = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in values:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    expected = common.loss_of(model, common.token_rows()).item()
    state_dict = {k: v.clone() for k, v in accelerator.get_state_dict(prepared).items()}
    with torch.no_grad():
        for p in values:
            p.zero_()
    saved = tmp_path / "adapter"
    accelerator.unwrap_model(prepared).save_pretrained(str(saved), is_main_process=accelerator.is_main_process,
                                                       save_function=accelerator.save, state_dict=state_dict)
    common.assert_adapter_files_only(saved)
    common.assert_reloads_equal(saved, expected, common.token_rows())
