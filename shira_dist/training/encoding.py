"""Examples -> token ids, per task (run by ``datasets.map``, batched).

    causal_lm                input_ids = prompt [+ response] + eos
                             targets   = input_ids, or -100 over the prompt when a response is given
    lm_classification        input_ids = prompt; class_index = the label's position in task.labels
                             (the model's next token after the prompt should be label_words[class_index])
    sequence_classification  input_ids = prompt (with the tokenizer's special tokens); class_index

A prompt longer than ``max_length`` is shortened by cutting the end of its longest field,
so the template's own words (e.g. "Sentiment:") survive; a template that does not fit
``max_length`` by itself is a ConfigError (check_template_fits), and a row without a field
the task reads, or with a label not in task.labels, a DataError naming the row.
"""

from __future__ import annotations

import string
from typing import Optional

from .config import ConfigError
from .data_checks import check_row, task_fields
from .schema import TaskConfig
from .tokenizer import Tokenizer

IGNORE = -100  # target id that takes no loss


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
    """The prompt template alone (every field empty) must leave room for an example in max_length."""
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
        for i, row in enumerate(rows):
            check_row(row, t, f"row {indices[i] + 1 if indices is not None else i + 1}", self.fields)
        out: dict[str, list] = {"input_ids": []}
        if t.type == "causal_lm":
            out["targets"] = []
            for row in rows:
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
