"""``adapter: lora | dora``: PEFT's LoRA and DoRA trained by the job on configs/tiny.yaml (a random-init
2-layer Llama, byte tokens, generated sentiment), at SHiRA's budget, with the same loop, data and seeds.

The saved adapter is PEFT's own: ``peft.PeftModel.from_pretrained`` loads it and scores the held-out
set in one right-padded batch to the job's loss within 1e-5 relative (the job left-pads batches of
100 and masks the padding; only float summation differs: 7e-9 and 7e-8 when written). A stopped and
resumed LoRA run equals an uninterrupted one bit for bit, and two DDP ranks of 8 equal one process
of 16 (losses within 1e-6 relative, tensors 1e-6 absolute).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from shira_dist import ShiraConfig, get_peft_model
from shira_dist.train import main
from shira_dist.training.config import ConfigError, load_run_config

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
INLINE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 258, "max_position_embeddings": 128}  # configs/tiny.yaml
SHORT = ["training.progress_bar=false", "training.max_steps=12", "training.save_every=6"]
# (out, in) of each targeted layer (all-linear) of one decoder layer: q, k, v, o, gate, up, down
SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
R, LAYERS, HEAD = 8, 2, 258 * 64  # shira.r; decoder layers; lm_head (modules_to_save)
LORA_BUDGET = LAYERS * sum(R * (o + i) for o, i in SHAPES)  # = SHiRA's r*(in+out) per layer: 16,384
DORA_MAGNITUDES = LAYERS * sum(o for o, _ in SHAPES)  # one entry per output row: 1,024


def _train(out: Path, *overrides: str) -> dict:
    threads = torch.get_num_threads()
    try:
        rc = main(["--config", TINY, f"output_dir={out}", *SHORT, *overrides])
    finally:
        torch.set_num_threads(threads)  # the config sets 1 thread
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return out, _train(out, "adapter=lora")


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dora")
    return out, _train(out, "adapter=dora", "training.save_every=0")


def _base() -> torch.nn.Module:
    torch.manual_seed(0)  # training.seed: the run's random base weights
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **INLINE)).eval()


def _peft_eval(adapter_dir: Path, eval_file: Path) -> tuple[float, float]:
    """(mean loss, accuracy) of the label word after the prompt, scored by peft itself."""
    model = peft.PeftModel.from_pretrained(_base(), str(adapter_dir)).eval()
    labels, words = ["negative", "positive"], [ord("n"), ord("p")]
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    prompts = [list(f"review: {row['text']}\nsentiment:".encode()) for row in rows]
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.tensor([p + [0] * (int(lengths.max()) - len(p)) for p in prompts])  # right padding: causal
    y = torch.tensor([labels.index(row["label"]) for row in rows])  # attention never sees it
    with torch.no_grad():
        logits = model(input_ids=ids).logits[torch.arange(len(rows)), lengths - 1]  # (N, V): the last prompt byte
    loss = F.cross_entropy(logits, torch.tensor(words)[y])
    return float(loss), float((logits[:, words].argmax(-1) == y).float().mean())


def test_lora_trains_at_shiras_budget_and_peft_loads_it(lora_run):
    out, metrics = lora_run
    assert metrics["status"] == "completed" and metrics["train"]["steps"] == 12
    assert metrics["train"]["final_loss"] < 0.5 * metrics["train"]["first_loss"]
    assert metrics["eval_after"]["loss"] < 0.5 * metrics["eval_before"]["loss"]  # 5.64 -> 0.69 when written
    adapter = metrics["adapter"]
    assert adapter["type"] == "lora" and adapter["rank"] == R and adapter["alpha"] == 2 * R
    assert adapter["num_layers"] == 14 and adapter["nnz"] == LORA_BUDGET == 16384
    assert adapter["layers"]["model.layers.0.self_attn.k_proj"] == {"nnz": R * (32 + 64), "shape": [32, 64],
                                                                    "density": R * 96 / (32 * 64)}
    # the same trainable count as SHiRA at shira.r on the same targets and modules_to_save
    shira = get_peft_model(_base(), ShiraConfig(r=R, target_modules="all-linear", modules_to_save=["lm_head"]))
    assert adapter["trainable_parameters"] == shira.get_nb_trainable_parameters()[0] == LORA_BUDGET + HEAD

    for ckpt in ("step-6", "step-12"):
        assert sorted(os.listdir(out / "checkpoints" / ckpt)) == ["adapter_config.json", "adapter_model.safetensors",
                                                                   "trainer_state.pt"]
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == R and config["lora_alpha"] == 2 * R
    assert config["use_dora"] is False and config["lora_dropout"] == 0.0 and config["modules_to_save"] == ["lm_head"]
    assert len(config["target_modules"]) == 14
    loss, accuracy = _peft_eval(out / "final", out / "data" / "eval.jsonl")
    assert loss == pytest.approx(metrics["eval_after"]["loss"], rel=1e-5)
    assert accuracy == pytest.approx(metrics["eval_after"]["accuracy"], abs=1 / 200)


def test_dora_adds_one_magnitude_per_output_row_and_peft_loads_it(dora_run):
    out, metrics = dora_run
    assert metrics["status"] == "completed"
    assert metrics["eval_after"]["loss"] < 0.5 * metrics["eval_before"]["loss"]
    adapter = metrics["adapter"]
    assert adapter["type"] == "dora" and adapter["nnz"] == LORA_BUDGET + DORA_MAGNITUDES == 17408
    assert adapter["trainable_parameters"] == LORA_BUDGET + DORA_MAGNITUDES + HEAD
    tensors = load_file(out / "final" / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 14 and sum(tensors[k].numel() for k in magnitudes) == DORA_MAGNITUDES
    assert json.loads((out / "final" / "adapter_config.json").read_text())["use_dora"] is True
    loss, _ = _peft_eval(out / "final", out / "data" / "eval.jsonl")
    assert loss == pytest.approx(metrics["eval_after"]["loss"], rel=1e-5)


def test_lora_stop_and_resume_equals_an_uninterrupted_run(lora_run, tmp_path):
    straight_out, straight = lora_run
    out = tmp_path / "resumed"
    stopped = _train(out, "adapter=lora", "training.stop_after_step=6")
    assert stopped["status"] == "stopped" and stopped["train"]["steps"] == 6
    resumed = _train(out, "adapter=lora")  # training.resume auto: checkpoints/step-6
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith("step-6")
    assert resumed["train"]["losses"] == straight["train"]["losses"]  # exact, every step
    assert resumed["eval_after"] == straight["eval_after"]
    a = load_file(straight_out / "final" / "adapter_model.safetensors")
    b = load_file(out / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_another_adapter_kind_fails_fast(lora_run, capsys):
    out, _ = lora_run
    step6 = f"{out}/checkpoints/step-6"
    cases = [("adapter=dora", "holds an adapter with use_dora=False, but the config asks for adapter='dora'"),
             ("adapter=shira", "holds an adapter with peft_type='LORA', but the config asks for adapter='shira'"),
             ("adapter=lora lora.alpha=32",
              "holds an adapter with lora_alpha=16, but the config asks for lora.alpha=32.0")]
    for override, message in cases:
        assert main(["--config", TINY, f"output_dir={out}", *override.split(), f"training.resume={step6}"]) == 2
        assert message in capsys.readouterr().err


def test_resuming_other_targets_or_modules_to_save_fails_when_the_adapter_loads(lora_run, tmp_path, capsys):
    out, _ = lora_run
    cases = [("shira.modules_to_save=null", "holds an adapter with modules_to_save=['lm_head'], but the config asks "
                                            "for shira.modules_to_save=None"),
             ("shira.target_modules=[q_proj,v_proj]", "targets other layers than SHiRA would with "
                                                      "shira.target_modules=['q_proj', 'v_proj'] (missing [], extra")]
    for i, (override, message) in enumerate(cases):
        ckpt = tmp_path / str(i) / "checkpoints" / "step-6"
        shutil.copytree(out / "checkpoints" / "step-6", ckpt)
        argv = ["--config", TINY, f"output_dir={tmp_path / str(i)}", *SHORT, "adapter=lora", override]
        assert main(argv) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["adapter=foo"], "adapter='foo' is invalid; allowed: ['shira', 'lora', 'dora']"),
    (["adapter=lora", "lora.alpha=-1"], "lora.alpha=-1 is invalid: must be > 0, or null for 2*r"),
    (["adapter=lora", "lora.r=0"], "lora.r=0 is invalid: must be >= 1, or null for shira.r"),
    (["adapter=lora", "lora.dropout=1.0"], "lora.dropout=1 is invalid: must be in [0, 1)"),
    (["adapter=lora", "lora.rank=4"], "unknown key 'lora.rank'; allowed keys in 'lora': ['r', 'alpha', 'dropout']"),
    (["adapter=dora", "shira.mask_type=snip"], "shira.mask_type='snip' does not apply to adapter='dora'"),
    (["adapter=lora", "distributed.strategy=fsdp"],
     "adapter='lora' with distributed.strategy='fsdp' is not supported"),
])
def test_bad_lora_settings_are_named(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_run_config(TINY, overrides)
    assert message in str(info.value)


def test_lora_defaults_leave_a_shira_config_unchanged():
    cfg = load_run_config(TINY, [])
    assert cfg.adapter == "shira" and (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (None, None, 0.0)
    assert load_run_config(TINY, ["adapter=lora"]).shira.r == R  # the rank LoRA takes


def test_lora_under_ddp_matches_one_process(lora_run, tmp_path):
    """2 ranks x 8 examples = 1 rank x 16 (the lora_run fixture); rank 0 alone writes."""
    one_out, one = lora_run
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "shira_dist.train", "--config", TINY, f"output_dir={out}", *SHORT, "adapter=lora",
           "distributed.strategy=ddp", "training.micro_batch_size=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and ddp["global_batch"] == one["global_batch"] == 16
    assert ddp["replicas_in_sync"] is True
    assert ddp["train"]["losses"] == pytest.approx(one["train"]["losses"], rel=1e-6)
    a = load_file(out / "final" / "adapter_model.safetensors")
    b = load_file(one_out / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-6"]
