"""Local data files -> checked rows -> tokenized Hugging Face datasets, cached on disk (never the network).

    formats   from the file extension (.csv, .json/.jsonl, .parquet, .txt; optionally compressed,
              e.g. .jsonl.gz) unless ``data.format`` says otherwise
    checks    (preflight, before any process group; and after a failed load)
              file   not empty; a csv has a header and at least one row; the columns the task reads
                     (prompt/response template fields, task.label_field; or those of task.format,
                     resolved against the columns when auto: formats.py) exist
              rows   the first SAMPLE_ROWS rows of each file: valid JSON (file and line), every field
                     the templates read present and not null, the label one of task.labels; a
                     chat/alpaca/prompt-completion row well-formed (formats.check_row)
              count  enough training examples for one global batch (counted only that far)
    load      datasets.load_dataset("json"|"csv"|...), then .map(encoder, batched) with a
              fingerprint from the data, the task and the tokenizer, so a second run (or another
              rank) reuses the cached Arrow file

Rows are read with the standard library (csv, json, gzip/bz2/lzma) or pyarrow (parquet), the
way ``datasets`` reads them: a csv's empty cell is a missing value, a .json file is JSON lines
or one JSON array (or an object of columns). Every error is a DataError naming the file, the
line (or row) and the field. A bad row further into a big file is caught when the data is
loaded or tokenized, with its row number.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import io
import json
import lzma
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from .batches import ExampleEncoder, check_row, has_targets, task_fields
from .dist_env import DistEnv, local_main_first
from .errors import DataError
from .formats import resolve_format
from .packing import pack_dataset
from .prepare import prepare_data
from .schema import DataConfig, RunConfig, TaskConfig

EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
SAMPLE_ROWS = 1000
_WHOLE_JSON_LIMIT = 64 << 20  # a .json file read whole (an array or an object of columns) up to this size
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_UNREAD = (".zst", ".lz4")


# ---- formats -----------------------------------------------------------------------------
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


# ---- rows, read and checked ------------------------------------------------------------
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
    fields = task_fields(task, resolve_format(task, columns))
    missing = [f"{name!r} ({reader})" for name, reader in fields.items() if name not in columns]
    if missing:
        raise DataError(f"{path} has no column {', '.join(missing)}; its columns: {list(columns)}")


def iter_rows(path: str, fmt: str, task: TaskConfig, limit: Optional[int] = None) -> Iterator[tuple[str, dict]]:
    """(where, row) for the rows of one file, checked; at most ``limit`` of them."""
    if fmt == "parquet":
        yield from _parquet_rows(path, task, limit)
        return
    rows = {"json": lambda: _json_rows(path), "csv": lambda: _csv_rows(path, task),
            "text": lambda: _text_rows(path, task)}[fmt]()
    example_format = None  # task.format, resolved against the first row's fields
    try:
        for n, (where, row) in enumerate(rows):
            if limit is not None and n >= limit:
                return
            example_format = example_format or resolve_format(task, list(row))
            check_row(row, task, f"{path} {where}", example_format=example_format)
            yield where, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable csv file ({e})") from None
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz/.bz2/.xz
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


# ---- preflight: the files' first rows, enough examples ----------------------------------
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


# ---- datasets -----------------------------------------------------------------------------
def load_examples(files: list[str], fmt: Optional[str], cache_dir: str, limit: Optional[int],
                  task: Optional[TaskConfig] = None):
    """A datasets.Dataset of the raw rows of ``files`` (first ``limit`` rows if set).

    Files datasets cannot read raise a DataError naming the file and line (found by reading
    them row by row when ``task`` is given), not datasets' own traceback."""
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


def _check_dataset_columns(ds, encoder: ExampleEncoder, files: list[str]) -> None:
    fields = task_fields(encoder.task, encoder.example_format(ds.column_names))
    missing = sorted(set(fields) - set(ds.column_names))
    if missing:
        readers = sorted({fields[name] for name in missing})
        raise DataError(f"data {files[0]!r}{' (and others)' if len(files) > 1 else ''} has no column(s) {missing} "
                         f"used by the task ({', '.join(readers)}); its columns: {ds.column_names}")


def tokenize(ds, encoder: ExampleEncoder, files: list[str], split: str):
    """``ds`` mapped through ``encoder``; cached next to the raw data under a stable fingerprint."""
    from datasets.fingerprint import Hasher

    _check_dataset_columns(ds, encoder, files)
    key = Hasher.hash([ds._fingerprint, dataclasses.asdict(encoder.task), encoder.fingerprint, "v3"])
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


@dataclass
class RunData:
    train: object  # datasets.Dataset of encoded examples
    evaluation: Optional[object]  # the same, held out; None: no evaluation
    files: list[str]  # the raw files both came from


def load_data(cfg: RunConfig, encoder: ExampleEncoder, env: DistEnv) -> RunData:
    """The run's training and held-out data, tokenized (a packaged set is written first); local rank 0
    fills the caches first, the others reuse them."""
    d = cfg.data
    with local_main_first(env):
        train_files, eval_files = d.train_files, d.eval_files
        if d.prepare is not None:
            train_file, eval_file = prepare_data(d.prepare, os.path.join(cfg.output_dir, "data"))
            train_files, eval_files = [train_file], [eval_file]
        if not env.is_local_main:
            import datasets

            datasets.disable_progress_bars()
        train = tokenize(load_examples(train_files, d.format, d.cache_dir, d.max_train_examples, cfg.task), encoder,
                         train_files, "train")
        if cfg.task.packing:  # training rows only: evaluation scores one example per row
            examples = len(train)
            train = pack_dataset(train, cfg.task.max_length)
            if env.is_main:
                print(f"[shira_dist] train: task.packing packed {examples} examples into {len(train)} rows of up to "
                      f"task.max_length={cfg.task.max_length} tokens", flush=True)
        evaluation = None
        if eval_files:
            evaluation = tokenize(load_examples(eval_files, d.format, d.cache_dir, d.max_eval_examples, cfg.task),
                                  encoder, eval_files, "eval")
    return RunData(train, evaluation, train_files + eval_files)
