"""From an example row to a loss: the fields a task reads, token ids, batches, the objective.

Encoding (run by ``datasets.map``, batched), per task:

    causal_lm                template rows (task.format template, or auto finding no other format):
                             input_ids = prompt [+ response] + eos
                             targets   = input_ids, or -100 over the prompt when a response is given
                             messages, sharegpt, alpaca, prompt_completion: formats.py
    lm_classification        input_ids = prompt; class_index = the label's position in task.labels
                             (the model's next token after the prompt should be label_words[class_index])
    sequence_classification  input_ids = prompt (with the tokenizer's special tokens); class_index

A prompt longer than ``max_length`` is shortened by cutting the end of its longest field,
so the template's own words (e.g. "Sentiment:") survive; a template that does not fit
``max_length`` by itself is a ConfigError (check_template_fits), and a row without a field
the task reads, or with a label not in task.labels, a DataError naming the row.

Which examples each optimizer step uses, on each rank: the data position is the step number.
Step k of a run uses global batch k of a fixed order, a pure function of (seed, k), so
resuming at step k needs nothing else.

    epoch e = k // steps_per_epoch     order_e = randperm(N, seed + e)
    global batch k  = order_e[i*G : (i+1)*G]      i = k % steps_per_epoch, G = micro*accum*world
    rank r's share  = global batch[r*micro*accum : (r+1)*micro*accum], split into accum micro-batches

Which rank takes which example does not change the update: losses are summed (the objective)
and divided by the global batch's target count (see loop.py), so a 2-process run matches a
1-process run with twice the accumulation, up to float summation order.

The objective, per task: a summed loss, its target count, correct answers.

    causal_lm                logits (B, T, V): sum CE(logits[:, t], targets[:, t+1]) over non-ignored
    lm_classification        logits at the last prompt position (B, V) (left padding, so it is
                             position T-1 for every row): CE against the label word's token;
                             prediction = argmax over the label words' logits only
    sequence_classification  logits (B, C): CE against the class; prediction = argmax
"""

from __future__ import annotations

import inspect
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DataError
from .formats import IGNORE, FormatEncoder, format_fields, resolve_format
from .formats import check_row as check_format_row
from .schema import TaskConfig

if TYPE_CHECKING:
    from .models import Tokenizer


# ---- the fields a task reads -----------------------------------------------------------
def task_fields(task: TaskConfig, example_format: str = "template") -> dict[str, str]:
    """Field -> what reads it (template fields, and the label field of a classification task; or the
    fields of another task.format)."""
    if example_format != "template":
        return format_fields(example_format)
    out = {}
    for key, template in (("task.prompt_template", task.prompt_template),
                          ("task.response_template", task.response_template)):
        for _, name, _, _ in string.Formatter().parse(template or ""):
            if name:
                out.setdefault(name, key)
    if task.type != "causal_lm":
        out[task.label_field] = "task.label_field"
    return out


def check_row(row: dict, task: TaskConfig, where: str, fields: Optional[dict[str, str]] = None,
              example_format: str = "template") -> None:
    """One example: every field the task reads (``fields``: task_fields(task)) has a value, and a
    label is one of task.labels (another ``example_format``: formats.check_row)."""
    if example_format != "template":
        check_format_row(row, example_format, task, where)
        return
    for name, reader in (fields if fields is not None else task_fields(task)).items():
        if row.get(name) is None:
            state = "is missing" if name not in row else "is empty (null)"
            raise DataError(f"{where}: field {name!r} (read by {reader}) {state}")
    if task.type != "causal_lm":
        value = row[task.label_field]
        if str(value) not in [str(v) for v in task.labels]:
            raise DataError(f"{where}: {task.label_field}={value!r} is not one of task.labels={task.labels}")


# ---- token ids ----------------------------------------------------------------------
def label_token_ids(task: TaskConfig, tokenizer: Tokenizer) -> Optional[list[int]]:
    """lm_classification: the single token id of each label word; else None."""
    if task.type != "lm_classification":
        return None
    ids = []
    for i, word in enumerate(task.label_words):
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens) != 1:
            raise ConfigError(f"task.label_words[{i}]={word!r} is {len(tokens)} tokens {tokens} for this tokenizer; "
                             "each label word must be exactly one token (try a leading space, e.g. ' positive')")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"task.label_words={task.label_words!r} map to repeated token ids {ids}; use distinct words")
    return ids


