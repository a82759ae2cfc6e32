"""One training run, start to finish, from a checked RunConfig.

    preflight (train.py) ─► process group ─► model + tokenizer ─► data (prepared, tokenized, cached)
        ─► SHiRA adapter (new, or from the latest checkpoint) ─► strategy (single/ddp/...) + optimizer
        ─► eval before ─► train loop (log / eval / checkpoint) ─► final adapter ─► eval after
        ─► metrics.json ─► "where everything went"

Rank 0 writes every output file; other ranks only compute (and fill local caches). Rank 0
also cleans up after an interrupted run, picks the resume point (the newest checkpoint that
loads) and tells the others. However the run ends, metrics.json says so (outcome.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from typing import Optional

import torch
import torch.distributed as dist

from ..io import atomic_write_bytes
from . import checkpointing as ckpt
from .batches import BatchPlan, collate
from .config import config_to_yaml
from .data import load_examples, tokenize
from .dist_env import DistEnv, destroy_process_group, init_process_group, local_main_first, pick_device
from .encoding import ExampleEncoder, label_token_ids
from .errors import DataError, RunFailed
from .loop import LoopContext, LoopState, run_eval, train_loop
from .models import build_adapter, load_base_model, model_directory
from .objective import Objective
from .outcome import RunRecord, disk_full, rank0_writes, termination_signals
from .prepare import prepare_data
from .progress import Progress
from .report import adapter_summary, tracker_summary, where_everything_went
from .resume import claim_output_dir
from .schedule import make_scheduler
from .schema import RunConfig
from .strategy import make_strategy
from .tracking import make_tracker


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast where it is fast (CUDA with bf16, a CPU with AMX), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return "bf16" if amx is not None and amx() else "fp32"


def _log(env: DistEnv, message: str) -> None:
    if env.is_main:
        print(f"[shira_dist] {message}", flush=True)


def _load_data(cfg: RunConfig, encoder: ExampleEncoder, env: DistEnv):
    """(train, eval or None, the raw files) — local rank 0 fills the caches first."""
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
        evaluation = None
        if eval_files:
            evaluation = tokenize(load_examples(eval_files, d.format, d.cache_dir, d.max_eval_examples, cfg.task),
                                  encoder, eval_files, "eval")
    return train, evaluation, train_files + eval_files


def _calibration_batches(cfg: RunConfig, plan: BatchPlan, train, objective: Objective, pad_id: int,
                         rank: int, device: torch.device) -> list[dict]:
    """The first training micro-batches of this rank (data-driven masks score entries on them)."""
    out = []
    for step in range(plan.steps_per_epoch):
        for ids in plan.micro_batches(step, rank):
            if len(out) == cfg.shira.calibration_batches:
                return out
            out.append({k: v.to(device) for k, v in collate([train[i] for i in ids], pad_id, objective.left_pad).items()})
    return out


def _fresh_start(seed: int, env: DistEnv) -> LoopState:
    torch.manual_seed(seed + 1 + env.rank)  # the model was built from `seed` on every rank alike
    random.seed(seed + 1 + env.rank)
    return LoopState()


def _restore(resume_dir: str, strategy, scheduler, plan: BatchPlan, env: DistEnv, now: dict) -> LoopState:
    """Optimizer, scheduler, this rank's RNG and the loop state of a checkpoint (the adapter is already loaded)."""
    saved = ckpt.load_trainer_state(resume_dir)
    strategy.load_optimizer_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved["global_batch"] != plan.global_batch:
        _log(env, f"warning: the checkpoint used global batch {saved['global_batch']}, this run {plan.global_batch}: "
                  "the data order after the resume differs from an uninterrupted run")
    if len(saved["rng"]) == env.world_size:
        ckpt.set_rng_state(saved["rng"][env.rank])
    else:
        _log(env, f"warning: the checkpoint has RNG states of {len(saved['rng'])} ranks, this run has "
                  f"{env.world_size}: random streams restart")
    state = LoopState.from_dict(saved["loop"])
    changes = [f"{key} {saved[key]} -> {value}" for key, value in now.items()
               if saved.get(key) is not None and saved[key] != value]
    _log(env, f"resumed from {resume_dir} at step {state.step}"
              + (f"; what changes: {', '.join(changes)}" if changes else ""))
    return state


