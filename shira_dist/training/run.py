"""One training run, start to finish, from a checked RunConfig.

    preflight (train.py) ─► process group ─► output_dir claimed, resume point ─► strategy
        ─► model + tokenizer ─► data (prepared, tokenized, cached) ─► SHiRA adapter (new, or from
        the checkpoint; adapter lora/dora: PEFT's, lora_baseline.py) ─► optimizer + schedule
        ─► loop state (restored or fresh) ─► eval before
        ─► train loop (log / eval / checkpoint) ─► final adapter ─► eval after ─► metrics.json
        ─► "where everything went"

Rank 0 writes every output file; other ranks only compute (and fill local caches). Rank 0
also cleans up after an interrupted run, picks the resume point (the newest checkpoint that
loads) and tells the others. However the run ends, metrics.json says so (report.RunRecord).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, ContextManager, Optional

import torch

from ..masks import CALIBRATED_MASKS
from ..model import ShiraModel
from .batches import BatchPlan, ExampleEncoder, Objective, label_token_ids
from .checkpointing import Checkpointer, list_checkpoints
from .data import RunData, load_data
from .dist_env import DistEnv, destroy_process_group, init_process_group, pick_device
from .errors import DataError, disk_full, termination_signals
from .loop import LoopContext, LoopState, evaluate_and_track, make_scheduler, train_loop
from .lora_baseline import lora_log_line, lora_summary
from .models import build_adapter, calibration_batches, load_model
from .quantize import float_base_eval, quantization_report, quantize_base, report_line
from .report import (Progress, RunRecord, adapter_summary, eval_line, log, make_tracker, tracker_summary,
                     where_everything_went)
from .resume import claim_output_dir, start_state
from .samples import greedy_answers, read_samples, sample_lines, uses_chat_template, write_samples
from .schema import RunConfig, TrainingConfig
from .strategies import make_strategy


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
    tr = cfg.training
    precision = resolve_precision(tr.precision, device)
    resume_dir = claim_output_dir(cfg, env)
    record.begin({"output_dir": cfg.output_dir, "strategy": cfg.distributed.strategy, "world_size": env.world_size,
                  "precision": precision, "resumed_from": resume_dir})
    log(env, f"output_dir {cfg.output_dir}; {env.world_size} process(es), strategy {cfg.distributed.strategy}, "
             f"device {device.type}, precision {precision}, {torch.get_num_threads()} thread(s) per process")

    strategy = make_strategy(env, device, cfg)
    base, tokenizer, model_dir = load_model(cfg, env, strategy)
    if strategy.builds_partitioned:
        log(env, "base model built partitioned over the ranks (DeepSpeed ZeRO-3 zero.Init)")
    objective = Objective.for_model(cfg.task.type, base, label_token_ids(cfg.task, tokenizer))
    data = load_data(cfg, ExampleEncoder(cfg.task, tokenizer), env)
    plan = _batch_plan(cfg, env, data)
    shira, adapter = _adapter(cfg, env, device, base, resume_dir, plan, data, objective, tokenizer.pad_id)

    strategy.setup(shira, _adamw(tr))
    scheduler = make_scheduler(strategy.optimizer, tr.lr_schedule, tr.warmup_steps, tr.max_steps, tr.min_lr_ratio)
    run_fields = {"strategy": cfg.distributed.strategy, "world_size": env.world_size, "precision": precision,
                  "global_batch": plan.global_batch}
    state = start_state(resume_dir, strategy, scheduler, cfg, env, run_fields)
    tracker = make_tracker(cfg.tracking, cfg.output_dir, dataclasses.asdict(cfg), env.is_main)
    tracker.summary(tracker_summary(adapter))
    record.follow(state, adapter, {
        "output_dir": cfg.output_dir, "final_adapter": os.path.join(cfg.output_dir, "final"),
        "max_steps": tr.max_steps, **run_fields, "base_built_partitioned": strategy.builds_partitioned,
        "resumed_from": resume_dir, "start_step": state.step})
    checkpointer = Checkpointer(output_dir=cfg.output_dir, strategy=strategy, scheduler=scheduler,
                                adapter_config=shira.peft_config["default"], run_fields=run_fields,
                                keep=tr.keep_checkpoints, record=record, is_main=env.is_main)
    ctx = LoopContext(cfg=cfg, env=env, device=device, strategy=strategy, scheduler=scheduler, objective=objective,
                      plan=plan, train_data=data.train, eval_data=data.evaluation, pad_id=tokenizer.pad_id,
                      autocast=_autocast(precision, device), tracker=tracker, save_checkpoint=checkpointer.save)

    if state.step == 0:
        _samples(ctx, tokenizer, "before")
    _eval_before(ctx, state)
    record.write("running")
    progress = Progress(tr.max_steps, state.step, tr.progress_bar, env.is_main)
    try:
        state = train_loop(ctx, state, progress)
    finally:
        progress.close()
    if state.step < tr.max_steps:  # stop_after_step: the checkpoint is written, a later run resumes
        return _stopped(ctx, state, record)
    _samples(ctx, tokenizer, "after")
    return _completed(ctx, state, record, checkpointer, data, model_dir)


# ---- the steps ----------------------------------------------------------------------------------------------
def resolve_num_threads(num_threads) -> Optional[int]:
    """auto: this process's share of the idle cores (cores minus the 1-minute load average), at least 1."""
    if num_threads != "auto":
        return num_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cores - os.getloadavg()[0]
    local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, int(idle) // local_procs)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast where it is fast (CUDA with bf16, a CPU with AMX), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return "bf16" if amx is not None and amx() else "fp32"


