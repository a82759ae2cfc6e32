"""The command line fails fast: a bad config, a missing data file, an unknown model path, an
unavailable strategy or a launch that does not fit the strategy exits with status 2 and one
clear message, before any process group starts (a rank that started one would wait for a peer
that never comes: these runs claim WORLD_SIZE=2 and would hang) and before writing anything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SHIRA_DIST = Path(sys.executable).parent / "shira-dist"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], world_size: int = 1, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    if world_size > 1:  # as torchrun would set them for rank 0 of 2
        env.update(RANK="0", WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _train(*overrides: str, world_size: int = 2, out: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "shira_dist.train", "--config", TINY, f"output_dir={out}",
                 "distributed.strategy=ddp", *overrides],
                world_size=world_size)


@pytest.mark.parametrize("overrides, message", [
    (["training.max_stpes=3"], "unknown key 'training.max_stpes'; allowed keys in 'training': ['seed', 'max_steps'"),
    (["training.max_steps=-1"], "training.max_steps=-1 is invalid: must be >= 1"),
    (["distributed.strategy=horovod"], "distributed.strategy='horovod' is invalid; allowed: ['single', 'ddp', 'fsdp', "
                                       "'deepspeed']"),
    (["data.prepare=null", "data.train_files=[tests/data/missing.jsonl]"],
     f"data.train_files: '{ROOT / 'tests' / 'data' / 'missing.jsonl'}' does not exist"),
    (["model.inline_config=null", "model.tokenizer=null", "model.path=/nonexistent/model"],
     "model.path='/nonexistent/model' is not a directory"),
    (["model.inline_config=null", "model.tokenizer=null", "model.path=tests"],
     f"model.path='{ROOT / 'tests'}' has no config.json"),
    (["model.tokenizer=/nonexistent/tok"], "model.tokenizer='/nonexistent/tok' is not a directory"),
    (["distributed.strategy=single"], "distributed.strategy='single' but the launcher started 2 processes"),
    (["training.resume=/nonexistent/ckpt"], "training.resume='/nonexistent/ckpt' is not a checkpoint directory"),
])
def test_bad_runs_fail_fast_with_a_clear_message(tmp_path, monkeypatch, capsys, overrides, message):
    from shira_dist.train import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RANK", "0")  # rank 0 of 2, as torchrun sets it: a process group would wait for rank 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    rc = main(["--config", TINY, f"output_dir={tmp_path / 'out'}", "distributed.strategy=ddp", *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.strip().count("\n") == 0  # one line, no traceback
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_bad_run_exits_with_status_2_before_any_process_group(tmp_path):
    proc = _train("training.max_steps=0", out=tmp_path / "out")  # a real process, as torchrun's rank 0 of 2
    assert proc.returncode == 2 and "training.max_steps=0 is invalid: must be >= 1" in proc.stderr, proc.stderr
    proc = _train("data.prepare=null", "data.train_files=[/nope.jsonl]", out=tmp_path / "out")
    assert proc.returncode == 2 and "data.train_files: '/nope.jsonl' does not exist" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_are_available_and_still_fail_fast(tmp_path, strategy):
    from shira_dist.training.strategies import STRATEGIES

    assert strategy in STRATEGIES
    proc = _train(f"distributed.strategy={strategy}", "data.prepare=null", "data.train_files=[/nope.jsonl]",
                  out=tmp_path / "out")
    assert proc.returncode == 2 and "'/nope.jsonl' does not exist" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_shira_dist_console_command(tmp_path):
    usage = _run([str(SHIRA_DIST)])
    assert usage.returncode == 2 and "shira-dist {train,merge,generate,eval}" in usage.stdout
    bad = _run([str(SHIRA_DIST), "train", "--config", TINY, f"output_dir={tmp_path}/o", "training.bogus=1"])
    assert bad.returncode == 2 and "shira-dist train: error: unknown key 'training.bogus'" in bad.stderr
    unknown = _run([str(SHIRA_DIST), "fly"])
    assert unknown.returncode == 2 and "unknown command 'fly'; commands: ['train', 'merge', 'generate', 'eval']" in unknown.stderr
    missing = _run([str(SHIRA_DIST), "train", "--config", str(tmp_path / "none.yaml")])
    assert missing.returncode == 2 and "no such file" in missing.stderr