def _from_rank0(env: DistEnv, value):
    """Rank 0's ``value`` on every rank (a broadcast when there is a process group)."""
    if not env.distributed or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _claim_output_dir(cfg: RunConfig, env: DistEnv) -> Optional[str]:
    """Rank 0 prepares output_dir (checkpointing.claim_output_dir) and tells every rank the checkpoint
    to resume from (None: a fresh start)."""
    decision: tuple[Optional[str], Optional[str]] = (None, None)  # (resume dir, rank 0's error)
    if env.is_main:
        try:
            directory, notes = claim_output_dir(cfg.output_dir, cfg.training.resume)
            for note in notes:
                _log(env, note)
            atomic_write_bytes(os.path.join(cfg.output_dir, "resolved_config.yaml"), config_to_yaml(cfg).encode())
            decision = (directory, None)
        except Exception as e:
            _from_rank0(env, (None, str(e)))
            raise
    directory, error = _from_rank0(env, decision)
    if error is not None:
        raise RunFailed(f"rank 0 failed while preparing output_dir: {error}")
    return directory


def resolve_num_threads(num_threads) -> Optional[int]:
    """auto: this process's share of the idle cores (cores minus the 1-minute load average), at least 1."""
    if num_threads != "auto":
        return num_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cores - os.getloadavg()[0]
    local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, int(idle) // local_procs)


def run(cfg: RunConfig, env: DistEnv) -> Optional[dict]:
    """Train as configured; returns the metrics document on rank 0 (None on other ranks)."""
    threads = resolve_num_threads(cfg.training.num_threads)
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(env)
    record = RunRecord(cfg.output_dir, env.is_main)
    with termination_signals():
        try:
            init_process_group(env, device, cfg.distributed.backend, cfg.distributed.timeout_minutes)
            try:
                return _run(cfg, env, device, record)
            finally:
                destroy_process_group()
        except BaseException as e:
            failure = disk_full(e, cfg.output_dir)
            record.finish_with(failure or e)
            if failure is not None:
                raise failure from None
            raise


