"""Smoke runs of the shipped real-model configs on the packaged model and data (a few steps).

configs/default.yaml: SmolLM2-135M-Instruct (GGUF converted once and cached as safetensors
under $SHIRA_DIST_CACHE or ~/.cache/shira_dist) on Rotten Tomatoes, scored by next-token
choice. configs/minilm_sentiment.yaml: MiniLM with a new head (modules_to_save). And
configs/smollm2_chatterbot.yaml: causal-LM loss on chatterbot answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from shira_dist.train import main
from shira_dist.training.models import builtin_model_dir, default_cache_dir

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _train(config: str, out: Path, *overrides: str) -> dict:
    threads = torch.get_num_threads()
    try:
        rc = main(["--config", str(CONFIGS / config), f"output_dir={out}", "training.progress_bar=false",
                   "tracking=none", "training.save_every=0", *overrides])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


def test_default_job_learns_on_packaged_smollm2_and_rotten_tomatoes(tmp_path):
    """15 of the default job's 80 steps already beat the untrained model on held-out reviews
    (measured: accuracy 0.58 -> 0.71 and eval loss 5.3 -> 0.61 on these 100)."""
    out = tmp_path / "default"
    metrics = _train("default.yaml", out, "training.max_steps=15", "training.warmup_steps=2",
                     "data.max_eval_examples=100")
    assert metrics["status"] == "completed" and metrics["train"]["steps"] == 15
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert before["examples"] == after["examples"] == 100
    assert after["accuracy"] >= before["accuracy"] + 0.05, (before, after)
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    # the job prepared its own split from the packaged csv
    held_out = (out / "data" / "eval.jsonl").read_text().splitlines()
    assert len(held_out) == 500 and json.loads(held_out[0])["label"] in ("positive", "negative")
    # the converted model is a plain (unquantized) Hugging Face directory with its tokenizer
    model_dir = builtin_model_dir("smollm2-135m-instruct", default_cache_dir())
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    names = {k.rsplit(".", 1)[0] for k in adapter}
    assert len(names) == 12 * 7  # q, k, v, o, gate, up, down of the top 12 layers
    assert all(".layers.1" in n or ".layers.2" in n for n in names)
    values = [v for k, v in adapter.items() if k.endswith("shira_weight")]
    assert any(bool(v.abs().sum() > 0) for v in values)  # trained away from zero


def test_minilm_sequence_classification_smoke(tmp_path):
    out = tmp_path / "minilm"
    metrics = _train("minilm_sentiment.yaml", out, "training.max_steps=3", "training.micro_batch_size=8",
                     "data.max_eval_examples=16", "training.eval_batch_size=16")
    assert metrics["status"] == "completed" and metrics["eval_after"]["examples"] == 16
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert adapter["base_model.model.classifier.weight"].shape == (2, 384)  # the new head travels with it
    assert sum(k.endswith("shira_weight") for k in adapter) == 6 * 6  # q, k, v, attn-out, ffn-in, ffn-out


def test_chatterbot_causal_lm_smoke(tmp_path):
    out = tmp_path / "chat"
    metrics = _train("smollm2_chatterbot.yaml", out, "training.max_steps=2", "training.micro_batch_size=2",
                     "data.max_eval_examples=4", "training.eval_batch_size=4", "task.max_length=48",
                     "task.sample_max_new_tokens=4",
                     "shira.target_modules=model\\.layers\\.29\\.self_attn\\.(q|v)_proj")  # last layer: short backward
    assert metrics["status"] == "completed"
    samples = json.loads((out / "samples.json").read_text())  # the recipe's prompts, answered before and after
    assert samples["rendered_with_chat_template"] and len(samples["before"]) == len(samples["after"]) == 3
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert before["tokens"] == after["tokens"] > 0 and 1.0 < after["perplexity"] < 1e4
    assert after["loss"] != before["loss"]
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert sorted(adapter) == [f"base_model.model.model.layers.29.self_attn.{m}_proj.shira_{t}"
                               for m in "qv" for t in ("indices", "weight")]
