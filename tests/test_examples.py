"""The examples run as a user runs them, and show what they say they show."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_trains_saves_reloads_and_merges():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py")], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([\d.]+)", out)]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]  # it learned the sequence
    reloaded, merged = (float(x) for x in re.findall(r"max \|logit diff\| = ([\d.e+-]+)", out))
    assert reloaded == 0.0 and merged < 1e-4  # same logits after a reload, and after merging (fp32)


def _run_example(name: str, output_dir: Path) -> str:
    return subprocess.run([sys.executable, str(REPO / "examples" / name), str(output_dir)], capture_output=True,
                          text=True, timeout=300, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout


def _saved_files(out: str, directory: Path) -> set[str]:
    """The file names the example printed for ``directory`` (``saved <dir>: <names>``)."""
    line = re.search(rf"^saved {re.escape(str(directory))}: (.*)$", out, flags=re.M)
    assert line, f"no 'saved {directory}' line in:\n{out}"
    names = set(line.group(1).split())
    assert names == set(os.listdir(directory))
    return names


def _assert_adapter_only(names: set[str]) -> None:
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}


def _reload_diff(out: str) -> float:
    return float(re.search(r"peft.PeftModel.from_pretrained: max \|logit diff\| = ([\d.e+-]+)", out).group(1))


def test_trainer_sft_trains_and_saves_peft_adapter_only(tmp_path):
    out = _run_example("trainer_sft.py", tmp_path)
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([\d.]+)", out)]
    assert len(losses) == 4 and losses[-1] < losses[0], out
    for directory in (tmp_path / "final", tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"):
        _assert_adapter_only(_saved_files(out, directory))
    assert _reload_diff(out) < 1e-5  # plain peft computes what the trained model computes (fp32)


def test_trl_sft_trains_and_saves_peft_adapter(tmp_path):
    out = _run_example("trl_sft.py", tmp_path)
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([\d.]+)", out)]
    assert len(losses) == 4 and losses[-1] < losses[0], out
    _assert_adapter_only(_saved_files(out, tmp_path / "final"))
    assert _reload_diff(out) < 1e-5


def test_trl_dpo_trains_against_the_base_model_and_saves_both_adapters(tmp_path):
    out = _run_example("trl_dpo.py", tmp_path)
    assert "adapters: ['default', 'ref'] (active: default)" in out
    steps = re.findall(r"step +\d+ +loss ([\d.]+) +reward_margin (-?[\d.]+)", out)
    losses, margins = [float(x) for x, _ in steps], [float(m) for _, m in steps]
    assert len(steps) == 4 and losses[-1] < losses[0] < 0.6932 and margins[-1] > 0, out  # ln 2 = 0.6931
    names = _saved_files(out, tmp_path / "final")
    _assert_adapter_only(names)
    assert "ref" in names  # the reference adapter, in PEFT's subfolder layout
    _assert_adapter_only(set(os.listdir(tmp_path / "final" / "ref")))
    assert _reload_diff(out) < 1e-5
    assert float(re.search(r"reference adapter vs base model: max \|logit diff\| = ([\d.e+-]+)", out).group(1)) == 0.0
