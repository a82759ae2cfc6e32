"""One rank of the engine matrix (tests/distributed/test_engine_matrix.py): many cells in one process.

    torchrun --nproc_per_node 2 tests/distributed/dist/matrix_worker.py --out DIR --cells ddp-adamw_foreach,fsdp2-adamw_fused,...
    deepspeed --num_gpus 2 tests/distributed/dist/matrix_worker.py --out DIR --cells zero2-adamw_foreach,...

Each cell (engine-path, see matrix_cells.py) builds a fresh model in the default execution
mode and applies the engine to it directly, the way a user does (no shira_dist.distributed
helper wraps it):

    ddp         DistributedDataParallel(model), default arguments
    fsdp2       fully_shard(layer) for every decoder layer, then fully_shard(model) (default
                mesh: all ranks on the CPU, gloo)
    fsdp1       FullyShardedDataParallel(model, use_orig_params=True, device_id=cpu,
                auto_wrap_policy=transformer_auto_wrap_policy({LlamaDecoderLayer}))
    accelerate  Accelerator(cpu=True).prepare(model, optimizer); accelerator.backward(loss)
    zero1/2/3   deepspeed.initialize(model=model, optimizer=<client torch optimizer>, config=...)
                with engine.backward(loss); engine.step(); fp32; ZeRO-3 with
                stage3_param_persistence_threshold=10 so every tiny weight is partitioned

It trains harness.STEPS steps on this rank's rows, then (under torch.no_grad()) one forward
on the probe batch, and reads the full (unsharded) values back itself: DTensor.full_tensor(),
FSDP.summon_full_params, deepspeed.zero.GatheredParameters, or the parameters as they are.

Every rank writes DIR/<cell>.rank<r>.json (global-mean losses per step, probe loss, seconds,
engine facts, or the error with its traceback) and DIR/<cell>.rank<r>.pt (the values) as
soon as the cell ends: a cell that raises is recorded and the next cell runs (unless it
raised on one rank only, or a rank timed out in a collective: then the later cells are
recorded as not run, with the reason).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))  # the repo

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from shira_dist.distributed import unlink_shm_buffer  # noqa: E402
from tests.distributed.dist import harness  # noqa: E402
from tests.distributed.dist import matrix_cells as cells  # noqa: E402

PG_TIMEOUT = datetime.timedelta(seconds=90)  # a rank left alone in a collective gives up (and records it)
CONTROL_TIMEOUT = 3 * PG_TIMEOUT  # outlives a peer's PG_TIMEOUT wait, so the outcome exchange still meets


def mean_over_ranks(x: torch.Tensor) -> float:
    t = x.detach().clone().float().reshape(())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def plain_values(module: nn.Module) -> dict:
    return {cells.canonical(n): p.detach().clone() for n, p in module.named_parameters() if cells.is_value(n)}


def first_layer(model: nn.Module):
    """Decoder layer 0's q_proj (a SHiRA layer) and its value tensor, as the engine left them."""
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    return q, next(p for n, p in q.named_parameters() if cells.is_value(n))


@dataclass
class Cell:
    """What the loop needs from an engine. ``facts``: how the engine holds the weights right
    after it was applied (before any forward), to show it really shards what it claims."""

    call: Callable  # the module the loop calls: engine(input_ids=..., labels=...)
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    read_values: Callable[[], dict]  # full values, canonical names (collective where sharded)
    facts: dict
    destroy: Callable[[], None] = lambda: None


def setup_ddp(model, path) -> Cell:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)
    return Cell(ddp, lambda loss: loss.backward(), cells.make_step(path, trainable(ddp)), lambda: plain_values(ddp),
                {"wrapper": type(ddp).__name__})


