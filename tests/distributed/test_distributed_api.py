"""shira_dist.distributed in one process: helpers, config checks, errors (no launcher needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from shira_dist import ShiraConfig, ShiraLinear, get_peft_model
from shira_dist.distributed import (
    data_parallel_slice,
    decoder_layers,
    deepspeed_config,
    deepspeed_initialize,
    gather_adapter_state_dict,
    save_adapter,
    shard_fsdp2,
    sync_adapters,
    unwrap_shira_model,
)
from tests.conftest import tiny_llama
from tools.traffic import count_collectives, trainable_bytes

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model():
    return get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=TARGETS, random_seed=0, init_weights=False))


def test_data_parallel_slice_splits_rows_in_rank_order():
    assert [data_parallel_slice(8, r, 4) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert data_parallel_slice(3, 0, 1) == slice(0, 3)
    with pytest.raises(ValueError, match="global batch size 6 does not split evenly over 4 ranks"):
        data_parallel_slice(6, 0, 4)


def test_unwrap_finds_the_shira_model_inside_wrappers():
    model = _model()
    holder = nn.Module()
    holder.module = nn.Module()
    holder.module.module = model
    assert unwrap_shira_model(holder) is model
    with pytest.raises(TypeError, match="holds no SHiRA model"):
        unwrap_shira_model(nn.Linear(2, 2))


def test_gather_and_save_in_one_process_match_save_pretrained(tmp_path):
    model = _model()
    live = model.adapter_state_dict("default")
    gathered = gather_adapter_state_dict(model)
    assert gathered.keys() == live.keys() and all(torch.equal(gathered[k], live[k]) for k in live)
    assert all(gathered[k].data_ptr() != live[k].data_ptr() for k in live)  # copies, not views
    save_adapter(model, tmp_path / "ours")
    model.save_pretrained(str(tmp_path / "theirs"))
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    cfg = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")]
    assert cfg[0] == cfg[1] and cfg[0]["inference_mode"] is True
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        save_adapter(model, tmp_path / "x", selected_adapters=["nope"])


def test_checks_are_no_ops_without_a_process_group():
    model = _model()
    before = {k: v.clone() for k, v in model.adapter_state_dict("default").items()}
    sync_adapters(model, broadcast=True)
    after = model.adapter_state_dict("default")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_decoder_layers_and_fsdp2_argument_errors():
    model = _model()
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    assert len(decoder_layers(model, layer_classes=[nn.Embedding])) == 1
    plain = get_peft_model(nn.Sequential(nn.Linear(4, 4)), ShiraConfig(r=1, target_modules=["0"], random_seed=0))
    with pytest.raises(ValueError, match="no decoder layers found in Sequential.*layer_classes"):
        decoder_layers(plain)
    holder = nn.Module()
    holder.module = model
    with pytest.raises(TypeError, match="takes the ShiraModel itself"):
        shard_fsdp2(holder)


def test_deepspeed_config_fills_run_values_and_rejects_conflicts(tmp_path):
    cfg = deepspeed_config(CONFIGS / "zero3.json", micro_batch_size=2, gradient_accumulation_steps=4, zero_stage=2,
                           gradient_clipping=1.0)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="sets train_micro_batch_size_per_gpu=8 but this run uses 2"):
        deepspeed_config({"train_micro_batch_size_per_gpu": 8}, micro_batch_size=2)
    with pytest.raises(ValueError, match="sets train_batch_size"):
        deepspeed_config({"train_batch_size": 8}, micro_batch_size=2)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        deepspeed_config(bad, micro_batch_size=1)


@pytest.mark.parametrize("name,stage,offload", [("zero2", 2, False), ("zero2_offload", 2, True),
                                                ("zero3", 3, False), ("zero3_offload", 3, True)])
def test_shipped_deepspeed_configs(name, stage, offload):
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage and cfg["zero_allow_untested_optimizer"] is True
    assert ("offload_optimizer" in zero) == offload
    assert cfg.get("zero_force_ds_cpu_optimizer", True) is (not offload)
    if stage == 3:  # weights are partitioned (only norm-sized vectors persist); never a full gather on save
        assert zero["stage3_param_persistence_threshold"] <= 4096
        assert zero["stage3_gather_16bit_weights_on_model_save"] is False


def test_deepspeed_initialize_names_the_missing_config_key(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match='"zero_allow_untested_optimizer": true'):
        deepspeed_initialize(model, {"zero_optimization": {"stage": 2}}, optimizer=opt)
    with pytest.raises(ValueError, match='"zero_force_ds_cpu_optimizer": false'):
        deepspeed_initialize(model, {"zero_allow_untested_optimizer": True,
                                     "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
                             optimizer=opt)
    with pytest.raises(ValueError, match="give an optimizer or an 'optimizer' section"):
        deepspeed_initialize(model, {"zero_optimization": {"stage": 2}})


@pytest.mark.filterwarnings("ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning")
def test_count_collectives_counts_bytes_once_and_restores():
    original = dist.all_reduce
    created = not dist.is_initialized()
    if created:  # a one-process group on an in-memory store: no network
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with count_collectives() as counts:
            dist.all_reduce(torch.ones(10))
            out = torch.empty(6)
            dist.all_gather_into_tensor(out, torch.ones(6))
            dist.broadcast(torch.ones(3, dtype=torch.float64), src=0)
        assert counts.bytes == {"all_reduce": 40, "all_gather": 24, "broadcast": 24}
        assert counts.calls == {"all_reduce": 1, "all_gather": 1, "broadcast": 1}
        assert counts.gradient_bytes == 40
    finally:
        if created:
            dist.destroy_process_group()
    assert dist.all_reduce is original


def test_trainable_bytes_is_the_adapter_size():
    model = _model()
    nnz = sum(layer.shira_weight["default"].numel() for _, layer in model.shira_layers())
    assert trainable_bytes(model) == 4 * nnz == 4 * 2 * sum(m.in_features + m.out_features for _, m in model.shira_layers())



def test_calibration_refuses_an_fsdp2_sharded_model():
    from torch.distributed.fsdp import fully_shard

    from shira_dist import calibrate_masks

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        base = tiny_llama()
        for layer in base.model.layers:
            fully_shard(layer)
        batch = {"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))}
        cfg = ShiraConfig(r=2, target_modules=TARGETS, mask_type="gradient")
        with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.weight is a DTensor \(32, 32\), not a whole plain weight.*"
                                             r"before sharding"):
            calibrate_masks(base, cfg, [batch])
    finally:
        dist.destroy_process_group()


def test_fsdp2_in_one_process_matches_the_unsharded_model():
    """shard_fsdp2 on a model in the default mode: FSDP2 swaps a gathered copy in for each
    weight during forward, which the layers do not fuse into (not the weight they wrapped);
    loss, values' gradients and inference logits equal the unsharded model's; patterns stay
    replicated buffers and read back exactly."""
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ref, model = _model(), _model()
        ref.set_fuse_mode("unfused")
        ids = torch.randint(0, 64, (2, 8))
        indices = {n: layer.shira_indices["default"] for n, layer in model.shira_layers()}
        shard_fsdp2(model)
        layers = [layer for _, layer in model.shira_layers()]
        assert all(isinstance(layer.base_layer.weight, DTensor) for layer in layers)
        seen = []
        layers[0].base_layer.register_forward_pre_hook(lambda m, a: seen.append(layers[0].fuse_blocker()))
        loss_ref = ref(input_ids=ids, labels=ids).loss
        loss_ref.backward()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert seen and "not the parameter this layer wrapped" in seen[0] and not any(x.fused for x in layers)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
        grads_ref = {n: layer.shira_weight["default"].grad for n, layer in ref.shira_layers()}
        for n, layer in model.shira_layers():
            torch.testing.assert_close(layer.shira_weight["default"].grad.full_tensor(), grads_ref[n],
                                       rtol=1e-5, atol=1e-7)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        for n, layer in model.shira_layers():
            assert "shira_indices.patterns.default.col" in dict(layer.named_buffers())
            assert torch.equal(layer.shira_indices["default"], indices[n])
    finally:
        dist.destroy_process_group()


def test_fsdp2_bf16_mixed_precision_keeps_index_columns_exact():
    """shard_fsdp2(mp_policy=bf16 params, fp32 reduce): FSDP2 casts parameters only, so the
    patterns' uint8 column buffers stay as they are; loss and values' gradients stay within bf16
    rounding of the fp32 unsharded model (stated: loss 1e-3, gradients 10 % by norm)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ref, model = _model(), _model()
        ref.set_fuse_mode("unfused")
        shard_fsdp2(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        ids = torch.randint(0, 64, (2, 8))
        loss_ref = ref(input_ids=ids, labels=ids).loss
        loss_ref.backward()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.testing.assert_close(loss.float(), loss_ref, rtol=1e-3, atol=0)
        grads_ref = {n: layer.shira_weight["default"].grad for n, layer in ref.shira_layers()}
        for n, layer in model.shira_layers():
            assert layer.shira_indices.pattern("default").col.dtype == torch.uint8
            grad = layer.shira_weight["default"].grad.full_tensor()
            assert grad.dtype == torch.float32
            assert float((grad - grads_ref[n]).norm() / grads_ref[n].norm()) < 0.1, n
    finally:
        dist.destroy_process_group()
