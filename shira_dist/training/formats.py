"""Example formats (``task.format``): how one data row becomes token ids and loss targets (causal_lm).

    format             columns                              rendered as                          loss on
    template           the template fields                  task.prompt_template [+ response]    batches.py
    messages           messages: [{role, content}, ...]     the tokenizer's own chat template    assistant turns*
    sharegpt           conversations: [{from, value}, ...]  as messages (human -> user,          assistant turns*
                                                            gpt -> assistant, system -> system)
    alpaca             instruction, output [, input]        a user -> assistant exchange through the output
                                                            the chat template if the tokenizer
                                                            has one, else the Stanford Alpaca
                                                            prompt, output, eos
    prompt_completion  prompt, completion                   text: prompt, completion, eos;       the completion
                                                            message lists: the chat template
    * task.assistant_only_loss=false: every token

``auto`` (the default) picks from the columns: messages, else conversations (sharegpt), else
instruction + output (alpaca), else prompt + completion, else template rows. A task with its
own prompt_template/response_template, and every classification task, reads template rows.

The loss mask of a rendered conversation. The whole conversation is rendered once and tokenized
once, with character offsets (the ids are exactly ``apply_chat_template``'s). A trained turn k
covers the characters the turn adds after its header:

    text = render(turns)
           |<- render(turns[:k], add_generation_prompt=True) ->|<- turn k's content + end of turn ->|
           |<------------------------- render(turns[:k + 1]) -------------------------------------->|

and a token takes the loss when its characters overlap a trained turn. Where the header render is
not a prefix (a template that adds a default system prompt before the first turn only, when
that turn is the assistant's), the span starts at the turn's content. A template whose turns
render differently inside the whole conversation than as a prefix (e.g. one that drops earlier
reasoning) cannot be masked by prefixes: its ``{% generation %}`` markers are used when present,
otherwise it is a ConfigError. Truncation to task.max_length cuts ids and targets together.
"""

from __future__ import annotations

import hashlib
import re
import typing
from dataclasses import fields
from typing import TYPE_CHECKING, Optional

from .errors import ConfigError, DataError
from .schema import ExampleFormat, TaskConfig

if TYPE_CHECKING:
    from .models import Tokenizer

IGNORE = -100  # target id that takes no loss

FORMATS = typing.get_args(ExampleFormat)
READS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
         "prompt_completion": ("prompt", "completion")}  # the columns each format needs (detection order)
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CHAT_FORMATS = ("messages", "sharegpt")  # always rendered through the chat template

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

_DEFAULT_PROMPT = next(f.default for f in fields(TaskConfig) if f.name == "prompt_template")
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ---- which format ---------------------------------------------------------------------------
def templates_set(task: TaskConfig) -> bool:
    """The task names its own prompt_template or response_template."""
    return task.prompt_template != _DEFAULT_PROMPT or task.response_template is not None


def detect_format(columns) -> str:
    """The format a set of column names holds (template rows when none fits)."""
    present = set(columns)
    for name, needs in READS.items():
        if set(needs) <= present:
            return name
    return "template"


def resolve_format(task: TaskConfig, columns) -> str:
    """task.format, with ``auto`` resolved against ``columns``."""
    if task.type != "causal_lm" or task.format == "template" or (task.format == "auto" and templates_set(task)):
        return "template"
    return detect_format(columns) if task.format == "auto" else task.format


def format_fields(fmt: str) -> dict[str, str]:
    """Field -> what reads it, for a format other than template."""
    return {name: f"task.format={fmt!r}" for name in READS[fmt]}


# ---- rows, checked ------------------------------------------------------------------------------
def check_row(row: dict, fmt: str, task: TaskConfig, where: str) -> None:
    """A row of format ``fmt`` (not template) has every field, well-formed; else a DataError naming it."""
    for name, reader in format_fields(fmt).items():
        if row.get(name) is None:
            raise DataError(f"{where}: field {name!r} (read by {reader}) "
                            f"{'is missing' if name not in row else 'is empty (null)'}")
    if fmt == "messages":
        _check_turns(row["messages"], "messages", "role", "content", CHAT_ROLES, where)
        _check_trains(row["messages"], "messages", "role", "assistant", task, where)
    elif fmt == "sharegpt":
        _check_turns(row["conversations"], "conversations", "from", "value", tuple(SHAREGPT_ROLES), where)
        _check_trains(row["conversations"], "conversations", "from", "gpt", task, where)
    elif fmt == "alpaca":
        for name in ("instruction", "input", "output"):
            if name in READS[fmt] or row.get(name) is not None:
                _check_text(row[name], repr(name), where)
    else:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) != isinstance(completion, list):
            raise DataError(f"{where}: fields 'prompt' and 'completion' must both be text or both be message "
                            f"lists; got a {type(prompt).__name__} and a {type(completion).__name__}")
        if isinstance(prompt, list):
            _check_turns(completion, "completion", "role", "content", CHAT_ROLES, where)
            if prompt:
                _check_turns(prompt, "prompt", "role", "content", CHAT_ROLES, where)
        else:
            _check_text(prompt, "'prompt'", where)
            _check_text(completion, "'completion'", where)


