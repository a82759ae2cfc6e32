"""The training job on a quantized frozen base (model.quantization, shira_dist/training/quantize.py).

configs/tiny.yaml (a random-init 2-layer Llama, byte tokenizer, label words "n"/"p", lm_head in
modules_to_save) run in this process, and once under torchrun with 2 gloo ranks. The job's
reported held-out numbers are checked against a direct computation: each held-out review run
alone (no padding) through the float base, or a base quantized by hand, with the saved adapter
loaded by shira_dist and by PEFT; the loss is the cross-entropy of the label word's logit at the
last position. Tolerances: losses 1e-4 relative (batched, left-padded vs one example at a time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from shira_dist import PeftModel
from shira_dist.train import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["training.progress_bar=false", "data.max_eval_examples=48", "training.save_every=0", "tracking=none"]
# one global batch of 32 in both runs: 1 process x 16 x 2 accumulation steps, or 2 ranks x 16
STEPS = ["training.max_steps=12", "training.gradient_accumulation_steps=2"]
INT8 = "model.quantization=int8_weight_only"
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def _job(out: Path, *overrides: str) -> int:
    threads = torch.get_num_threads()
    try:
        return main(["--config", TINY, f"output_dir={out}", *FAST, *overrides])
    finally:
        torch.set_num_threads(threads)


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "run"
    assert _job(out, INT8, *STEPS) == 0
    return out


# ---- the direct computation ------------------------------------------------------------------------
def _float_base() -> nn.Module:
    """configs/tiny.yaml's model as the job builds it: the inline config, random init from seed 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(yaml.safe_load(open(TINY))["model"]["inline_config"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings)).eval()


