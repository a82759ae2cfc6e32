"""configs/tiny.yaml end to end in one process (fp32, exact numbers): it learns, it writes
everything where the contract says, and a stopped-and-resumed run equals an uninterrupted one
bit for bit (losses, adapter values, held-out scores)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shira_dist import PeftModel
from shira_dist.train import main

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def _train(out: Path, *overrides: str) -> dict:
    threads = torch.get_num_threads()
    try:
        rc = main(["--config", TINY, f"output_dir={out}", "training.progress_bar=false", *overrides])
    finally:
        torch.set_num_threads(threads)  # the config sets 1 thread; give the test session its own back
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, _train(out)


def test_tiny_run_learns(straight):
    _, metrics = straight
    before, after, train = metrics["eval_before"], metrics["eval_after"], metrics["train"]
    assert metrics["status"] == "completed" and train["steps"] == 40 == len(train["losses"])
    assert before["examples"] == after["examples"] == 200
    assert after["loss"] < 0.5 * before["loss"]  # 5.64 -> 0.47 when written
    assert before["accuracy"] < 0.6 and after["accuracy"] >= 0.7  # 0.46 -> 0.81 when written
    assert train["final_loss"] < 0.5 * train["first_loss"]
    assert [p["step"] for p in metrics["log"]] == [10, 20, 30, 40]
    assert metrics["adapter"]["num_layers"] == 14 and metrics["adapter"]["nnz"] == 16384
    assert metrics["adapter"]["layers"]["model.layers.0.self_attn.q_proj"]["density"] == pytest.approx(1024 / 4096)


def test_tiny_run_writes_every_output_where_the_contract_says(straight):
    out, metrics = straight
    assert (out / "resolved_config.yaml").is_file()
    for step in (20, 40):
        ckpt = out / "checkpoints" / f"step-{step}"
        assert sorted(os.listdir(ckpt)) == ["adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"]
    assert sorted(os.listdir(out / "final")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not list((out / "checkpoints").glob(".tmp*")) and not list(out.glob(".tmp*"))
    assert not (out / "wandb").exists()  # tracking: none
    final = load_file(out / "final" / "adapter_model.safetensors")
    last = load_file(out / "checkpoints" / "step-40" / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == 8 and config["modules_to_save"] == ["lm_head"]


def test_final_adapter_loads_with_shira_dist_and_peft(straight):
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    out, _ = straight
    inline = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 258, "max_position_embeddings": 128}

    def base():
        torch.manual_seed(0)  # training.seed: the same random base weights as the run
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **inline)).eval()

    ids = torch.tensor([list(b"review: the film was superb and fun\nsentiment:")])
    ours = PeftModel.from_pretrained(base(), str(out / "final"))
    theirs = peft.PeftModel.from_pretrained(base(), str(out / "final"))
    with torch.no_grad():
        plain, a, b = base()(ids).logits[0, -1], ours(ids).logits[0, -1], theirs(ids).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, plain, atol=1e-2)
    assert a[ord("p")] > a[ord("n")]  # a clearly positive review


def test_stop_and_resume_equals_an_uninterrupted_run(straight, tmp_path):
    out_a, straight_metrics = straight
    out = tmp_path / "resumed"
    stopped = _train(out, "training.stop_after_step=20")
    assert stopped["status"] == "stopped" and stopped["train"]["steps"] == 20 and not (out / "final").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-20"]
    resumed = _train(out)  # training.resume: auto picks up checkpoints/step-20
    assert resumed["status"] == "completed"
    assert resumed["train"]["losses"] == straight_metrics["train"]["losses"]  # exact, every step
    assert resumed["eval_after"] == straight_metrics["eval_after"]
    assert resumed["eval_before"] == straight_metrics["eval_before"]  # carried in the checkpoint
    a = load_file(out_a / "final" / "adapter_model.safetensors")
    b = load_file(out / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_checkpoints_and_resume_never(tmp_path):
    out = tmp_path / "run"
    metrics = _train(out, "training.max_steps=6", "training.save_every=2", "training.keep_checkpoints=2",
                     "training.eval_before_training=false", "training.lr_schedule=linear",
                     "training.gradient_accumulation_steps=2", "training.micro_batch_size=4")
    assert metrics["eval_before"] is None and metrics["train"]["steps"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]
    again = _train(out, "training.max_steps=6", "training.resume=never", "training.micro_batch_size=4",
                   "training.eval_before_training=false", "training.lr_schedule=linear",
                   "training.gradient_accumulation_steps=2")
    assert again["train"]["losses"] == metrics["train"]["losses"]  # started over, same numbers
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6"]  # the old ones are gone


def test_resuming_a_different_adapter_fails_fast(straight, capsys):
    out, _ = straight
    rc = main(["--config", TINY, f"output_dir={out}", "shira.r=4", f"training.resume={out}/checkpoints/step-20"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{out}/checkpoints/step-20 holds an adapter with r=8, but the config asks for shira.r=4" in err
    rc = main(["--config", TINY, f"output_dir={out}", "shira.r=4"])  # resume=auto: the run is complete
    assert rc == 2 and f"output_dir='{out}' holds a completed run (40 steps" in capsys.readouterr().err


def test_data_driven_mask_is_calibrated_on_training_batches(straight, tmp_path):
    out_random, _ = straight
    metrics = _train(tmp_path / "snip", "shira.mask_type=snip", "shira.calibration_batches=2", "training.max_steps=3",
                     "training.eval_before_training=false")
    assert metrics["status"] == "completed" and metrics["adapter"]["nnz"] == 16384
    snip = load_file(tmp_path / "snip" / "final" / "adapter_model.safetensors")
    rand = load_file(out_random / "final" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.shira_indices"
    assert snip[key].shape == rand[key].shape and not torch.equal(snip[key], rand[key])
    assert json.loads((tmp_path / "snip" / "final" / "adapter_config.json").read_text())["mask_type"] == "snip"


def test_bf16_autocast_trains(tmp_path):
    metrics = _train(tmp_path / "bf16", "training.precision=bf16", "training.max_steps=12",
                     "training.eval_before_training=false", "training.save_every=0")
    assert metrics["precision"] == "bf16"
    losses = metrics["train"]["losses"]
    assert all(0.0 < x < 10.0 for x in losses) and sum(losses[-3:]) < 0.6 * sum(losses[:3])
    final = load_file(tmp_path / "bf16" / "final" / "adapter_model.safetensors")
    assert all(v.dtype in (torch.float32, torch.int32) for v in final.values())  # values stay fp32
