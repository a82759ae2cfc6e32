"""W&B tracking with the real wandb package: without an API key the run is offline, under
<output_dir>/wandb/, and its transaction log holds the config, the adapter summary, the
training curves (loss, lr, throughput, memory) and the held-out metrics.

The .wandb file is read back with a small reader of its record format (a LevelDB-style log
of protobuf `Record`s): 7-byte file header, then 32 KiB blocks of chunks, each chunk
``crc32c (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last) | data``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
_BLOCK = 32 * 1024


def _records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_offline_wandb_run_holds_config_adapter_summary_and_metrics(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "-m", "shira_dist.train", "--config", TINY, f"output_dir={out}", "tracking.backend=wandb",
           "tracking.project=shira-test", "training.max_steps=10", "training.log_every=5", "training.save_every=0",
           "training.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    assert f"wandb sync {runs[0]}" in proc.stdout  # the upload hint
    (log,) = runs[0].glob("run-*.wandb")

    history, summary, config = [], {}, {}
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind == "run":  # the run's config travels in its first record
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})

    steps = {h["_step"]: h for h in history}
    for step in (5, 10):
        for key in ("train/loss", "train/lr", "train/tokens_per_second", "system/peak_memory_mb", "train/grad_norm"):
            assert key in steps[step], (step, sorted(steps[step]))
    assert steps[10]["train/loss"] < steps[5]["train/loss"] < 5.6
    assert "eval/accuracy" in steps[0] and "eval/accuracy" in steps[10]  # before and after training
    metrics = json.loads((out / "metrics.json").read_text())
    assert steps[10]["eval/accuracy"] == metrics["eval_after"]["accuracy"]
    assert summary["adapter/nnz"] == 16384 and summary["adapter/num_layers"] == 14
    assert summary["adapter/layers"]["model.layers.1.mlp.down_proj"]["density"] == 1536 / (64 * 128)
    assert summary["final/eval_accuracy"] == metrics["eval_after"]["accuracy"]
    assert config["training"]["max_steps"] == 10 and config["shira"]["r"] == 8
    assert config["output_dir"] == str(out) and config["tracking"]["project"] == "shira-test"