def _int8_base_by_hand() -> nn.Module:
    """The float base with every linear layer but lm_head quantized by torchao's int8 weight-only."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    base = _float_base()
    quantize_(base, Int8WeightOnlyConfig(set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head")
    return base


def _held_out(out: Path) -> list[tuple[list[int], int]]:
    """(byte ids of "review: {text}\\nsentiment:", label word id) for the first 48 held-out rows."""
    rows = [json.loads(line) for line in (out / "data" / "eval.jsonl").read_text().splitlines()][:48]
    examples = [(list(f"review: {r['text']}\nsentiment:".encode()), ord("p" if r["label"] == "positive" else "n"))
                for r in rows]
    assert len(examples) == 48 and all(len(ids) <= 96 for ids, _ in examples)  # none cut by max_length
    return examples


def _direct_eval(model: nn.Module, examples) -> dict:
    """Mean label-word loss and accuracy (argmax over "n"/"p"), one example per forward."""
    losses, correct = [], 0
    with torch.no_grad():
        for ids, label in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            losses.append(F.cross_entropy(logits[None], torch.tensor([label])).item())
            words = torch.tensor([ord("n"), ord("p")])
            correct += int(words[logits[words].argmax()] == label)
    return {"loss": sum(losses) / len(losses), "accuracy": correct / len(examples)}


# ---- the job ---------------------------------------------------------------------------------------------
def test_int8_job_trains_and_reports_the_adapter_on_the_float_base(int8_run, capsys):
    """An int8 job trains (loss halves), quantizes the 14 decoder linears (not lm_head), saves a PEFT
    adapter; its metrics.json holds the held-out numbers on the quantized and the float base, each equal
    to the direct computation (shira_dist and PEFT loading the adapter onto the float base agree), and
    the difference is float minus quantized."""
    m = _metrics(int8_run)
    assert m["status"] == "completed"
    losses = m["train"]["losses"]
    assert losses[-1] < 0.5 * losses[0], losses
    q = m["quantization"]
    assert q["method"] == "int8_weight_only" and q["quantized_layers"] == 14
    assert q["eval_quantized_base"] == m["eval_after"]
    examples = _held_out(int8_run)
    final = str(int8_run / "final")

    on_float = _direct_eval(PeftModel.from_pretrained(_float_base(), final), examples)
    with_peft = _direct_eval(peft.PeftModel.from_pretrained(_float_base(), final), examples)
    on_int8 = _direct_eval(PeftModel.from_pretrained(_int8_base_by_hand(), final), examples)
    assert with_peft["loss"] == pytest.approx(on_float["loss"], rel=1e-5)
    assert with_peft["accuracy"] == on_float["accuracy"]
    assert q["eval_float_base"]["loss"] == pytest.approx(on_float["loss"], rel=1e-4)
    assert q["eval_float_base"]["accuracy"] == on_float["accuracy"]
    assert q["eval_quantized_base"]["loss"] == pytest.approx(on_int8["loss"], rel=1e-4)
    assert q["eval_quantized_base"]["accuracy"] == on_int8["accuracy"]
    assert on_float["loss"] != on_int8["loss"]  # the two bases differ
    difference = q["difference_float_minus_quantized"]
    assert difference["loss"] == q["eval_float_base"]["loss"] - q["eval_quantized_base"]["loss"]
    assert difference["accuracy"] == q["eval_float_base"]["accuracy"] - q["eval_quantized_base"]["accuracy"]


def test_int8_job_under_ddp_matches_one_process(int8_run, tmp_path):
    """torchrun, 2 gloo ranks x 16 against 1 process x 16 x 2 accumulation steps on the int8 base: the
    same losses (1e-6 relative), replicas in sync, the same adapter values (1e-6) and reported numbers."""
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS} | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shira_dist.train", "--config", TINY, f"output_dir={out}", "distributed.strategy=ddp", INT8,
           *FAST, "training.max_steps=12"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp, one = _metrics(out), _metrics(int8_run)
    assert ddp["world_size"] == 2 and ddp["global_batch"] == one["global_batch"] == 32
    assert ddp["replicas_in_sync"] is True
    assert ddp["train"]["losses"] == pytest.approx(one["train"]["losses"], rel=1e-6)
    a, b = load_file(out / "final" / "adapter_model.safetensors"), load_file(int8_run / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    for side in ("eval_quantized_base", "eval_float_base"):
        assert ddp["quantization"][side]["loss"] == pytest.approx(one["quantization"][side]["loss"], rel=1e-5)


def test_int4_job_trains(tmp_path, capsys):
    """int4 weight-only (torchao IntxWeightOnlyConfig, int4 per group of 32): the loss halves and the log
    line puts the float base's held-out loss next to the quantized base's."""
    assert _job(tmp_path / "run", "model.quantization=int4_weight_only", *STEPS) == 0
    m = _metrics(tmp_path / "run")
    assert m["train"]["losses"][-1] < 0.5 * m["train"]["losses"][0]
    q = m["quantization"]
    assert q["method"] == "int4_weight_only" and q["quantized_layers"] == 14
    line = next(x for x in capsys.readouterr().out.splitlines() if "the adapter on the float (unquantized) base" in x)
    assert f"loss {q['eval_float_base']['loss']:.4f} (quantized base {q['eval_quantized_base']['loss']:.4f}" in line


@pytest.mark.parametrize("mask_type", ["weight_magnitude", "gradient"])
def test_data_driven_masks_are_scored_on_the_float_weights(mask_type, tmp_path):
    """With an int8 base the mask is the one the same job picks without quantization (scored on the float
    weights before the base is quantized): identical saved indices."""
    overrides = [f"shira.mask_type={mask_type}", "training.max_steps=1", "training.eval_before_training=false"]
    assert _job(tmp_path / "int8", INT8, *overrides) == 0
    assert _job(tmp_path / "float", *overrides) == 0
    a = load_file(tmp_path / "int8" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "float" / "final" / "adapter_model.safetensors")
    indices = [k for k in a if "shira_indices" in k]
    assert len(indices) == 14
    for k in indices:
        assert torch.equal(a[k], b[k]), k


# ---- refused configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["model.quantization=nf4"], "model.quantization='nf4' needs CUDA"),
    (["model.quantization=int3"],
     "model.quantization='int3' is invalid: expected one of ['int8_weight_only', 'int4_weight_only', 'nf4'] or null"),
    ([INT8, "distributed.strategy=fsdp"],
     "model.quantization='int8_weight_only' with distributed.strategy='fsdp' is not supported"),
    ([INT8, "distributed.strategy=deepspeed"],
     "model.quantization='int8_weight_only' with distributed.strategy='deepspeed' is not supported"),
    ([INT8, "adapter=lora"], "model.quantization='int8_weight_only' with adapter='lora' is not supported by the job"),
])
def test_refused_configs_exit_2_with_a_clear_error_and_write_nothing(overrides, expected, tmp_path, capsys):
    assert not torch.cuda.is_available()  # this suite runs on the CPU, where nf4 is refused
    assert _job(tmp_path / "run", *overrides) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_int4_on_a_layer_that_does_not_fit_the_group_size_is_a_config_error(tmp_path, capsys):
    """hidden_size 48 is not a multiple of int4's group of 32: exit 2 naming the first such layer."""
    assert _job(tmp_path / "run", "model.quantization=int4_weight_only", "model.inline_config.hidden_size=48",
                "training.max_steps=1") == 2
    err = capsys.readouterr().err
    assert "model.quantization='int4_weight_only' needs in_features divisible by 32" in err
    assert "model.layers.0.self_attn.q_proj has 48" in err
    assert _metrics(tmp_path / "run")["status"] == "failed"
