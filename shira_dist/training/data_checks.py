"""The data files' content, checked before any process group (preflight) and after a failed load.

    file   not empty; a csv has a header and at least one row; the columns the task reads
           (prompt/response template fields, task.label_field) exist
    rows   the first SAMPLE_ROWS rows of each file: valid JSON (file and line), every field
           the templates read present and not null, the label one of task.labels
    count  enough training examples for one global batch (counted only that far)

Rows are read with the standard library (csv, json, gzip/bz2/lzma) or pyarrow (parquet), the
way ``datasets`` reads them: a csv's empty cell is a missing value, a .json file is JSON lines
or one JSON array (or an object of columns). Every error is a DataError naming the file, the
line (or row) and the field. A bad row further into a big file is caught when the data is
loaded or tokenized (data.py), with its row number.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
import string
from typing import Iterator, Optional

from .errors import DataError
from .schema import RunConfig, TaskConfig

SAMPLE_ROWS = 1000
_WHOLE_JSON_LIMIT = 64 << 20  # a .json file read whole (an array or an object of columns) up to this size
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_UNREAD = (".zst", ".lz4")


def task_fields(task: TaskConfig) -> dict[str, str]:
    """Field -> what reads it (template fields, and the label field of a classification task)."""
    out = {}
    for key, template in (("task.prompt_template", task.prompt_template),
                          ("task.response_template", task.response_template)):
        for _, name, _, _ in string.Formatter().parse(template or ""):
            if name:
                out.setdefault(name, key)
    if task.type != "causal_lm":
        out[task.label_field] = "task.label_field"
    return out


def check_row(row: dict, task: TaskConfig, where: str, fields: Optional[dict[str, str]] = None) -> None:
    """One example: every field the task reads (``fields``: task_fields(task)) has a value, and a
    label is one of task.labels."""
    for name, reader in (fields if fields is not None else task_fields(task)).items():
        if row.get(name) is None:
            state = "is missing" if name not in row else "is empty (null)"
            raise DataError(f"{where}: field {name!r} (read by {reader}) {state}")
    if task.type != "causal_lm":
        value = row[task.label_field]
        if str(value) not in [str(v) for v in task.labels]:
            raise DataError(f"{where}: {task.label_field}={value!r} is not one of task.labels={task.labels}")


def _open_text(path: str) -> io.TextIOBase:
    opener = _OPENERS.get(os.path.splitext(path)[1].lower())
    if opener is not None:
        return opener(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _json_rows(path: str) -> Iterator[tuple[str, dict]]:
    with _open_text(path) as f:
        first = ""
        while not first.strip():  # the first non-blank line
            first = f.readline()
            if not first:
                return
        if first.lstrip().startswith(("[", "{")) and not isinstance(_parse(first), dict):
            yield from _whole_json_rows(path, f)  # an array, or one object over several lines
            return
        f.seek(0)
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: a JSON {type(row).__name__}, where JSON lines need one "
                                "object ({\"field\": value, ...}) per line")
            yield f"line {number}", row


def _parse(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _whole_json_rows(path: str, f: io.TextIOBase) -> Iterator[tuple[str, dict]]:
    """A .json file that is one array of objects or one object of columns (not JSON lines)."""
    if os.path.getsize(path) > _WHOLE_JSON_LIMIT:
        return  # too big to read here; datasets reads it (and reports a malformed file) at load time
    f.seek(0)
    text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        n = max(len(v) for v in data.values())
        data = [{k: v[i] if i < len(v) else None for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        raise DataError(f"{path}: one JSON {type(data).__name__}; expected JSON lines (one object per line), "
                        "an array of objects, or an object of equally long columns")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} item {i + 1}: a JSON {type(row).__name__}, where an object is expected")
        yield f"item {i + 1}", row


def _csv_rows(path: str, task: TaskConfig) -> Iterator[tuple[str, dict]]:
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty: no header, no rows")
        _check_columns(path, header, task)
        for values in reader:
            where = f"line {reader.line_num}"
            if not values:
                continue
            if len(values) > len(header):
                raise DataError(f"{path} {where}: {len(values)} fields, but the header has {len(header)} {header}")
            row = {k: (v if v != "" else None) for k, v in zip(header, values)}
            yield where, {**{k: None for k in header[len(values):]}, **row}


def _text_rows(path: str, task: TaskConfig) -> Iterator[tuple[str, dict]]:
    _check_columns(path, ["text"], task)
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            yield f"line {number}", {"text": line.rstrip("\r\n")}


def _parquet_rows(path: str, task: TaskConfig, limit: Optional[int]) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors name neither the file nor the field
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    _check_columns(path, table.schema_arrow.names, task)
    seen = 0
    for batch in table.iter_batches(batch_size=min(limit or 4096, 4096)):
        for row in batch.to_pylist():
            seen += 1
            yield f"row {seen}", row
            if limit is not None and seen >= limit:
                return


def _check_columns(path: str, columns: list[str], task: TaskConfig) -> None:
    missing = [f"{name!r} ({reader})" for name, reader in task_fields(task).items() if name not in columns]
    if missing:
        raise DataError(f"{path} has no column {', '.join(missing)}; its columns: {list(columns)}")


def iter_rows(path: str, fmt: str, task: TaskConfig, limit: Optional[int] = None) -> Iterator[tuple[str, dict]]:
    """(where, row) for the rows of one file, checked; at most ``limit`` of them."""
    if fmt == "parquet":
        yield from _parquet_rows(path, task, limit)
        return
    rows = {"json": lambda: _json_rows(path), "csv": lambda: _csv_rows(path, task),
            "text": lambda: _text_rows(path, task)}[fmt]()
    try:
        for n, (where, row) in enumerate(rows):
            if limit is not None and n >= limit:
                return
            check_row(row, task, f"{path} {where}")
            yield where, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable csv file ({e})") from None
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz/.bz2/.xz
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def check_file(path: str, fmt: str, task: TaskConfig, key: str, limit: Optional[int] = SAMPLE_ROWS,
               enough: int = 1) -> int:
    """Check ``path`` (its first ``limit`` rows); count its rows up to ``enough``; returns that count."""
    if os.path.getsize(path) == 0:
        raise DataError(f"{key}: {path} is empty (0 bytes)")
    if path.lower().endswith(_UNREAD):
        return enough  # a compression the standard library cannot read: datasets reports problems at load
    count = 0
    for _ in iter_rows(path, fmt, task, limit=None if limit is None else max(limit, enough)):
        count += 1
        if limit is not None and count >= max(limit, enough):
            break
    if count == 0:
        raise DataError(f"{key}: {path} {'has a header but no rows' if fmt == 'csv' else 'has no rows'}")
    return count


def check_data_content(cfg: RunConfig, world_size: int) -> None:
    """Preflight: every data file's first rows, and enough training examples for one global batch."""
    from .data import infer_format

    d, tr = cfg.data, cfg.training
    if d.prepare is not None:
        return  # packaged data sets, written by the job itself
    need = tr.micro_batch_size * tr.gradient_accumulation_steps * world_size
    for key in ("train_files", "eval_files"):
        files = getattr(d, key)
        if not files:
            continue
        fmt = infer_format(files, d.format)
        total = 0
        for path in files:
            total += check_file(path, fmt, cfg.task, f"data.{key}", enough=need if key == "train_files" else 1)
        if key == "train_files":
            usable = total if d.max_train_examples is None else min(total, d.max_train_examples)
            if usable < need:
                capped = f" (data.max_train_examples={d.max_train_examples})" if usable < total else ""
                raise DataError(f"data.train_files {files} hold {usable} examples{capped}, fewer than one global "
                                f"batch of {need} (training.micro_batch_size {tr.micro_batch_size} x "
                                f"gradient_accumulation_steps {tr.gradient_accumulation_steps} x {world_size} "
                                "processes); lower the batch or add data")


def find_bad_row(files: list[str], fmt: str, task: TaskConfig) -> Optional[DataError]:
    """The first problem in ``files``, reading them whole (after ``datasets`` failed to load them)."""
    for path in files:
        if path.lower().endswith(_UNREAD):
            continue
        try:
            if os.path.getsize(path) == 0:
                return DataError(f"{path} is empty (0 bytes)")
            for _ in iter_rows(path, fmt, task):
                pass
        except DataError as e:
            return e
    return None
