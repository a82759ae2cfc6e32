"""The training loop: accumulate, clip, step, schedule; log, evaluate and checkpoint on cadence.

One optimizer step k, on every rank:

    micro-batches = plan.micro_batches(k, rank)                  (batches.py)
    N = all-reduce(sum of target counts)                          whole global batch
    for each micro-batch (gradient sync only on the last):
        loss_sum, correct = objective(model, batch)               summed, not averaged
        backward(loss_sum * world_size / N)                       DDP averages over ranks,
                                                                  so grads = d(sum loss)/dθ / N
    clip to max_grad_norm; optimizer step; scheduler step; zero grads

Everything a resume needs is in LoopState + optimizer/scheduler/RNG (checkpointing.py);
the data position is the step number.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Optional

import torch

from .batches import BatchPlan, collate
from .evaluate import evaluate
from .objective import Objective
from .progress import Progress
from .schema import RunConfig
from .strategy import TrainingStrategy


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens trained on (all ranks)
    train_seconds: float = 0.0  # wall time inside the loop, over all resumes
    losses: list[float] = field(default_factory=list)  # per-step global mean loss
    log: list[dict] = field(default_factory=list)  # the logged points
    evals: list[dict] = field(default_factory=list)  # {"step": k, **metrics}
    eval_before: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LoopState":
        return cls(**data)


@dataclass
class LoopContext:
    cfg: RunConfig
    rank: int
    world_size: int
    device: torch.device
    strategy: TrainingStrategy
    scheduler: torch.optim.lr_scheduler.LambdaLR
    objective: Objective
    plan: BatchPlan
    train_data: object  # datasets.Dataset of encoded examples
    eval_data: Optional[object]
    pad_id: int
    autocast: Callable[[], ContextManager]
    tracker: object
    save_checkpoint: Callable[[LoopState], str]  # collective; returns the directory


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_eval(ctx: LoopContext) -> Optional[dict]:
    if ctx.eval_data is None:
        return None
    batch_size = ctx.cfg.training.eval_batch_size or 2 * ctx.cfg.training.micro_batch_size
    return evaluate(ctx.strategy, ctx.objective, ctx.eval_data, ctx.rank, ctx.world_size, batch_size, ctx.pad_id,
                    ctx.device, ctx.autocast)


def _eval_line(prefix: str, metrics: dict) -> str:
    parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
    return f"[shira_dist] {prefix}: " + ", ".join(parts)


def train_step(ctx: LoopContext, step: int) -> torch.Tensor:
    """One optimizer step; returns (loss sum, targets, correct, tokens) summed over ranks."""
    micro = [collate([ctx.train_data[i] for i in ids], ctx.pad_id, ctx.objective.left_pad)
             for ids in ctx.plan.micro_batches(step, ctx.rank)]
    n_local = sum(ctx.objective.num_targets(b) for b in micro)
    n_global = float(ctx.strategy.all_reduce_sum(torch.tensor([float(n_local)], dtype=torch.float64))[0])
    scale = ctx.world_size / max(n_global, 1.0)
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
    grad_norm = ctx.strategy.clip_and_step(ctx.cfg.training.max_grad_norm)
    ctx.scheduler.step()
    ctx.strategy.zero_grad()
    out = ctx.strategy.all_reduce_sum(stats)
    return torch.cat([out, torch.tensor([grad_norm], dtype=torch.float64)])


def train_loop(ctx: LoopContext, state: LoopState, progress: Progress) -> LoopState:
    tr = ctx.cfg.training
    ctx.strategy.model.train()
    window = torch.zeros(5, dtype=torch.float64)  # loss sum, targets, correct, tokens, grad-norm sum
    window_steps, window_start = 0, time.perf_counter()
    last = tr.max_steps if tr.stop_after_step is None else min(tr.max_steps, tr.stop_after_step)
    while state.step < last:
        lr = ctx.scheduler.get_last_lr()[0]
        t0 = time.perf_counter()
        stats = train_step(ctx, state.step)
        state.train_seconds += time.perf_counter() - t0
        state.step += 1
        state.tokens += int(stats[3])
        loss = float(stats[0] / max(float(stats[1]), 1.0))
        state.losses.append(loss)
        window += stats
        window_steps += 1
        elapsed = time.perf_counter() - window_start
        progress.update(loss, float(window[3]) / max(elapsed, 1e-9), lr)

        if state.step % tr.log_every == 0 or state.step == tr.max_steps:
            point = {"train/loss": float(window[0] / max(float(window[1]), 1.0)), "train/lr": lr,
                     "train/grad_norm": float(window[4]) / window_steps,
                     "train/tokens_per_second": float(window[3]) / max(elapsed, 1e-9),
                     "train/tokens": state.tokens, "train/epoch": ctx.plan.epoch_of(state.step - 1),
                     "system/peak_memory_mb": peak_memory_mb(ctx.device)}
            if ctx.objective.task_type != "causal_lm":
                point["train/accuracy"] = float(window[2] / max(float(window[1]), 1.0))
            state.log.append({"step": state.step, **point})
            ctx.tracker.log(point, step=state.step)
            progress.write(f"[shira_dist] step {state.step}/{tr.max_steps}: loss {point['train/loss']:.4f}, "
                           f"lr {lr:.2e}, {point['train/tokens_per_second']:,.0f} tok/s, "
                           f"peak mem {point['system/peak_memory_mb']:,.0f} MB")
            window.zero_()
            window_steps, window_start = 0, time.perf_counter()

        if tr.eval_every and state.step % tr.eval_every == 0 and state.step < tr.max_steps:
            metrics = run_eval(ctx)
            if metrics is not None:
                state.evals.append({"step": state.step, **metrics})
                ctx.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
                progress.write(_eval_line(f"eval at step {state.step}", metrics))
            window_start = time.perf_counter()
        if (tr.save_every and state.step % tr.save_every == 0) or state.step == last:
            path = ctx.save_checkpoint(state)
            progress.write(f"[shira_dist] checkpoint: {path}")
            window_start = time.perf_counter()
    return state
