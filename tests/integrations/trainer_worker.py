"""One rank of the 2-process Trainer test (tests/integrations/test_trainer.py): every engine cell
in one process, one after the other.

    torchrun --nproc_per_node 2 tests/integrations/trainer_worker.py --out DIR --cells ddp,fsdp,zero2

Each cell is ``transformers.Trainer`` with its default optimizer on a fresh tiny Llama with a
SHiRA adapter, the engine chosen by TrainingArguments only, as a user chooses it:

    ddp     nothing more (torchrun started 2 processes: DistributedDataParallel over gloo)
    fsdp    fsdp=True, fsdp_config=FSDP_CONFIG (FSDP2). On the CPU accelerate 1.15 turns FSDP
            on only for GPU-like devices, so the Trainer runs DDP instead (recorded in facts);
            fsdp2_save() then does by hand, with torch's FSDP2, what the Trainer does to save
            an FSDP2 model
    zero2   deepspeed=ZERO2 (a dict; the Trainer fills the "auto" values)

Each cell runs twice: "full" trains STEPS steps (a checkpoint every CHECKPOINT_EVERY steps,
then ``trainer.save_model``); "resumed" builds a model whose mask has another seed and resumes
from full's first checkpoint. Each rank takes GLOBAL_BATCH / 2 rows of every global batch, so
the math is that of one process with the whole batch (test_trainer.py's reference).

Every rank writes DIR/<cell>.rank<r>.json: each run's logged losses, directory, engine facts
and losses before and after, or the error with its traceback. A cell that raises is recorded
and the next cell runs (unless it raised on one rank only: then the process group cannot be
trusted, and the later cells are recorded as not run).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo

import torch.distributed as dist  # noqa: E402

from tests.integrations import common  # noqa: E402

STEPS, CHECKPOINT_EVERY, GLOBAL_BATCH, LR = 4, 2, 4, 1e-2
RESUME_MASK_SEED = 7  # the resumed run's model draws another mask; load_adapter must replace it
PG_TIMEOUT = datetime.timedelta(seconds=90)
ZERO2 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "zero_optimization": {"stage": 2},
         "fp16": {"enabled": False}, "bf16": {"enabled": False}, "steps_per_print": 10 ** 9}
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "reshard_after_forward": True}
ENGINE_ARGS = {"single": {}, "ddp": {}, "fsdp": {"fsdp": True, "fsdp_config": FSDP_CONFIG},
               "zero2": {"deepspeed": ZERO2}}


def training_args(output_dir: str, engine: str, world_size: int):
    """The arguments every run shares (test_trainer.py's single process too), plus the engine's;
    each of ``world_size`` processes takes an equal part of the global batch."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=output_dir, max_steps=STEPS,
                             per_device_train_batch_size=GLOBAL_BATCH // world_size,
                             learning_rate=LR, save_strategy="steps", save_steps=CHECKPOINT_EVERY, logging_steps=1,
                             seed=0, report_to=[], use_cpu=True, disable_tqdm=True, **ENGINE_ARGS[engine])


def train(output_dir: str, engine: str, world_size: int, mask_seed: int = 0, resume: str | None = None) -> dict:
    """One Trainer run (default optimizer) on a fresh model; ``trainer.save_model(<output_dir>/final)``
    at the end. Returns what it logged and what the model computes before and after."""
    from transformers import Trainer

    model = common.shira_model(mask_seed)
    rows = common.token_rows()
    untrained = common.loss_of(model, rows).item()
    trainer = Trainer(model=model, args=training_args(output_dir, engine, world_size),
                      train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(os.path.join(output_dir, "final"))
    # the model as the trainer left it (whole on every rank under DDP and ZeRO-2)
    return {"dir": output_dir, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "untrained_loss": untrained, "trained_loss": common.loss_of(model, rows).item(),
            "facts": engine_facts(trainer)}


def engine_facts(trainer) -> dict:
    """How the Trainer ran the model, so that no cell passes by not using its engine."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
    return {"distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
            "world_size": trainer.args.world_size, "wrapper": type(trainer.model_wrapped).__name__,
            "optimizer": type(optimizer).__name__, "optim": str(trainer.args.optim.value),
            "fused": bool(getattr(optimizer, "defaults", {}).get("fused"))}


def run_cell(engine: str, out: str, world_size: int) -> dict:
    """The uninterrupted run, then a run on a model with another mask resumed from its first checkpoint."""
    began = time.perf_counter()
    full = train(os.path.join(out, engine, "full"), engine, world_size)
    resumed = train(os.path.join(out, engine, "resumed"), engine, world_size, mask_seed=RESUME_MASK_SEED,
                    resume=os.path.join(full["dir"], f"checkpoint-{CHECKPOINT_EVERY}"))
    record = {"full": full, "resumed": resumed}
    if engine == "fsdp":
        record["fsdp2_save"] = fsdp2_save(os.path.join(full["dir"], "final"), os.path.join(out, engine, "fsdp2"))
    record["seconds"] = round(time.perf_counter() - began, 2)
    return record


def fsdp2_save(adapter_dir: str, save_dir: str) -> dict:
    """What the Trainer does to save a model under FSDP2 (Trainer.save_model): the adapter in
    ``adapter_dir`` loaded for training, each decoder layer and the root sharded with
    ``fully_shard`` (as accelerate's fsdp2_prepare_model does), the full state dict gathered
    with accelerate's options, and ``save_pretrained(save_dir, state_dict=...)``. Returns the
    directory, or the error (with its traceback) if any step raised."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from shira_dist import PeftModel

    try:
        model = PeftModel.from_pretrained(common.tiny_llama(), adapter_dir, is_trainable=True)
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        state_dict = get_model_state_dict(model, options=options)
        model.save_pretrained(save_dir, state_dict=state_dict, is_main_process=dist.get_rank() == 0)
        return {"dir": save_dir}
    except Exception:
        return {"dir": save_dir, "error": traceback.format_exc()}


def reset_engine_state() -> None:
    """What one Trainer leaves behind in this process and the next one must not see."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cells", required=True, help="comma-separated: ddp, fsdp, zero2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import deepspeed

    from shira_dist.distributed import unlink_shm_buffer

    deepspeed.init_distributed(dist_backend="gloo", timeout=PG_TIMEOUT)  # one process group for every cell
    unlink_shm_buffer()  # DeepSpeed never removes its CPU all-reduce buffer's name
    control = dist.new_group(backend="gloo", timeout=3 * PG_TIMEOUT)  # outcomes, apart from the cells' collectives
    broken = None
    for engine in args.cells.split(","):
        record: dict = {"cell": engine, "world_size": dist.get_world_size()}
        if broken is not None:
            record["error"] = (f"not run: cell {broken} failed on some ranks only, which leaves the process group "
                               "unusable")
        else:
            try:
                record.update(run_cell(engine, args.out, dist.get_world_size()))
            except Exception:
                record["error"] = traceback.format_exc()
            outcomes: list = [None] * dist.get_world_size()
            dist.all_gather_object(outcomes, "error" in record, group=control)
            if len(set(outcomes)) > 1:
                broken = engine
        with open(os.path.join(args.out, f"{engine}.rank{dist.get_rank()}.json"), "w") as f:
            json.dump(record, f, indent=1)
        reset_engine_state()
    dist.barrier(group=control)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
