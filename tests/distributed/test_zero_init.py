"""SHiRA adapters on a model built partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init``).

A real 2-rank torchrun job (gloo, CPU accelerator) loads a saved tiny Llama while a ZeRO-3
``HfDeepSpeedConfig`` is alive, as the HF Trainer does, so no rank ever holds a whole weight.
Checked against the same checkpoint loaded whole in this process: every mask type that needs
only shapes (random, struct) or gathers one weight at a time (weight_magnitude) gives exactly
the same patterns on both ranks; the modules_to_save copy holds the whole head as an ordinary
parameter; parameter counts are the whole model's; merging and data-driven masks refuse with
errors that say why and what to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.dist import harness

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "dist" / "zero_init_worker.py"
MASK_TYPES = ("random", "struct", "weight_magnitude")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    harness.base_model().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ranks(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("facts")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(saved), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _whole(saved, mask_type: str):
    from transformers import LlamaForCausalLM

    import shira_dist

    base = LlamaForCausalLM.from_pretrained(saved, local_files_only=True)
    cfg = shira_dist.ShiraConfig(r=2, target_modules=harness.TARGETS, mask_type=mask_type, random_seed=0,
                                 modules_to_save=["lm_head"])
    return shira_dist.get_peft_model(base, cfg)


def test_the_base_really_is_partitioned(ranks):
    for facts in ranks:
        assert facts["partitioned_numel"] == 0
        assert facts["full_shape"] == (harness.HF_CONFIG["hidden_size"], harness.HF_CONFIG["hidden_size"])


@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_patterns_equal_the_whole_models(saved, ranks, mask_type):
    whole = {name: layer.shira_indices["default"] for name, layer in _whole(saved, mask_type).shira_layers()}
    assert len(whole) == 7 * harness.HF_CONFIG["num_hidden_layers"]
    for facts in ranks:
        got = facts["patterns"][mask_type]
        assert got.keys() == whole.keys()
        for name in whole:
            assert torch.equal(got[name], whole[name]), (mask_type, name)


@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_modules_to_save_copy_and_counts_are_whole(saved, ranks, mask_type):
    model = _whole(saved, mask_type)
    head = model.base_model.model.lm_head.original_module.weight
    for facts in ranks:
        copy, is_zero3_param, trainable = facts["head"][mask_type]
        assert torch.equal(copy, head)  # gathered, bit for bit
        assert not is_zero3_param and trainable  # an ordinary parameter the engine will partition itself
        assert tuple(facts["counts"][mask_type]) == model.get_nb_trainable_parameters()


def test_merge_and_calibration_refuse_clearly(ranks):
    for facts in ranks:
        assert "ZeRO-3 partition" in facts["merge_error"] and "save_adapter" in facts["merge_error"]
        assert "DeepSpeed ZeRO-3 partition" in facts["calibration_error"]
        assert "before sharding" in facts["calibration_error"]