def setup_fsdp2(model, path) -> Cell:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    q, values = first_layer(model)
    weight = q.base_layer.weight
    facts = {"base_weight_type": type(weight).__name__, "value_type": type(values).__name__,
             "base_weight_rows": [weight.to_local().shape[0] if isinstance(weight, DTensor) else None, weight.shape[0]],
             "value_numel": [values.to_local().numel() if isinstance(values, DTensor) else None, values.numel()]}

    def read_values() -> dict:  # collective: every rank gathers every value tensor, in the same order
        return {cells.canonical(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in model.named_parameters() if cells.is_value(n)}

    return Cell(model, lambda loss: loss.backward(), cells.make_step(path, trainable(model)), read_values, facts)


def setup_fsdp1(model, path) -> Cell:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    root = FSDP(model, use_orig_params=True, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    values = {n: p.numel() for n, p in root.named_parameters() if cells.is_value(n)}
    facts = {"fsdp_units": len(FSDP.fsdp_modules(root)), "value_numel_held": sum(values.values()),
             "value_tensors": len(values)}

    def read_values() -> dict:  # collective
        with FSDP.summon_full_params(root, writeback=False):
            return plain_values(root)

    return Cell(root, lambda loss: loss.backward(), cells.make_step(path, trainable(root)), read_values, facts)


def setup_accelerate(model, path) -> Cell:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    prepared, opt = accelerator.prepare(model, cells.make_optimizer(path, trainable(model)))

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    facts = {"distributed_type": str(accelerator.distributed_type), "wrapper": type(prepared).__name__,
             "optimizer": type(opt).__name__}
    return Cell(prepared, accelerator.backward, step, lambda: plain_values(prepared), facts)


def deepspeed_config(stage: int) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:  # partition every weight of the tiny model (the default threshold, 1e5, keeps them all whole)
        zero["stage3_param_persistence_threshold"] = 10
    return {"train_micro_batch_size_per_gpu": harness.GLOBAL_BATCH // dist.get_world_size(),
            "gradient_accumulation_steps": 1, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "fp16": {"enabled": False}, "bf16": {"enabled": False},  # fp32 throughout
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def setup_zero(model, path, stage: int) -> Cell:
    import deepspeed

    optimizer = cells.make_optimizer(path, trainable(model))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(stage))
    q, values = first_layer(model)
    weight = q.base_layer.weight
    facts = {"zero_stage": engine.zero_optimization_stage(), "client_optimizer": type(optimizer).__name__,
             "client_optimizer_fused": bool(optimizer.defaults.get("fused")),
             # ZeRO-3: numel() is 0 outside forward, ds_tensor this rank's partition
             "base_weight_numel": weight.numel(), "value_numel": values.numel(),
             "base_weight_partition": getattr(getattr(weight, "ds_tensor", None), "numel", lambda: None)(),
             "value_partition": getattr(getattr(values, "ds_tensor", None), "numel", lambda: None)()}

    def read_values() -> dict:
        named = [(n, p) for n, p in engine.named_parameters() if cells.is_value(n)]
        if stage == 3:  # collective
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {cells.canonical(n): p.detach().clone() for n, p in named}
        return {cells.canonical(n): p.detach().clone() for n, p in named}

    return Cell(engine, engine.backward, engine.step, read_values, facts,
                destroy=getattr(engine, "destroy", lambda: None))


SETUPS = {"ddp": setup_ddp, "fsdp2": setup_fsdp2, "fsdp1": setup_fsdp1, "accelerate": setup_accelerate,
          "zero1": functools.partial(setup_zero, stage=1), "zero2": functools.partial(setup_zero, stage=2),
          "zero3": functools.partial(setup_zero, stage=3)}


def run_cell(engine: str, path: str) -> tuple[dict, dict]:
    """(record, values) of one cell on this rank."""
    began = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    cell = SETUPS[engine](cells.shira_model(), path)
    rows = slice(rank * harness.GLOBAL_BATCH // world, (rank + 1) * harness.GLOBAL_BATCH // world)
    cell.call.train()
    losses = []
    for ids in harness.batches():
        local = ids[rows]
        loss = cell.call(input_ids=local, labels=local).loss
        cell.backward(loss)
        cell.step()
        losses.append(mean_over_ranks(loss))
    with torch.no_grad():  # one more forward: the model computes with the values it holds now
        probe = cells.probe_batch()[rows]
        probe_loss = mean_over_ranks(cell.call(input_ids=probe, labels=probe).loss)
    values = cell.read_values()
    cell.destroy()
    return {"losses": losses, "probe_loss": probe_loss, "facts": cell.facts,
            "seconds": round(time.perf_counter() - began, 2)}, values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cells", required=True, help="engine-path,... (see matrix_cells.py)")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher adds it
    args = parser.parse_args()
    todo = [c.split("-", 1) for c in args.cells.split(",") if c]
    if any(engine.startswith("zero") for engine, _ in todo):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", timeout=PG_TIMEOUT)

        unlink_shm_buffer()  # DeepSpeed never removes its CPU all-reduce buffer's name
    else:
        dist.init_process_group("gloo", timeout=PG_TIMEOUT)
    rank = dist.get_rank()
    # cell outcomes are exchanged on a group of their own: after a cell that failed on one rank
    # only, the default group may hold a half-done collective, so no later cell can trust it
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    began = time.perf_counter()
    broken = None  # the cell after which the default group is unusable
    for engine, path in todo:
        name = cells.cell_id(engine, path)
        record: dict = {"cell": name, "rank": rank, "world_size": dist.get_world_size()}
        values: dict = {}
        if broken is not None:
            record["error"] = (f"not run: cell {broken} failed on some ranks only (or timed out in a collective), "
                               "which leaves the process group unusable")
        else:
            try:
                result, values = run_cell(engine, path)
                record.update(result)
            except Exception:
                record["error"] = traceback.format_exc()
        torch.save(values, os.path.join(args.out, f"{name}.rank{rank}.pt"))
        with open(os.path.join(args.out, f"{name}.rank{rank}.json"), "w") as f:
            json.dump(record, f, indent=1)
        if broken is None:
            error = record.get("error", "")
            outcomes: list = [None] * dist.get_world_size()
            dist.all_gather_object(outcomes, ("error" in record, "timed out" in error.lower()), group=control)
            if len(set(outcomes)) > 1 or any(timed_out for _, timed_out in outcomes):
                broken = name
        gc.collect()
    with open(os.path.join(args.out, f"done.rank{rank}.json"), "w") as f:
        json.dump({"seconds": round(time.perf_counter() - began, 2)}, f)
    dist.barrier(group=control)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
