"""The usage examples of PEFT's SHiRA reference, run with ``from shira_dist import`` and a local model.

Only two substitutions: the import, and ``from_pretrained("facebook/opt-125m")`` becomes a
small OPT built from a config (nothing is downloaded); tokenizer calls become token ids.
"""

from __future__ import annotations

import torch
from transformers import OPTConfig, OPTModel, Trainer, TrainingArguments

from shira_dist import PeftModel, ShiraConfig, get_peft_model
from tests.conftest import tiny_opt


def test_basic_creation_and_trainable_parameters(capsys):
    base_model = tiny_opt()
    config = ShiraConfig(r=32)
    model = get_peft_model(base_model, config)
    model.print_trainable_parameters()
    assert "trainable params: 32,768" in capsys.readouterr().out  # 2 layers x (q, v) x 32*(128+128)


def test_basic_configuration_forward():
    base_model = tiny_opt()
    config = ShiraConfig(r=32, target_modules=["q_proj", "v_proj"], mask_type="random", random_seed=42)
    model = get_peft_model(base_model, config)
    input_ids = torch.randint(0, 1000, (2, 10))
    outputs = model(input_ids)
    assert outputs.logits.shape == (2, 10, 1000)
    with torch.no_grad():  # zero-initialised values: exactly the base model
        assert torch.equal(outputs.logits, tiny_opt()(input_ids).logits)
        # with values, the same as the base model whose weights hold the deltas densely (fp32: 1e-5)
        dense = tiny_opt()
        for name, layer in model.shira_layers():
            layer.shira_weight["default"].normal_(0, 0.05)
            dense.get_submodule(name).weight.add_(layer.get_delta_weight("default").to_dense())
        torch.testing.assert_close(model(input_ids).logits, dense(input_ids).logits, atol=1e-5, rtol=0)


def test_merge_unmerge_scale_inspect_and_disable():
    # The reference reaches ``model.base_model.model.decoder``: that path exists on the
    # bare decoder model (AutoModel -> OPTModel), so that is what is built here.
    base_model = OPTModel(OPTConfig(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=1000, max_position_embeddings=64, word_embed_proj_dim=128)).eval()
    config = ShiraConfig(r=32, target_modules=["q_proj"])
    model = get_peft_model(base_model, config)
    input_ids = torch.randint(0, 1000, (2, 10))
    shira_layer = model.base_model.model.decoder.layers[0].self_attn.q_proj
    shira_layer.merge(safe_merge=True)
    assert shira_layer.merged
    shira_layer.unmerge()
    assert not shira_layer.merged
    shira_layer.set_scale("default", scale=2.0)
    input_tensor = torch.randn(3, 128)
    assert shira_layer(input_tensor).shape == (3, 128)
    delta = shira_layer.get_delta_weight("default")
    num_nonzero = delta._nnz()
    total_params = delta.shape[0] * delta.shape[1]
    sparsity = 1.0 - (num_nonzero / total_params)
    assert abs(sparsity - 0.5) < 1e-9  # 32*(128+128) of 128*128
    with model.disable_adapter():
        output = model(input_ids)
    assert output.last_hidden_state.shape == (2, 10, 128)
    names = [name for name, param in shira_layer.named_parameters() if "shira_weight" in name and param.requires_grad]
    assert names == ["shira_weight.default"]


def test_custom_mask_function_magnitude():
    def magnitude_mask(base_layer, r, **kwargs):
        m, n = base_layer.weight.shape
        num_params = r * (m + n)
        magnitudes = base_layer.weight.abs()
        flat_mag = magnitudes.view(-1)
        _, indices = torch.topk(flat_mag, num_params)
        mask = torch.zeros(m, n, dtype=base_layer.weight.dtype, device=base_layer.weight.device)
        mask.view(-1)[indices] = 1.0
        return mask

    config = ShiraConfig(r=32, target_modules=["q_proj", "v_proj"])
    config.mask_fn = magnitude_mask
    model = get_peft_model(tiny_opt(), config)
    q = model.base_model.model.model.decoder.layers[0].self_attn.q_proj
    idx = q.shira_indices["default"].long()
    chosen = q.base_layer.weight.abs()[idx[0], idx[1]]
    assert chosen.min() >= q.base_layer.weight.abs().flatten().kthvalue(128 * 128 - idx.shape[1] + 1).values


def test_multiple_adapters_and_save_load(tmp_path):
    base_model = tiny_opt()
    config1 = ShiraConfig(r=32, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = get_peft_model(base_model, config1, adapter_name="task1")
    config2 = ShiraConfig(r=64, target_modules=["q_proj", "v_proj"], init_weights=False)
    model.add_adapter("task2", config2)
    input_ids = torch.randint(0, 1000, (2, 10))
    model.set_adapter("task1")
    output1 = model(input_ids)
    model.set_adapter("task2")
    output2 = model(input_ids)
    assert not torch.allclose(output1.logits, output2.logits)

    model.save_pretrained(str(tmp_path / "shira_adapter"))
    base_model = tiny_opt()
    loaded = PeftModel.from_pretrained(base_model, str(tmp_path / "shira_adapter" / "task2"))
    torch.testing.assert_close(loaded(input_ids).logits, output2.logits, atol=1e-5, rtol=0)

    merged = model.merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged_model"))
    assert (tmp_path / "merged_model" / "config.json").exists()


def test_regex_targets_with_modules_to_save_and_generate():
    base_model = tiny_opt()
    config = ShiraConfig(r=32, target_modules=r".*decoder.*attn.*(q|v)_proj$", modules_to_save=["lm_head"])
    model = get_peft_model(base_model, config)
    model.eval()
    with torch.no_grad():
        head = model.base_model.model.lm_head.modules_to_save["default"]
        head.weight.add_(torch.randn_like(head.weight))  # the copy trains; the original stays
        for _, layer in model.shira_layers():
            layer.shira_weight["default"].normal_(0, 0.1)
        input_ids = torch.randint(0, 1000, (1, 5))
        outputs = model.generate(input_ids, max_length=12, do_sample=False)
        assert outputs.shape == (1, 12)
        # greedy tokens equal those of the plain model with everything merged in
        merged = model.merge_and_unload().generate(input_ids, max_length=12, do_sample=False)
        assert torch.equal(outputs, merged)
        assert not torch.equal(outputs, tiny_opt().generate(input_ids, max_length=12, do_sample=False))


def test_training_with_trainer(tmp_path):
    base_model = tiny_opt()
    config = ShiraConfig(r=32, target_modules=["q_proj", "v_proj"], init_weights=True)
    model = get_peft_model(base_model, config)
    ids = torch.randint(0, 1000, (8, 12), generator=torch.Generator().manual_seed(0))
    train_dataset = [{"input_ids": row, "labels": row} for row in ids]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    training_args = TrainingArguments(output_dir=str(tmp_path / "shira_model"), num_train_epochs=1,
                                      per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
                                      report_to=[], use_cpu=True, logging_strategy="no")
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset)
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
