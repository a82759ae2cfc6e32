"""The job killed or starved for real, as a subprocess (configs/tiny.yaml, 8 steps):

- SIGKILL in the middle of writing a checkpoint, and in the middle of pruning one
  (SHIRA_DIST_TEST_PAUSE holds the process there), then the same command again: it cleans
  up, resumes from the newest whole checkpoint and ends exactly like an uninterrupted run;
- SIGTERM: metrics.json says "interrupted", exit 143, and a rerun resumes;
- a full disk (a 2 MiB tmpfs as output_dir; needs root): one line, exit 1, metrics.json "failed";
- two DDP ranks (torchrun, gloo) diverging: both stop at the same step, nothing non-finite saved;
  DeepSpeed (which steps inside its engine) stops at the first non-finite step, whatever
  training.max_nonfinite_steps says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.tiny_job import ROOT, SHORT, TINY, metrics as _metrics, run_tiny as _main, small_tmpfs

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _paused_job(out: Path, pause: str) -> subprocess.Popen:
    """The job as a subprocess, held at ``pause`` (see checkpointing.PAUSE_ENV) when this returns."""
    proc = subprocess.Popen([sys.executable, "-m", "shira_dist.train", "--config", TINY, f"output_dir={out}", *SHORT],
                            cwd=ROOT, env=_env(SHIRA_DIST_TEST_PAUSE=pause), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "test pause:" in line:
                return proc
    finally:
        watchdog.cancel()
    proc.wait()
    raise AssertionError("the job ended before the pause:\n" + "".join(seen[-30:]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    assert _main(out) == 0
    return {"dir": out, **_metrics(out)}


def _assert_like_reference(out: Path, reference: dict) -> None:
    m = _metrics(out)
    assert m["status"] == "completed" and m["train"]["losses"] == reference["train"]["losses"]
    keys = ("step", "train/loss", "train/grad_norm", "train/accuracy", "train/lr")
    assert [{k: p[k] for k in keys} for p in m["log"]] == [{k: p[k] for k in keys} for p in reference["log"]]
    a, b = load_file(out / "final" / "adapter_model.safetensors"), load_file(reference["dir"] / "final" /
                                                                             "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6", "step-8"]


def test_sigkill_while_saving_then_rerun_resumes_from_the_last_whole_checkpoint(tmp_path, capsys, reference):
    out = tmp_path / "run"
    proc = _paused_job(out, "save:4")  # step-4 written into its temp directory, not yet renamed
    proc.kill()
    proc.wait()
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step-2"]
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-step-4-")]
    assert _metrics(out)["status"] == "running"  # a SIGKILL leaves no chance to write more
    assert _main(out) == 0
    log = capsys.readouterr().out
    assert "removed what an interrupted save or prune left behind: checkpoints/.tmp-step-4-" in log
    assert f"resumed from {ckpts}/step-2 at step 2" in log
    _assert_like_reference(out, reference)


def test_sigkill_while_pruning_then_rerun_resumes(tmp_path, capsys, reference):
    out = tmp_path / "run"
    proc = _paused_job(out, "prune:6")  # step-6 saved; step-2 renamed away and half deleted
    proc.kill()
    proc.wait()
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step-4", "step-6"]
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".trash-step-2-")]
    assert _main(out) == 0
    log = capsys.readouterr().out
    assert "removed what an interrupted save or prune left behind: checkpoints/.trash-step-2-" in log
    assert f"resumed from {ckpts}/step-6 at step 6" in log
    _assert_like_reference(out, reference)


def test_sigterm_records_interrupted_and_exits_143(tmp_path, reference):
    out = tmp_path / "run"
    proc = _paused_job(out, "save:4")
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "interrupted by SIGTERM; metrics.json says status interrupted" in rest and "Traceback" not in rest
    m = _metrics(out)
    assert m["status"] == "interrupted" and m["reason"] == "interrupted by SIGTERM" and m["train"]["steps"] == 4
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # its temp dir removed
    assert _main(out) == 0
    _assert_like_reference(out, reference)


def test_a_full_disk_is_one_line_and_recorded(tmp_path, capsys):
    with small_tmpfs(tmp_path / "small", "2M") as out:
        rc = _main(out, "training.save_every=1", "training.keep_checkpoints=null", f"data.cache_dir={tmp_path}/cache")
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error" in line.lower()]
        assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
        assert f"no space left on the device of output_dir='{out}'" in lines[0], err
        m = _metrics(out)
        assert m["status"] == "failed" and "no space left" in m["reason"]
        assert 1 <= len(list((out / "checkpoints").glob("step-*"))) < 8
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_metrics_json_leaves_running_even_on_a_completely_full_disk(tmp_path):
    """No room for a temp file: the old document is truncated in place and a short one written."""
    from shira_dist.training.errors import RunFailed
    from shira_dist.training.report import RunRecord, write_metrics

    with small_tmpfs(tmp_path / "full", "256k") as out:
        record = RunRecord(str(out), is_main=True)
        record.active = True
        write_metrics(str(out / "metrics.json"), {"status": "running", "losses": [1.0] * 4000})
        with pytest.raises(OSError), open(out / "filler", "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
        record.finish_with(RunFailed("the disk is full"))
        assert _metrics(out) == {"status": "failed", "reason": "the disk is full"}


def test_ddp_ranks_stop_together_on_a_nonfinite_loss(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shira_dist.train", "--config", TINY, f"output_dir={out}", "distributed.strategy=ddp", *SHORT,
           "training.learning_rate=1e30", "training.save_every=1", "training.keep_checkpoints=null"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("error: non-finite loss at step 2 (loss nan") == 2, output[-3000:]  # both ranks
    m = _metrics(out)
    assert m["status"] == "failed" and m["world_size"] == 2 and "non-finite loss at step 2" in m["reason"]
    assert not (out / "final").exists() and [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]


def test_deepspeed_stops_at_the_first_nonfinite_step(tmp_path):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "shira_dist.train", "--config", TINY, f"output_dir={out}", *SHORT,
           "distributed.strategy=deepspeed", "training.learning_rate=1e30", "training.save_every=1",
           "training.max_nonfinite_steps=3"]
    env = _env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: non-finite loss at step 2 (loss nan" in proc.stderr and "cannot be skipped" in proc.stderr
    assert _metrics(out)["status"] == "failed" and not (out / "final").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
