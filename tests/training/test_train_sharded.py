"""The training job under the sharded strategies: ``distributed.strategy: fsdp | deepspeed``.

Real `torchrun --nproc_per_node 2` runs (gloo, loopback) of configs/tiny.yaml (which also trains
a modules_to_save head) against one process with the same global batch (2 ranks x 16 = 1 rank x
16 x 2 accumulation steps): per-step losses within 1e-5 relative, saved adapters within 1e-5
absolute (observed ~1e-7: only float summation order differs), ranks in sync. Resume crosses
engines with the optimizer state: a ZeRO-3 + offload run stopped at step 6 and finished as one
process, and one-process runs finished under FSDP2 and ZeRO-2, give the losses of an
uninterrupted single-process run (Adam's moments are restored, not restarted).

With weights loaded from a directory, ZeRO-3 builds the base partitioned (distributed.zero_init):
the same losses and adapter as one process, and resumes as one process or partitioned again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
ZERO = ROOT / "configs" / "deepspeed"
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")
COMMON = ["training.progress_bar=false", "training.max_steps=12", "training.eval_before_training=false"]
LOSS_RTOL, VALUE_ATOL = 1e-5, 1e-5


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    return env


def _job(out: Path, nproc: int, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "shira_dist.train", "--config", TINY, f"output_dir={out}", *COMMON,
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(k.endswith("lm_head.weight") for k in a)  # the modules_to_save head is saved whole
    for key in a:
        assert a[key].shape == b[key].shape, key
        if key.endswith("shira_indices"):
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key], b[key], atol=VALUE_ATOL, rtol=0), key


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """One process, the whole global batch (2 micro-batches of 16) per step: the reference."""
    out = tmp_path_factory.mktemp("single")
    _job(out, 1, "training.gradient_accumulation_steps=2")
    return {"dir": out, **_metrics(out)}


@pytest.mark.parametrize("strategy", [
    ["distributed.strategy=fsdp"],
    ["distributed.strategy=deepspeed", f"distributed.deepspeed_config={ZERO / 'zero3.json'}"],
    # ZeRO-2 with the loop's own accumulation (2 ranks x 8 x 2 micro-batches = 32)
    ["distributed.strategy=deepspeed", f"distributed.deepspeed_config={ZERO / 'zero2.json'}",
     "training.micro_batch_size=8", "training.gradient_accumulation_steps=2"],
], ids=["fsdp2", "zero3", "zero2-accumulation"])
def test_two_ranks_match_one_process(tmp_path, single, strategy):
    _job(tmp_path, 2, *strategy)
    m = _metrics(tmp_path)
    assert (m["strategy"], m["world_size"], m["global_batch"]) == (strategy[0].split("=")[1], 2, 32)
    assert m["replicas_in_sync"] is True
    assert m["train"]["losses"] == pytest.approx(single["train"]["losses"], rel=LOSS_RTOL)
    assert m["train"]["losses"][-1] < 0.5 * m["train"]["losses"][0]
    assert m["eval_after"]["accuracy"] == pytest.approx(single["eval_after"]["accuracy"], abs=1 / 200)
    _assert_same_adapter(tmp_path / "final", single["dir"] / "final")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-12"]


@pytest.mark.parametrize("first,then", [
    ((2, "distributed.strategy=deepspeed", f"distributed.deepspeed_config={ZERO / 'zero3_offload.json'}"),
     (1, "training.gradient_accumulation_steps=2")),
    ((1, "training.gradient_accumulation_steps=2"), (2, "distributed.strategy=fsdp")),
    ((1, "training.gradient_accumulation_steps=2"),
     (2, "distributed.strategy=deepspeed", f"distributed.deepspeed_config={ZERO / 'zero2.json'}")),
], ids=["zero3-offload-then-single", "single-then-fsdp2", "single-then-zero2"])
def test_resume_under_another_engine_restores_the_optimizer(tmp_path, single, first, then):
    _job(tmp_path, first[0], *first[1:], "training.stop_after_step=6")
    assert _metrics(tmp_path)["status"] == "stopped"
    proc = _job(tmp_path, then[0], *then[1:])
    assert "resumed from" in proc.stdout and "step-6" in proc.stdout
    m = _metrics(tmp_path)
    assert m["status"] == "completed" and len(m["train"]["losses"]) == 12
    assert m["train"]["losses"] == pytest.approx(single["train"]["losses"], rel=LOSS_RTOL)
    _assert_same_adapter(tmp_path / "final", single["dir"] / "final")


@pytest.mark.parametrize("strategy", [["distributed.strategy=fsdp"], ["distributed.strategy=deepspeed"]],
                         ids=["fsdp2", "deepspeed-default-zero2"])
def test_one_process_gets_a_one_rank_group(tmp_path, single, strategy):
    _job(tmp_path, 1, *strategy, "training.gradient_accumulation_steps=2", "training.max_steps=4")
    m = _metrics(tmp_path)
    assert m["world_size"] == 1 and m["replicas_in_sync"] is True
    assert m["train"]["losses"] == pytest.approx(single["train"]["losses"][:4], rel=LOSS_RTOL)


def test_deepspeed_config_with_its_own_optimizer_is_refused(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    proc = _job(tmp_path / "run", 1, "distributed.strategy=deepspeed", f"distributed.deepspeed_config={bad}",
                ok=False)
    assert proc.returncode != 0
    assert "['optimizer']" in proc.stderr and "training.*" in proc.stderr


def test_fsdp_with_a_gradient_mask_uses_rank_zeros_calibration(tmp_path):
    """Each rank scores its own first micro-batches on the whole model, before sharding; rank 0's
    mask is broadcast, so the ranks train one adapter (checked bit for bit at the end)."""
    _job(tmp_path, 2, "distributed.strategy=fsdp", "shira.mask_type=gradient", "shira.calibration_batches=1",
         "training.max_steps=3")
    m = _metrics(tmp_path)
    assert m["replicas_in_sync"] is True and m["train"]["steps"] == 3
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["mask_type"] == "gradient"


# ---- ZeRO-3 building the base partitioned (distributed.zero_init) ------------------------------
@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    """configs/tiny.yaml's model saved as a local Hugging Face directory (zero_init applies to weights
    loaded from disk), and the one-process reference run on it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from shira_dist.training import load_run_config

    model_dir = tmp_path_factory.mktemp("tiny_model")
    inline = dict(load_run_config(TINY).model.inline_config)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(inline.pop("model_type"), **inline)).save_pretrained(model_dir)
    source = ["model.inline_config=null", f"model.path={model_dir}"]
    out = tmp_path_factory.mktemp("single_loaded")
    _job(out, 1, *source, "training.gradient_accumulation_steps=2")
    return {"source": source, "dir": out, **_metrics(out)}