def _run(cfg: RunConfig, env: DistEnv, device: torch.device, record: RunRecord) -> Optional[dict]:
    tr, out = cfg.training, cfg.output_dir
    precision = resolve_precision(tr.precision, device)
    resume_dir = _claim_output_dir(cfg, env)
    record.active = True
    record.info = {"output_dir": out, "strategy": cfg.distributed.strategy, "world_size": env.world_size,
                   "precision": precision, "resumed_from": resume_dir}
    _log(env, f"output_dir {out}; {env.world_size} process(es), strategy {cfg.distributed.strategy}, "
              f"device {device.type}, precision {precision}, {torch.get_num_threads()} thread(s) per process")

    with local_main_first(env):  # a built-in model may be converted (once) here
        model_dir = model_directory(cfg.model)
    strategy = make_strategy(cfg.distributed.strategy, env, device, cfg)
    with strategy.model_construction():  # ZeRO-3: built partitioned, never whole on a rank
        base, tokenizer = load_base_model(cfg, model_dir)
    if strategy.builds_partitioned:
        _log(env, "base model built partitioned over the ranks (DeepSpeed ZeRO-3 zero.Init)")
    encoder = ExampleEncoder(cfg.task, tokenizer)
    objective = Objective.for_model(cfg.task.type, base, label_token_ids(cfg.task, tokenizer))
    train, evaluation, data_files = _load_data(cfg, encoder, env)
    plan = BatchPlan(len(train), tr.micro_batch_size, tr.gradient_accumulation_steps, env.world_size, tr.seed)
    try:
        plan.check()
    except ValueError as e:
        raise DataError(str(e)) from None
    _log(env, f"data: {len(train)} training examples, {len(evaluation) if evaluation is not None else 0} held out; "
              f"global batch {plan.global_batch}, {plan.steps_per_epoch} steps per epoch")

    calibration = None
    if resume_dir is None and cfg.shira.mask_type in ("gradient", "snip"):
        base.to(device)
        calibration = _calibration_batches(cfg, plan, train, objective, tokenizer.pad_id, env.rank, device)

    def calibration_loss(model, batch):
        loss, _ = objective(model, batch)
        return loss / max(1, objective.num_targets({k: v.cpu() for k, v in batch.items()}))

    shira = build_adapter(base, cfg, resume_dir, calibration, calibration_loss).to(device)
    adapter = adapter_summary(shira)
    _log(env, f"SHiRA adapter: {adapter['num_layers']} layers, {adapter['nnz']:,d} trainable entries "
              f"(density {adapter['density']:.4%} of the targeted weights), "
              f"{adapter['trainable_parameters']:,d} trainable of {adapter['all_parameters']:,d} parameters")

    strategy.setup(shira, lambda params: torch.optim.AdamW(
        params, lr=tr.learning_rate, betas=tuple(tr.adam_betas), eps=tr.adam_eps, weight_decay=tr.weight_decay))
    scheduler = make_scheduler(strategy.optimizer, tr.lr_schedule, tr.warmup_steps, tr.max_steps, tr.min_lr_ratio)

    this_run = {"strategy": cfg.distributed.strategy, "world_size": env.world_size, "precision": precision,
                "global_batch": plan.global_batch}
    state = _restore(resume_dir, strategy, scheduler, plan, env, this_run) if resume_dir \
        else _fresh_start(tr.seed, env)
    state.segments.append({**this_run, "start_step": state.step, "end_step": state.step})
    tracker = make_tracker(cfg.tracking, out, dataclasses.asdict(cfg), env.is_main)
    tracker.summary(tracker_summary(adapter))
    record.state, record.adapter = state, adapter
    record.info = {"output_dir": out, "final_adapter": os.path.join(out, "final"), "max_steps": tr.max_steps,
                   **this_run, "base_built_partitioned": strategy.builds_partitioned,
                   "resumed_from": resume_dir, "start_step": state.step}
    shira_config = shira.peft_config["default"]

    def save_checkpoint(loop_state: LoopState) -> str:
        tensors = strategy.adapter_state_dict("default")  # collectives: every rank takes part
        optimizer = strategy.optimizer_state_dict()
        rng = ckpt.gather_rng_states()
        loop_state.segments[-1]["end_step"] = loop_state.step

        def write() -> str:
            ckpt.check_finite(tensors, f"checkpoint step-{loop_state.step}")
            state_doc = {"step": loop_state.step, **this_run, "optimizer": optimizer,
                         "scheduler": scheduler.state_dict(), "rng": rng, "loop": loop_state.to_dict()}
            path = ckpt.save_checkpoint(out, loop_state.step, tensors, shira_config, state_doc, tr.keep_checkpoints)
            record.write("running")
            return path

        path = rank0_writes(strategy, env.is_main, write, f"save checkpoint step-{loop_state.step}")
        return path or os.path.join(ckpt.checkpoints_root(out), f"step-{loop_state.step}")

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    ctx = LoopContext(cfg, env.rank, env.world_size, device, strategy, scheduler, objective, plan, train, evaluation,
                      tokenizer.pad_id, autocast, tracker, save_checkpoint)

    if state.eval_before is None and tr.eval_before_training and state.step == 0:
        state.eval_before = run_eval(ctx)
        if state.eval_before is not None:
            tracker.log({f"eval/{k}": v for k, v in state.eval_before.items()}, step=0)
            _log(env, "before training: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in state.eval_before.items()))
    record.write("running")

    progress = Progress(tr.max_steps, state.step, tr.progress_bar, env.is_main)
    try:
        state = train_loop(ctx, state, progress)
    finally:
        progress.close()

    if state.step < tr.max_steps:  # stop_after_step: the checkpoint is written, a later run resumes
        if env.is_main:
            _log(env, f"stopped at step {state.step} of {tr.max_steps} (training.stop_after_step); run the same "
                      f"command again to resume from {ckpt.list_checkpoints(out)[-1]}")
            document = record.write("stopped")
            tracker.finish()
            return document
        return None

    tensors = strategy.adapter_state_dict("default")

    def write_final() -> str:
        ckpt.check_finite(tensors, "the final adapter")
        return ckpt.save_final_adapter(out, tensors, shira_config)

    final_dir = rank0_writes(strategy, env.is_main, write_final, "write the final adapter") \
        or os.path.join(out, "final")
    eval_after = run_eval(ctx)
    if eval_after is not None:
        tracker.log({f"eval/{k}": v for k, v in eval_after.items()}, step=state.step)
    in_sync = strategy.replicas_in_sync()
    if not in_sync:
        _log(env, "warning: the ranks' adapter tensors differ at the end of training (replicas diverged)")
    strategy.barrier()
    if not env.is_main:
        return None
    document = record.write("completed", eval_after, replicas_in_sync=in_sync)
    tracker.summary({f"final/eval_{k}": v for k, v in (eval_after or {}).items()}
                    | {f"final/eval_before_{k}": v for k, v in (state.eval_before or {}).items()})
    tracker.finish()
    checkpoints = ckpt.list_checkpoints(out)
    print(where_everything_went(out, final_dir, checkpoints[-1] if checkpoints else None, data_files, model_dir,
                                tracker, document), flush=True)
    return document
