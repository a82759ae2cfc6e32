"""The study's cache: one small JSON per finished cell, written last and atomically.

    <cache>/study.json                           the settings the cached cells were made with
    <cache>/base/<task>.json                     the base model's accuracy (no adapter)
    <cache>/cells/<method>/seed<k>/<task>.json   single-task: accuracy, time, memory
    <cache>/adapters/<method>/seed<k>/<task>/    that cell's trained adapter (PEFT's files)
    <cache>/fused/<method>/seed<k>/<t1+t2+..>.json  the fused adapter's accuracy per task
    <cache>/tables.md                            the tables of the last run

A cell counts as done when its JSON exists (and, for training cells, its adapter directory):
the adapter is renamed into place before the JSON is written, so an interrupted run never
leaves a JSON without its adapter, and a re-run computes only what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def save_dir_atomically(target: Path, save: Callable[[str], None]) -> None:
    """``save(tmp_dir)`` fills a temp directory that is then renamed to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        save(str(tmp))
        if target.exists():  # left by a run stopped between the rename and its JSON
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Cache:
    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def check_settings(self, settings: dict) -> None:
        """The cache holds cells of these settings only; a different study needs another --cache."""
        path = self.root / "study.json"
        held = read_json(path)
        if held is None:
            write_json(path, settings)
        elif held != settings:
            changed = sorted(k for k in set(held) | set(settings) if held.get(k) != settings.get(k))
            raise SystemExit(f"--cache {self.root}: its cells were made with other settings (differ in {changed}: "
                             f"{ {k: held.get(k) for k in changed} } vs { {k: settings.get(k) for k in changed} }); "
                             "use another --cache directory or delete this one")

    def base(self, task: str) -> Path:
        return self.root / "base" / f"{task}.json"

    def cell(self, method: str, seed: int, task: str) -> Path:
        return self.root / "cells" / method / f"seed{seed}" / f"{task}.json"

    def adapter(self, method: str, seed: int, task: str) -> Path:
        return self.root / "adapters" / method / f"seed{seed}" / task

    def fused(self, method: str, seed: int, tasks: list[str]) -> Path:
        return self.root / "fused" / method / f"seed{seed}" / f"{'+'.join(tasks)}.json"

    def cell_done(self, method: str, seed: int, task: str) -> Optional[dict]:
        data = read_json(self.cell(method, seed, task))
        return data if data is not None and self.adapter(method, seed, task).is_dir() else None
