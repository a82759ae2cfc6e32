"""Local data files -> tokenized Hugging Face datasets, cached on disk (never the network).

    load_examples(files, format, cache_dir)      datasets.load_dataset("json"|"csv"|...)
    tokenize(examples, encoder, cache_dir)       .map(encoder, batched) with a fingerprint
                                                 from the data, the task and the tokenizer,
                                                 so a second run (or another rank) reuses
                                                 the cached Arrow file

Formats come from the file extension (.csv, .json/.jsonl, .parquet, .txt; optionally
compressed, e.g. .jsonl.gz) unless ``data.format`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import string
from typing import Optional

from .data_checks import find_bad_row
from .encoding import ExampleEncoder, has_targets
from .errors import DataError
from .schema import DataConfig, TaskConfig

EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def infer_format(files: list[str], declared: Optional[str]) -> str:
    if declared is not None:
        return declared
    found = set()
    for path in files:
        stem = path
        for ext in _COMPRESSION:
            if stem.endswith(ext):
                stem = stem[: -len(ext)]
        fmt = EXTENSIONS.get(os.path.splitext(stem)[1].lower())
        if fmt is None:
            raise ValueError(f"data file {path!r}: cannot tell its format from the extension; known extensions: "
                             f"{sorted(EXTENSIONS)} (or set data.format to one of csv, json, parquet, text)")
        found.add(fmt)
    if len(found) > 1:
        raise ValueError(f"data files mix formats {sorted(found)}; use one format per split (or set data.format)")
    return found.pop()


def check_data_files(data: DataConfig) -> None:
    """Fail fast: every listed file exists and has a known format."""
    for key in ("train_files", "eval_files"):
        files = getattr(data, key)
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data.{key}: {path!r} does not exist")
        if files:
            infer_format(files, data.format)


def load_examples(files: list[str], fmt: Optional[str], cache_dir: str, limit: Optional[int],
                  task: Optional[TaskConfig] = None):
    """A datasets.Dataset of the raw rows of ``files`` (first ``limit`` rows if set).

    Files datasets cannot read raise a DataError naming the file and line (found by reading
    them through data_checks when ``task`` is given), not datasets' own traceback."""
    import datasets

    fmt = infer_format(files, fmt)
    try:
        ds = datasets.load_dataset(fmt, data_files=list(files), split="train", cache_dir=cache_dir)
    except datasets.exceptions.DatasetsError as e:
        found = find_bad_row(files, fmt, task) if task is not None else None
        if found is not None:
            raise found from None
        cause = e.__cause__ or e
        raise DataError(f"data {files} cannot be read as {fmt}: {type(cause).__name__}: "
                        f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}") from None
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds


def _check_columns(ds, task: TaskConfig, files: list[str]) -> None:
    wanted = {f for _, f, _, _ in string.Formatter().parse(task.prompt_template) if f}
    if task.response_template:
        wanted |= {f for _, f, _, _ in string.Formatter().parse(task.response_template) if f}
    if task.type != "causal_lm":
        wanted.add(task.label_field)
    missing = sorted(wanted - set(ds.column_names))
    if missing:
        raise DataError(f"data {files[0]!r}{' (and others)' if len(files) > 1 else ''} has no column(s) {missing} "
                         f"used by the task (prompt_template/response_template/label_field); "
                         f"its columns: {ds.column_names}")


def tokenize(ds, encoder: ExampleEncoder, files: list[str], split: str):
    """``ds`` mapped through ``encoder``; cached next to the raw data under a stable fingerprint."""
    from datasets.fingerprint import Hasher

    _check_columns(ds, encoder.task, files)
    key = Hasher.hash([ds._fingerprint, dataclasses.asdict(encoder.task), encoder.tokenizer.fingerprint, "v3"])
    try:
        out = ds.map(encoder, batched=True, batch_size=256, with_indices=True, remove_columns=ds.column_names,
                     new_fingerprint=key, desc=f"tokenizing {split}")
    except DataError as e:  # the encoder names the row; add the files
        source = files[0] if len(files) == 1 else f"{files} (rows counted across the files in order)"
        raise DataError(f"{split} data {source} {e}") from None
    if encoder.task.type == "causal_lm":
        before = len(out)
        out = out.filter(has_targets, new_fingerprint=Hasher.hash([key, "has_targets"]))
        if len(out) < before:
            print(f"[shira_dist] {split}: dropped {before - len(out)} examples with nothing to predict "
                  f"after truncation to task.max_length={encoder.task.max_length}", flush=True)
    if len(out) == 0:
        raise DataError(f"{split} data {files} has no usable examples")
    return out