def _check_text(value, name: str, where: str) -> None:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise DataError(f"{where}: field {name} is a {type(value).__name__}; expected text")


def _check_turns(turns, field: str, role_key: str, text_key: str, roles: tuple, where: str) -> None:
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else f"a {type(turns).__name__}"
        raise DataError(f"{where}: field {field!r} is {got}; expected a list of {{{role_key!r}, {text_key!r}}} "
                        "objects")
    for i, turn in enumerate(turns):
        at = f"{where}: field {field!r}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} is a {type(turn).__name__}; expected an object {{{role_key!r}, {text_key!r}}}")
        if turn.get(role_key) is None:
            raise DataError(f"{at} has no {role_key!r}; allowed: {list(roles)}")
        if turn[role_key] not in roles:
            raise DataError(f"{at}[{role_key!r}]={turn[role_key]!r} is not one of {list(roles)}")
        if turn.get(text_key) is None:
            raise DataError(f"{at} has no {text_key!r}")
        if not isinstance(turn[text_key], str):
            raise DataError(f"{at}[{text_key!r}] is a {type(turn[text_key]).__name__}; expected text")


def _check_trains(turns: list, field: str, role_key: str, assistant: str, task: TaskConfig, where: str) -> None:
    if task.assistant_only_loss and not any(t[role_key] == assistant for t in turns):
        raise DataError(f"{where}: field {field!r} has no {assistant!r} turn, and task.assistant_only_loss=true "
                        "takes the loss on assistant turns only")


def _messages(turns: list, role_key: str = "role", text_key: str = "content", roles: Optional[dict] = None) -> list:
    """Plain {role, content} dicts; keys a columnar loader filled with None are dropped (as HF does)."""
    out = []
    for turn in turns:
        message = {k: v for k, v in turn.items() if v is not None and k not in (role_key, text_key)}
        message["role"] = roles[turn[role_key]] if roles else turn[role_key]
        message["content"] = turn[text_key]
        out.append(message)
    return out