ZERO3 = ["distributed.strategy=deepspeed", f"distributed.deepspeed_config={ZERO / 'zero3.json'}"]


def test_zero3_builds_the_base_partitioned_and_matches_one_process(tmp_path, loaded):
    proc = _job(tmp_path, 2, *loaded["source"], *ZERO3)  # distributed.zero_init: auto
    assert "base model built partitioned" in proc.stdout
    m = _metrics(tmp_path)
    assert m["base_built_partitioned"] is True and loaded["base_built_partitioned"] is False
    assert m["replicas_in_sync"] is True
    assert m["train"]["losses"] == pytest.approx(loaded["train"]["losses"], rel=LOSS_RTOL)
    assert m["train"]["losses"][-1] < 0.5 * m["train"]["losses"][0]
    _assert_same_adapter(tmp_path / "final", loaded["dir"] / "final")


@pytest.mark.parametrize("then,partitioned", [
    ((1, "training.gradient_accumulation_steps=2"), False),
    ((2, *ZERO3), True),  # the adapter checkpoint loads into a partitioned base
], ids=["then-single", "then-zero3-partitioned"])
def test_partitioned_zero3_run_resumes(tmp_path, loaded, then, partitioned):
    _job(tmp_path, 2, *loaded["source"], *ZERO3, "distributed.zero_init=true", "training.stop_after_step=6")
    assert _metrics(tmp_path)["base_built_partitioned"] is True
    proc = _job(tmp_path, then[0], *loaded["source"], *then[1:])
    assert "resumed from" in proc.stdout and "step-6" in proc.stdout
    m = _metrics(tmp_path)
    assert m["status"] == "completed" and m["base_built_partitioned"] is partitioned and m["replicas_in_sync"]
    assert m["train"]["losses"] == pytest.approx(loaded["train"]["losses"], rel=LOSS_RTOL)
    _assert_same_adapter(tmp_path / "final", loaded["dir"] / "final")


@pytest.mark.parametrize("overrides,message", [
    (["distributed.zero_init=true"], "is for strategy 'deepspeed' with ZeRO stage 3"),
    (["distributed.strategy=deepspeed", "distributed.zero_init=true"], "needs weights loaded from model.path"),
    (["distributed.strategy=deepspeed", "distributed.zero_init=true", "model.inline_config=null",
      "model.path=."], "needs ZeRO stage 3, but this run uses stage 2"),
])
def test_zero_init_misuse_is_refused_before_starting(tmp_path, overrides, message):
    proc = _job(tmp_path, 1, *overrides, ok=False)
    assert proc.returncode != 0 and message in proc.stderr
