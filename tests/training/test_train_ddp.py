"""A real `torchrun --nproc_per_node 2` (gloo, loopback only) ddp run of configs/tiny.yaml.

It must keep both ranks' adapters bit-identical (checked by an all-gather of checksums at the
end; metrics.json["replicas_in_sync"]), also when the mask is drawn without a seed (rank 0's
is broadcast), and match a single process with the same global batch (2 ranks x 16 = 1 rank
x 16 x 2 accumulation steps): losses within 1e-6 relative, adapter values within 1e-6
absolute (they agreed exactly when written; only float summation order may differ).
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
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shira_dist.train", "--config", TINY, f"output_dir={out}", "distributed.strategy=ddp",
           "training.progress_bar=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def _single(out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "shira_dist.train", "--config", TINY, f"output_dir={out}",
           "training.progress_bar=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    steps = ["training.max_steps=12", "training.save_every=6"]
    ddp = _torchrun(tmp_path / "ddp", *steps)
    one = _single(tmp_path / "one", *steps, "training.gradient_accumulation_steps=2")
    assert ddp["world_size"] == 2 and ddp["strategy"] == "ddp" and ddp["global_batch"] == one["global_batch"] == 32
    assert ddp["replicas_in_sync"] is True
    assert ddp["train"]["losses"] == pytest.approx(one["train"]["losses"], rel=1e-6)
    assert ddp["train"]["losses"][-1] < 0.5 * ddp["train"]["losses"][0]
    assert ddp["eval_after"]["accuracy"] == pytest.approx(one["eval_after"]["accuracy"], abs=1 / 200)
    a = load_file(tmp_path / "ddp" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("shira_indices"):
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    # rank 0 alone wrote: one set of files, checkpoints at 6 and 12
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-12", "step-6"]


def test_ddp_ranks_share_rank_zeros_unseeded_mask(tmp_path):
    metrics = _torchrun(tmp_path / "unseeded", "shira.random_seed=null", "training.max_steps=3",
                        "training.eval_before_training=false")
    assert metrics["replicas_in_sync"] is True and metrics["train"]["steps"] == 3
    config = json.loads((tmp_path / "unseeded" / "final" / "adapter_config.json").read_text())
    assert config["random_seed"] is None


def test_two_torchrun_agents_on_loopback_form_one_multi_node_job(tmp_path):
    """--nnodes 2 --node_rank 0/1 on 127.0.0.1: every process is its node's local rank 0, so both
    fill the (shared) data cache; the job still trains as one and rank 0 alone writes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "multinode"
    agents = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "shira_dist.train", "--config", TINY, f"output_dir={out}", "distributed.strategy=ddp",
               "training.progress_bar=false", "training.max_steps=4", "training.eval_before_training=false"]
        agents.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
    logs = [a.communicate(timeout=240)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["replicas_in_sync"] is True and metrics["train"]["steps"] == 4
    assert "done: 4 steps" in logs[0] and "done:" not in logs[1]  # only global rank 0 reports