def check_template_fits(task: TaskConfig, tokenizer: Tokenizer) -> None:
    """The prompt template alone (every field empty) must leave room for an example in max_length;
    a chat task.format needs a tokenizer with a chat template."""
    FormatEncoder(task, tokenizer).check_tokenizer(task.format)
    if task.format not in ("auto", "template"):
        return
    empty = {name: "" for name in task_fields(task)}
    n = len(tokenizer.encode(task.prompt_template.format(**empty), add_special_tokens=True))
    if n >= task.max_length:
        raise ConfigError(f"task.prompt_template={task.prompt_template!r} is {n} tokens before any example text, "
                          f"but task.max_length={task.max_length}: no example fits; raise task.max_length or "
                          "shorten the template")


class ExampleEncoder:
    """A batched ``datasets.map`` function (``with_indices=True``) for one task and tokenizer."""

    def __init__(self, task: TaskConfig, tokenizer: Tokenizer) -> None:
        check_template_fits(task, tokenizer)
        self.task = task
        self.tokenizer = tokenizer
        self.label_index = {str(v): i for i, v in enumerate(task.labels or [])}
        self.prompt_fields = sorted({f for _, f, _, _ in string.Formatter().parse(task.prompt_template) if f})
        self.fields = task_fields(task)
        self.formats = FormatEncoder(task, tokenizer)
        self.fingerprint = self.formats.fingerprint  # the tokenizer and its chat template (keys data caches)

    def example_format(self, columns) -> str:
        """task.format for rows with these columns (auto resolved); a ConfigError when the tokenizer cannot
        render it."""
        fmt = resolve_format(self.task, columns)
        self.formats.check_tokenizer(fmt)
        return fmt

    def _fit_prompt(self, row: dict) -> list[int]:
        t, tok = self.task, self.tokenizer
        row = {k: "" if v is None else str(v) for k, v in row.items()}
        ids = tok.encode(t.prompt_template.format(**row), add_special_tokens=True)
        for attempt in range(64):
            if len(ids) <= t.max_length:
                return ids
            longest = max(self.prompt_fields, key=lambda k: len(row[k]))
            text = row[longest]
            if not text:
                break  # only the template is left (check_template_fits makes that fit)
            chars_per_token = max(1.0, len(text) / max(1, len(tok.encode(text, add_special_tokens=False))))
            cut = int((len(ids) - t.max_length + 2) * chars_per_token) + 1 if attempt < 48 else len(text)
            row[longest] = text[: max(0, len(text) - cut)]
            ids = tok.encode(t.prompt_template.format(**row), add_special_tokens=True)
        return ids[-t.max_length:] if t.type == "lm_classification" else ids[: t.max_length]

    def _label(self, value) -> int:
        return self.label_index[str(value)]  # checked by check_row

    def __call__(self, batch: dict[str, list], indices: Optional[list[int]] = None) -> dict[str, list]:
        t, tok = self.task, self.tokenizer
        n = len(next(iter(batch.values())))
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        fmt = self.example_format(list(batch))
        wheres = [f"row {indices[i] + 1 if indices is not None else i + 1}" for i in range(n)]
        for row, where in zip(rows, wheres):
            check_row(row, t, where, self.fields, example_format=fmt)
        out: dict[str, list] = {"input_ids": []}
        if t.type == "causal_lm":
            out["targets"] = []
            for row, where in zip(rows, wheres):
                if fmt != "template":
                    ids, targets = self.formats.encode(row, fmt, where)
                    out["input_ids"].append(ids)
                    out["targets"].append(targets)
                    continue
                clean = {k: "" if v is None else str(v) for k, v in row.items()}
                prompt = tok.encode(t.prompt_template.format(**clean), add_special_tokens=True)
                eos = [tok.eos_id] if tok.eos_id is not None else []
                if t.response_template is None:
                    ids = (prompt + eos)[: t.max_length]
                    targets = list(ids)
                else:
                    response = tok.encode(t.response_template.format(**clean), add_special_tokens=False) + eos
                    ids = (prompt + response)[: t.max_length]
                    targets = ([IGNORE] * len(prompt) + response)[: t.max_length]
                out["input_ids"].append(ids)
                out["targets"].append(targets)
            return out
        out["class_index"] = []  # not "label": datasets would keep a same-named input column's type
        for row in rows:
            out["input_ids"].append(self._fit_prompt(row))
            out["class_index"].append(self._label(row[t.label_field]))
        return out


def has_targets(example: dict) -> bool:
    """causal_lm: at least one token after the first takes loss (the first is never predicted)."""
    return any(x != IGNORE for x in example["targets"][1:])


