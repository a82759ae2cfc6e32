"""The examples run as a user runs them, and show what they say they show."""

from __future__ import annotations

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