def _autocast(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _batch_plan(cfg: RunConfig, env: DistEnv, data: RunData) -> BatchPlan:
    tr = cfg.training
    plan = BatchPlan(len(data.train), tr.micro_batch_size, tr.gradient_accumulation_steps, env.world_size, tr.seed)
    try:
        plan.check()
    except ValueError as e:
        raise DataError(str(e)) from None
    held_out = len(data.evaluation) if data.evaluation is not None else 0
    unit = "packed training rows" if cfg.task.packing else "training examples"
    log(env, f"data: {len(data.train)} {unit}, {held_out} held out; "
             f"global batch {plan.global_batch}, {plan.steps_per_epoch} steps per epoch")
    return plan


def _adapter(cfg: RunConfig, env: DistEnv, device: torch.device, base: torch.nn.Module, resume_dir: Optional[str],
             plan: BatchPlan, data: RunData, objective: Objective, pad_id: int) -> tuple[ShiraModel, dict]:
    """The SHiRA adapter on ``device`` and its summary: from the checkpoint, or new (a data-driven mask
    scored on this rank's first training batches)."""
    calibration = None
    if resume_dir is None and cfg.shira.mask_type in CALIBRATED_MASKS:
        base.to(device)
        calibration = calibration_batches(cfg.shira.calibration_batches, plan, data.train, objective, pad_id,
                                          env.rank, device)
    shira = build_adapter(base, cfg, resume_dir, calibration, objective)
    if cfg.model.quantization is not None:  # after the mask is scored on the float weights (quantize.py)
        quantized = quantize_base(shira, cfg.model.quantization)
        log(env, f"base quantized ({cfg.model.quantization}): {len(quantized)} linear layers; lm_head, embeddings "
                 "and modules_to_save stay float")
    shira = shira.to(device)
    if cfg.adapter != "shira":  # PEFT's LoRA/DoRA baseline
        adapter = lora_summary(shira, cfg)
        log(env, lora_log_line(adapter, cfg))
        return shira, adapter
    adapter = adapter_summary(shira)
    log(env, f"SHiRA adapter: {adapter['num_layers']} layers, {adapter['nnz']:,d} trainable entries "
             f"(density {adapter['density']:.4%} of the targeted weights), "
             f"{adapter['trainable_parameters']:,d} trainable of {adapter['all_parameters']:,d} parameters")
    return shira, adapter


def _adamw(tr: TrainingConfig) -> Callable:
    return lambda params: torch.optim.AdamW(params, lr=tr.learning_rate, betas=tuple(tr.adam_betas),
                                            eps=tr.adam_eps, weight_decay=tr.weight_decay)


def _eval_before(ctx: LoopContext, state: LoopState) -> None:
    """Score the untrained adapter once per run history (not again after a resume)."""
    if state.eval_before is None and ctx.cfg.training.eval_before_training and state.step == 0:
        state.eval_before = evaluate_and_track(ctx, step=0)
        if state.eval_before is not None and ctx.env.is_main:
            print(eval_line("before training", state.eval_before), flush=True)


def _samples(ctx: LoopContext, tokenizer, when: str) -> None:
    """task.sample_prompts answered greedily by rank 0, logged and kept in samples.json (samples.py)."""
    task, out = ctx.cfg.task, ctx.cfg.output_dir
    if not task.sample_prompts or not ctx.env.is_main:
        return
    chat = uses_chat_template(task, tokenizer.hf)
    model = getattr(ctx.strategy.model, "module", ctx.strategy.model)  # DDP's module: rank 0 alone
    answers = greedy_answers(model, tokenizer.hf, task.sample_prompts, chat, task.sample_max_new_tokens, ctx.device,
                             ctx.autocast)
    document = (read_samples(out) or {}) if when == "after" else {}
    write_samples(out, {**document, "prompts": task.sample_prompts, "rendered_with_chat_template": chat,
                        when: answers})
    print(sample_lines(when, task.sample_prompts, answers), flush=True)


def _stopped(ctx: LoopContext, state: LoopState, record: RunRecord) -> Optional[dict]:
    env, out = ctx.env, ctx.cfg.output_dir
    document = None
    if env.is_main:
        log(env, f"stopped at step {state.step} of {ctx.cfg.training.max_steps} (training.stop_after_step); run "
                 f"the same command again to resume from {list_checkpoints(out)[-1]}")
        document = record.write("stopped")
        ctx.tracker.finish()
    # ranks leave together: one tearing its engine and process group down while another still
    # works was seen to abort a DeepSpeed rank at exit
    ctx.strategy.barrier()
    return document


def _completed(ctx: LoopContext, state: LoopState, record: RunRecord, checkpointer: Checkpointer, data: RunData,
               model_dir: Optional[str]) -> Optional[dict]:
    env, strategy, tracker, out = ctx.env, ctx.strategy, ctx.tracker, ctx.cfg.output_dir
    final_dir = checkpointer.save_final()
    eval_after = evaluate_and_track(ctx, state.step)
    extra = {}
    if ctx.cfg.model.quantization is not None:  # the saved adapter on the float base it is meant for
        extra["quantization"] = quantization_report(ctx.cfg.model.quantization, strategy.model, eval_after,
                                                    float_base_eval(ctx, final_dir, model_dir))
        if env.is_main:
            print(report_line(extra["quantization"]), flush=True)
    in_sync = strategy.replicas_in_sync()
    if not in_sync:
        log(env, "warning: the ranks' adapter tensors differ at the end of training (replicas diverged)")
    strategy.barrier()
    if not env.is_main:
        return None
    document = record.write("completed", eval_after, replicas_in_sync=in_sync, **extra)
    tracker.summary({f"final/eval_{k}": v for k, v in (eval_after or {}).items()}
                    | {f"final/eval_before_{k}": v for k, v in (state.eval_before or {}).items()})
    tracker.finish()
    checkpoints = list_checkpoints(out)
    print(where_everything_went(out, final_dir, checkpoints[-1] if checkpoints else None, data.files, model_dir,
                                tracker, document), flush=True)
    return document
