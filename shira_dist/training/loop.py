"""The training loop: accumulate, clip, step, schedule; log, evaluate and checkpoint on cadence.

One optimizer step k, on every rank:

    micro-batches = plan.micro_batches(k, rank)                  (batches.py)
    N = all-reduce(sum of target counts)                          whole global batch
    for each micro-batch (gradient sync only on the last):
        loss_sum, correct = objective(model, batch)               summed, not averaged
        backward(loss_sum * world_size / N)                       DDP averages over ranks,
                                                                  so grads = d(sum loss)/dθ / N
    loss = all-reduce(loss sums) / N; norm = global gradient norm (clip to max_grad_norm)
    loss and norm finite (an all-reduced verdict)?  optimizer step : no update (non-finite guard)
    scheduler step; zero grads

A non-finite step stops the run (RunFailed) unless training.max_nonfinite_steps allows
skipping it. Everything a resume needs is in LoopState (including the open log window, so
logged averages do not depend on where a run was resumed) + optimizer/scheduler/RNG
(checkpointing.py); the data position is the step number.

Learning rate: linear warmup, then cosine or linear decay (or constant):

    factor(s) = (s + 1) / warmup                                   s < warmup
              = min + (1 - min) * 0.5 * (1 + cos(pi * p))          cosine   } p = (s - warmup) / (total - warmup)
              = min + (1 - min) * (1 - p)                          linear   }
              = 1                                                  constant

``s`` is the 0-based index of the optimizer step about to run (LambdaLR's last_epoch),
so the first step already has a non-zero rate.

Held-out evaluation: examples are ordered by length (so batches carry little padding) and
rank r scores examples r, r+W, r+2W, ... of that order; sums are all-reduced, so the numbers
equal a single-process evaluation (up to float summation order). Every rank runs the same
number of forward passes (a rank that runs out repeats an example with weight 0), which
sharded strategies need: their forward is a collective.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Optional

import torch

from .batches import BatchPlan, Objective, collate
from .dist_env import DistEnv
from .errors import RunFailed
from .report import Progress, eval_line
from .schema import RunConfig
from .strategies import TrainingStrategy


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done (a skipped non-finite step counts: its batch is used up)
    tokens: int = 0  # input tokens trained on (all ranks)
    train_seconds: float = 0.0  # wall time inside the loop, over all resumes
    losses: list[Optional[float]] = field(default_factory=list)  # per-step global mean loss (None: skipped)
    log: list[dict] = field(default_factory=list)  # the logged points
    evals: list[dict] = field(default_factory=list)  # {"step": k, **metrics}
    eval_before: Optional[dict] = None
    # The open log window: sums since the last log point (loss, targets, correct, tokens, grad
    # norm) over its `window_steps` finite steps, which took `window_seconds` of training time.
    window: list[float] = field(default_factory=lambda: [0.0] * 5)
    window_steps: int = 0
    window_seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)  # non-finite steps: {"step", "loss", "grad_norm"}
    nonfinite_streak: int = 0  # non-finite steps in a row, up to `step`
    # One per process run: strategy, world size, precision, global batch, start_step, end_step (kept
    # at `step` by the loop).
    segments: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LoopState":
        return cls(**data)


@dataclass(kw_only=True)
class LoopContext:
    """What the loop works with; nothing here changes while it runs."""

    cfg: RunConfig
    env: DistEnv
    device: torch.device
    strategy: TrainingStrategy
    scheduler: torch.optim.lr_scheduler.LambdaLR
    objective: Objective
    plan: BatchPlan
    train_data: object  # datasets.Dataset of encoded examples
    eval_data: Optional[object]  # the same, held out; None: no evaluation
    pad_id: int
    autocast: Callable[[], ContextManager]
    tracker: object  # report.NullTracker / WandbTracker
    save_checkpoint: Callable[[LoopState], str]  # collective; returns the directory


# ---- the learning-rate schedule -------------------------------------------------------------------
@dataclass
class LrFactor:
    kind: str  # cosine | linear | constant
    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * p)) if self.kind == "cosine" else 1.0 - p
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrFactor(kind, warmup_steps, total_steps, min_ratio))


# ---- held-out evaluation --------------------------------------------------------------------------------
def evaluate(ctx: LoopContext) -> Optional[dict]:
    """Loss (and accuracy for classification, perplexity for causal LM) on the held-out set; None without one."""
    dataset = ctx.eval_data
    if dataset is None:
        return None
    batch_size = ctx.cfg.training.eval_batch_size or 2 * ctx.cfg.training.micro_batch_size
    model, objective, world_size = ctx.strategy.model, ctx.objective, ctx.env.world_size
    was_training = model.training
    model.eval()
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
    mine = order[ctx.env.rank::world_size]
    per_rank = math.ceil(len(dataset) / world_size)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, targets, correct
    try:
        with torch.no_grad():
            for start in range(0, per_rank, batch_size):
                idx = mine[start:start + batch_size]
                weight = 1.0 if idx else 0.0
                batch = collate([dataset[i] for i in (idx or [0])], ctx.pad_id, objective.left_pad)
                n = objective.num_targets(batch)
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                with ctx.autocast():
                    loss, correct = objective(model, batch)
                totals += weight * torch.tensor([float(loss), n, float(correct) if correct is not None else 0.0],
                                                dtype=torch.float64)
    finally:
        model.train(was_training)
    totals = ctx.strategy.all_reduce_sum(totals)
    loss_sum, n, correct = totals.tolist()
    out = {"loss": loss_sum / max(n, 1.0), "examples": len(dataset)}
    if objective.task_type == "causal_lm":
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        out["tokens"] = int(n)
    else:
        out["accuracy"] = correct / max(n, 1.0)
    return out


def evaluate_and_track(ctx: LoopContext, step: int) -> Optional[dict]:
    """:func:`evaluate`, its numbers sent to the tracker at ``step``."""
    metrics = evaluate(ctx)
    if metrics is not None:
        ctx.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    return metrics


# ---- one step ----------------------------------------------------------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _guarded_step(ctx: LoopContext, loss_finite: bool) -> tuple[float, bool]:
    """Clip and step unless the loss or the gradient norm is not finite: (norm, stepped).

    Both are reduced over ranks (the loss by the all-reduce before, the norm from all-reduced
    gradients or DTensor shards), and the verdict is all-reduced too, so every rank decides alike.
    An engine that steps inside itself (DeepSpeed) is stepped only on a finite loss; its norm is
    known afterwards (it skips an update on an invalid norm itself under ZeRO's fp32 checks)."""
    strategy, max_norm = ctx.strategy, ctx.cfg.training.max_grad_norm
    if strategy.steps_in_engine:
        if not loss_finite:
            return float("nan"), False
        norm = strategy.clip_and_step(max_norm)
        if norm is None:  # the engine measured no norm (ZeRO-0, compute_grad_norm: false)
            return float("nan"), True
        return norm, math.isfinite(norm)
    norm = strategy.clip_grad_norm(max_norm)
    bad = torch.tensor([0.0 if loss_finite and math.isfinite(norm) else 1.0], dtype=torch.float64)
    stepped = float(strategy.all_reduce_sum(bad)[0]) == 0.0
    if stepped:
        strategy.optimizer_step()
    return norm, stepped


def train_step(ctx: LoopContext, step: int) -> tuple[torch.Tensor, bool]:
    """One optimizer step: ((loss sum, targets, correct, tokens) summed over ranks + grad norm, stepped)."""
    micro = [collate([ctx.train_data[i] for i in ids], ctx.pad_id, ctx.objective.left_pad)
             for ids in ctx.plan.micro_batches(step, ctx.env.rank)]
    n_local = sum(ctx.objective.num_targets(b) for b in micro)
    n_global = float(ctx.strategy.all_reduce_sum(torch.tensor([float(n_local)], dtype=torch.float64))[0])
    scale = ctx.env.world_size / max(n_global, 1.0)
    stats = torch.zeros(4, dtype=torch.float64)
    for j, batch in enumerate(micro):
        tokens = int(batch["attention_mask"].sum())
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        sync = ctx.strategy.no_sync() if j < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            with ctx.autocast():
                loss_sum, correct = ctx.objective(ctx.strategy.model, batch)
            ctx.strategy.backward(loss_sum * scale)
        stats += torch.tensor([float(loss_sum.detach()), 0.0, float(correct) if correct is not None else 0.0,
                               tokens], dtype=torch.float64)
    stats[1] = n_local
    out = ctx.strategy.all_reduce_sum(stats)  # the whole global batch, the same on every rank
    norm, stepped = _guarded_step(ctx, math.isfinite(float(out[0])))
    with warnings.catch_warnings():  # a skipped first step: "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore", UserWarning)
        ctx.scheduler.step()
    ctx.strategy.zero_grad()
    return torch.cat([out, torch.tensor([norm], dtype=torch.float64)]), stepped


def _nonfinite(ctx: LoopContext, state: LoopState, loss: float, norm: float, progress: Progress) -> None:
    """Record a step that took no update; raise RunFailed when it may not be skipped."""
    tr = ctx.cfg.training
    state.nonfinite_streak += 1
    state.losses.append(None)
    state.skipped.append({"step": state.step, "loss": str(loss), "grad_norm": str(norm)})
    what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {state.step} " \
           f"(loss {loss}, gradient norm {norm})"
    if ctx.strategy.steps_in_engine:
        raise RunFailed(f"{what}: the run diverged and stops (DeepSpeed steps inside its engine, so such a step "
                        f"cannot be skipped); lower training.learning_rate (now {tr.learning_rate:g})")
    if state.nonfinite_streak > tr.max_nonfinite_steps:
        allowed = "stops at the first one (training.max_nonfinite_steps=0)" if tr.max_nonfinite_steps == 0 else \
            f"had {state.nonfinite_streak} such steps in a row, more than training.max_nonfinite_steps=" \
            f"{tr.max_nonfinite_steps}"
        raise RunFailed(f"{what}: the run diverged and {allowed}; nothing after the last checkpoint is saved. "
                        f"Lower training.learning_rate (now {tr.learning_rate:g}) or raise "
                        "training.max_nonfinite_steps to skip such steps")
    progress.write(f"[shira_dist] warning: {what}: step skipped, no update ({state.nonfinite_streak} in a row, "
                   f"training.max_nonfinite_steps={tr.max_nonfinite_steps})")


def _log_point(ctx: LoopContext, state: LoopState, lr: float, progress: Progress) -> None:
    tr, w = ctx.cfg.training, state.window
    point = {"train/loss": w[0] / max(w[1], 1.0), "train/lr": lr, "train/grad_norm": w[4] / state.window_steps,
             "train/tokens_per_second": w[3] / max(state.window_seconds, 1e-9),
             "train/tokens": state.tokens, "train/epoch": ctx.plan.epoch_of(state.step - 1),
             "system/peak_memory_mb": peak_memory_mb(ctx.device)}
    if ctx.objective.task_type != "causal_lm":
        point["train/accuracy"] = w[2] / max(w[1], 1.0)
    state.log.append({"step": state.step, **point})
    ctx.tracker.log(point, step=state.step)
    progress.write(f"[shira_dist] step {state.step}/{tr.max_steps}: loss {point['train/loss']:.4f}, "
                   f"lr {lr:.2e}, {point['train/tokens_per_second']:,.0f} tok/s, "
                   f"peak mem {point['system/peak_memory_mb']:,.0f} MB")
    state.window, state.window_steps, state.window_seconds = [0.0] * 5, 0, 0.0


# ---- the loop -------------------------------------------------------------------------------------------------
def train_loop(ctx: LoopContext, state: LoopState, progress: Progress) -> LoopState:
    """Train from ``state.step`` to training.max_steps (or stop_after_step), updating ``state`` in place."""
    tr = ctx.cfg.training
    ctx.strategy.model.train()
    last = tr.max_steps if tr.stop_after_step is None else min(tr.max_steps, tr.stop_after_step)
    while state.step < last:
        lr = ctx.scheduler.get_last_lr()[0]
        t0 = time.perf_counter()
        stats, stepped = train_step(ctx, state.step)
        seconds = time.perf_counter() - t0
        state.train_seconds += seconds
        state.step += 1
        state.segments[-1]["end_step"] = state.step
        state.tokens += int(stats[3])
        loss, norm = float(stats[0] / max(float(stats[1]), 1.0)), float(stats[4])
        if stepped:
            state.nonfinite_streak = 0
            state.losses.append(loss)
            state.window = [a + float(b) for a, b in zip(state.window, stats)]
            state.window_steps += 1
            state.window_seconds += seconds
            progress.update(loss, state.window[3] / max(state.window_seconds, 1e-9), lr)
        else:
            _nonfinite(ctx, state, loss, norm, progress)
            progress.update(loss, 0.0, lr)

        if (state.step % tr.log_every == 0 or state.step == tr.max_steps) and state.window_steps:
            _log_point(ctx, state, lr, progress)
        if tr.eval_every and state.step % tr.eval_every == 0 and state.step < tr.max_steps:
            metrics = evaluate_and_track(ctx, state.step)
            if metrics is not None:
                state.evals.append({"step": state.step, **metrics})
                progress.write(eval_line(f"eval at step {state.step}", metrics))
        if (tr.save_every and state.step % tr.save_every == 0) or state.step == last:
            path = ctx.save_checkpoint(state)
            progress.write(f"[shira_dist] checkpoint: {path}")
    return state