# ---- rows -> (input_ids, targets) ------------------------------------------------------------------
class FormatEncoder:
    """Encodes rows of the non-template formats for one task and tokenizer."""

    def __init__(self, task: TaskConfig, tokenizer: Tokenizer) -> None:
        self.task = task
        self.tokenizer = tokenizer
        hf = getattr(tokenizer, "hf", None)  # the transformers tokenizer behind an HFTokenizer
        self.chat = hf if hf is not None and getattr(hf, "chat_template", None) else None
        self.markers = self.chat is not None and bool(_GENERATION_MARKER.search(str(self.chat.chat_template)))
        self.fingerprint = f"{tokenizer.fingerprint}-{self._template_digest()}-formats-v1"

    def _template_digest(self) -> str:
        if self.chat is None:
            return "no-chat-template"
        text = repr(self.chat.chat_template) + repr(sorted(self.chat.special_tokens_map.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def check_tokenizer(self, fmt: str) -> None:
        """ConfigError when ``fmt`` always renders through a chat template and this tokenizer has none."""
        if fmt in CHAT_FORMATS:
            self.require_chat_template(fmt, "renders each conversation")

    def require_chat_template(self, fmt: str, what: str) -> None:
        if self.chat is None:
            whose = ("the built-in byte tokenizer (model.tokenizer: bytes)" if getattr(self.tokenizer, "hf", None)
                     is None else "this tokenizer (no chat_template in its tokenizer_config.json or chat_template.jinja)")
            raise ConfigError(f"task.format={fmt!r} {what} with the tokenizer's own chat template, but {whose} has "
                              "none; use a tokenizer with a chat template, or task.format alpaca, prompt_completion "
                              "(text) or template")
        if not getattr(self.chat, "is_fast", False):
            raise ConfigError(f"task.format={fmt!r} needs a fast (Rust) tokenizer to map the chat's characters to "
                              f"tokens; {type(self.chat).__name__} is not one")

    def encode(self, row: dict, fmt: str, where: str) -> tuple[list[int], list[int]]:
        """(input_ids, targets) of a checked row, both cut to task.max_length."""
        t = self.task
        if fmt in CHAT_FORMATS:
            turns = (_messages(row["messages"]) if fmt == "messages"
                     else _messages(row["conversations"], "from", "value", SHAREGPT_ROLES))
            trained = [m["role"] == "assistant" or not t.assistant_only_loss for m in turns]
            ids, targets = self._chat(turns, trained, where, by_role=t.assistant_only_loss)
        elif fmt == "alpaca":
            instruction, output = str(row["instruction"]), str(row["output"])
            extra = "" if row.get("input") is None else str(row["input"])
            if self.chat is not None:
                self.require_chat_template(fmt, "renders the exchange")
                user = f"{instruction}\n\n{extra}" if extra else instruction
                turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
                ids, targets = self._chat(turns, [False, True], where, by_role=True)
            else:
                prompt = (ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT).format(instruction=instruction, input=extra)
                ids, targets = self._plain(prompt, output)
        elif isinstance(row["prompt"], list):
            self.require_chat_template(fmt, "with message lists renders them")
            prompt, completion = _messages(row["prompt"]), _messages(row["completion"])
            ids, targets = self._chat(prompt + completion, [False] * len(prompt) + [True] * len(completion), where,
                                      by_role=False)
        else:
            ids, targets = self._plain(str(row["prompt"]), str(row["completion"]))
        return ids[: t.max_length], targets[: t.max_length]

    def _plain(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """prompt (with the tokenizer's special tokens) + response + eos; loss on response + eos."""
        tok = self.tokenizer
        head = tok.encode(prompt, add_special_tokens=True)
        tail = tok.encode(response, add_special_tokens=False) + ([tok.eos_id] if tok.eos_id is not None else [])
        return head + tail, [IGNORE] * len(head) + tail

    def _render(self, turns: list, generation: bool = False) -> str:
        return self.chat.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)

    def _chat(self, turns: list, trained: list[bool], where: str, by_role: bool) -> tuple[list[int], list[int]]:
        """Render ``turns`` with the chat template; loss on the turns flagged in ``trained``."""
        try:
            text = self._render(turns)
        except Exception as e:  # noqa: BLE001 - jinja's errors name neither the row nor the field
            raise DataError(f"{where}: the tokenizer's chat template cannot render this conversation "
                            f"({type(e).__name__}: {e})") from None
        if all(trained):
            ids = self.chat(text, add_special_tokens=False)["input_ids"]
            return ids, list(ids)
        if by_role and self.markers:  # the template marks assistant text itself
            out = self.chat.apply_chat_template(turns, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids = list(out["input_ids"])
            return ids, [i if m else IGNORE for i, m in zip(ids, out["assistant_masks"])]
        spans = [self._turn_span(turns, k, text) for k in range(len(turns)) if trained[k]]
        enc = self.chat(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        targets = [i if any(a < end and max(b, a + 1) > start for start, end in spans) else IGNORE
                   for i, (a, b) in zip(ids, enc["offset_mapping"])]
        return ids, targets

    def _turn_span(self, turns: list, k: int, text: str) -> tuple[int, int]:
        """The characters of ``text`` that turn k adds after its header: (start, end)."""
        upto = self._render(turns[: k + 1])
        if not text.startswith(upto):
            raise ConfigError(f"the tokenizer's chat template renders turn {k} of a conversation differently within "
                              "the whole conversation than on its own, so its loss mask cannot be found by rendering "
                              "prefixes; add {% generation %} markers around the assistant text in the template, or "
                              "set task.assistant_only_loss=false")
        before = self._try_render(turns[:k], generation=False)
        floor = len(before) if before is not None and upto.startswith(before) else 0
        header = self._try_render(turns[:k], generation=True)
        if header is not None and floor < len(header) <= len(upto) and upto.startswith(header):
            return len(header), len(upto)
        content = turns[k]["content"]
        found = upto.rfind(content, floor) if content else -1
        return (found if found >= 0 else floor), len(upto)

    def _try_render(self, turns: list, generation: bool) -> Optional[str]:
        """A prefix's render, or None where the template cannot render it (e.g. an empty conversation)."""
        try:
            return self._render(turns, generation)
        except Exception:  # noqa: BLE001 - a template may refuse a prefix; the span search falls back
            return None
