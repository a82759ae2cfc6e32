"""Encoding, the training loop and held-out accuracy, with the training job's own pieces.

    encode     rows -> [{"input_ids": [...], "class_index": c}] (the job's ExampleEncoder: the
               prompt template, the text cut to fit max_length)
    train      AdamW, linear warmup then cosine, grad-norm clip 1.0; step k's batch is the job's
               BatchPlan order (a pure function of (seed, k)); loss = mean CE of the label word
               at the last prompt position (the job's Objective, lm_classification)
    accuracy   argmax over the task's label words of the next-token logits, no grad

Peak memory: the process's RSS, sampled every 10 ms by a thread while a block runs (torch
releases the GIL in its kernels); reported as the peak over the RSS at the block's start.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager

import torch

from shira_dist.training.batches import BatchPlan, ExampleEncoder, Objective, collate, label_token_ids
from shira_dist.training.models import HFTokenizer
from shira_dist.training.schema import TaskConfig

from tasks import Task


def task_config(task: Task, max_length: int) -> TaskConfig:
    return TaskConfig(type="lm_classification", prompt_template=task.prompt_template, label_field="label",
                      labels=list(task.labels), label_words=list(task.label_words), max_length=max_length)


def encode(task: Task, rows: list[dict], tokenizer: HFTokenizer, max_length: int) -> list[dict]:
    encoder = ExampleEncoder(task_config(task, max_length), tokenizer)
    out = encoder({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]})
    return [{"input_ids": ids, "class_index": c} for ids, c in zip(out["input_ids"], out["class_index"])]


def objective(task: Task, base_model, tokenizer: HFTokenizer, max_length: int) -> Objective:
    """Built from the plain transformers model, so a wrapper's generic forward(**kwargs) still
    gets position_ids (left padding) and logits_to_keep=1."""
    ids = label_token_ids(task_config(task, max_length), tokenizer)
    return Objective.for_model("lm_classification", base_model, ids)


def batches(examples: list[dict], steps: int, batch_size: int, seed: int, pad_id: int) -> list[dict]:
    """The first ``steps`` training batches of this seed's order (epochs reshuffle)."""
    plan = BatchPlan(len(examples), batch_size, 1, 1, seed)
    plan.check()
    return [collate([examples[i] for i in plan.micro_batches(step, 0)[0]], pad_id, left_pad=True)
            for step in range(steps)]


def label_word_loss(obj: Objective, model, batch: dict) -> torch.Tensor:
    """Summed CE over the label words' logits only (a verbalizer loss): every step goes into
    telling the classes apart, none into making the label words likely in the whole vocabulary."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0), "logits_to_keep": 1}
    logits = model(**inputs).logits[:, -1].float()  # (B, V)
    return torch.nn.functional.cross_entropy(logits[:, obj.label_token_ids], batch["label"], reduction="sum")


def batch_loss(obj: Objective, loss: str):
    """loss_fn(model, batch) -> the batch's mean loss: "vocab" (the job's CE over the whole
    vocabulary) or "label_words" (see label_word_loss). Also scores the data-driven masks."""
    if loss not in ("vocab", "label_words"):
        raise ValueError(f"loss={loss!r} is invalid; allowed: vocab, label_words")

    def loss_fn(model, batch: dict) -> torch.Tensor:
        total = obj(model, batch)[0] if loss == "vocab" else label_word_loss(obj, model, batch)
        return total / batch["label"].numel()
    return loss_fn


def train(model, loss_fn, train_batches: list[dict], lr: float, warmup: int) -> list[float]:
    """Train ``model``'s trainable parameters on the batches in order; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    steps = len(train_batches)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    for batch in train_batches:
        loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    return losses


@torch.no_grad()
def accuracy(model, obj: Objective, examples: list[dict], pad_id: int, batch_size: int = 16) -> float:
    """Held-out accuracy; examples are batched by length (left padding + position ids make each
    row's result independent of its batch up to float rounding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id, left_pad=True)
        _, c = obj(model, batch)
        correct += int(c)
    return correct / len(examples)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measured():
    """Yields a dict filled on exit: seconds (wall), cpu_seconds (this process, all threads),
    peak_rss_mb, peak_delta_rss_mb (over the start). On a shared CPU the wall time grows with
    the others' load; the CPU time much less."""
    result: dict = {}
    start_rss = _rss_bytes()
    peak = [start_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - t0
        result["cpu_seconds"] = time.process_time() - c0
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        result["peak_rss_mb"] = peak[0] / 2**20
        result["peak_delta_rss_mb"] = (peak[0] - start_rss) / 2**20