# ---- batches --------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    micro_batch_size: int
    accumulation: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def check(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set has {self.num_examples} examples, fewer than one global batch of "
                             f"{self.global_batch} (micro_batch_size {self.micro_batch_size} x accumulation "
                             f"{self.accumulation} x world size {self.world_size}); lower the batch or add data")

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of this rank's micro-batches for optimizer step ``step`` (0-based)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        batch = order[i * self.global_batch:(i + 1) * self.global_batch]
        per_rank = self.micro_batch_size * self.accumulation
        mine = batch[rank * per_rank:(rank + 1) * per_rank].tolist()
        return [mine[j:j + self.micro_batch_size] for j in range(0, per_rank, self.micro_batch_size)]


def collate(examples: list[dict], pad_id: int, left_pad: bool) -> dict[str, Tensor]:
    """Pad to the longest example. Returns input_ids/attention_mask (B, T) and either
    targets (B, T) (causal LM, IGNORE on padding) or label (B,) (from class_index); packed rows
    (packing.py) also position_ids (B, T), the padding numbered from 0 as a segment of its own."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids, mask, targets, positions = [], [], [], []
    for e in examples:
        n = len(e["input_ids"])
        pad = longest - n
        ids.append([pad_id] * pad + e["input_ids"] if left_pad else e["input_ids"] + [pad_id] * pad)
        mask.append([0] * pad + [1] * n if left_pad else [1] * n + [0] * pad)
        if "targets" in e:
            targets.append(e["targets"] + [IGNORE] * pad)
        if "position_ids" in e:
            positions.append(list(e["position_ids"]) + list(range(pad)))
    out = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
    if positions:
        out["position_ids"] = torch.tensor(positions, dtype=torch.long)
    if targets:
        out["targets"] = torch.tensor(targets, dtype=torch.long)
    else:
        out["label"] = torch.tensor([e["class_index"] for e in examples], dtype=torch.long)
    return out


# ---- the objective ---------------------------------------------------------------------
@dataclass
class Objective:
    task_type: str
    label_token_ids: Optional[Tensor]  # (C,) lm_classification only
    pass_position_ids: bool  # the model's forward takes position_ids (left padding needs them)
    pass_logits_to_keep: bool  # the model's forward takes logits_to_keep (skip unused logits)
    pass_use_cache: bool = False  # the model's forward takes use_cache (passed False: no KV cache in training)

    @classmethod
    def for_model(cls, task_type: str, model: nn.Module, label_token_ids: Optional[list[int]]) -> "Objective":
        params = inspect.signature(model.forward).parameters
        ids = None if label_token_ids is None else torch.tensor(label_token_ids, dtype=torch.long)
        return cls(task_type, ids, "position_ids" in params, "logits_to_keep" in params, "use_cache" in params)

    @property
    def left_pad(self) -> bool:
        return self.task_type == "lm_classification"

    def num_targets(self, batch: dict[str, Tensor]) -> int:
        if self.task_type == "causal_lm":
            return int((batch["targets"][:, 1:] != IGNORE).sum())
        return int(batch["label"].numel())

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(summed loss (scalar fp32), number of correct predictions (scalar) or None)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.pass_use_cache:  # a decoder builds no KV cache (and checkpointed layers need none)
            inputs["use_cache"] = False
        if self.task_type == "causal_lm":
            if "position_ids" in batch:  # packed rows (packing.py): no attention_mask, so transformers
                # builds the block-diagonal mask from the position restarts (and only without a cache)
                if not self.pass_position_ids:
                    raise ConfigError("task.packing=true needs a model whose forward takes position_ids; "
                                      "this one's does not: set task.packing=false")
                del inputs["attention_mask"]
                inputs["position_ids"] = batch["position_ids"]
            logits = model(**inputs).logits  # (B, T, V)
            targets = batch["targets"][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
            return loss, None
        if self.task_type == "lm_classification":
            if self.pass_position_ids:
                inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            if self.pass_logits_to_keep:
                inputs["logits_to_keep"] = 1
            logits = model(**inputs).logits[:, -1].float()  # (B, V)
            label_ids = self.label_token_ids.to(logits.device)
            loss = F.cross_entropy(logits, label_ids[batch["label"]], reduction="sum")
            correct = (logits[:, label_ids].argmax(-1) == batch["label"]).sum()
            return loss, correct
        logits = model(**inputs).logits.float()  # (B, C)
        loss = F.cross_entropy(logits, batch["label"], reduction="sum")
        return loss, (logits.argmax(-1) == batch["label"]).sum()
