"""One process of a 2-process test job, started by torchrun or by the deepspeed launcher.

    torchrun --nproc_per_node 2 tests/distributed/dist/worker.py --out DIR --start-dir DIR --runs ddp:scratch,fsdp2:resume
    deepspeed --num_gpus 2 tests/distributed/dist/worker.py --out DIR --start-dir DIR --runs zero3:resume,...

Each run (strategy:start) trains harness.STEPS steps on this rank's rows of every global
batch, then saves the adapter with shira_dist.distributed.save_adapter to
DIR/<strategy>-<start>/. Each rank writes what it saw to DIR/rank<r>.json: global mean
losses, a digest of its adapter values after every step, how many entries of the base
weights outside the mask differ from a freshly built base (locally held shards only), and
engine facts. test_distributed.py compares all of it with the single-process run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch.distributed as dist  # noqa: E402

from shira_dist.distributed import (  # noqa: E402
    unlink_shm_buffer,
    MaskMismatchError,
    check_adapters_consistent,
    data_parallel_slice,
    deepspeed_config,
    deepspeed_initialize,
    gather_adapter_state_dict,
    save_adapter,
    shard_fsdp1,
    shard_fsdp2,
    sync_adapters,
    unwrap_shira_model,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "configs", "deepspeed")
ZERO_CONFIGS = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json",
                "zero2_offload": "zero2_offload.json"}


def mean_over_ranks(x: torch.Tensor) -> float:
    t = x.detach().clone().float()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def wrap(strategy: str, model):
    """(engine to call, optimizer or None when the engine steps itself)."""
    trainable = lambda: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, forward_sync_buffers=False), harness.optimizer(trainable())
    if strategy in ("fsdp2", "fsdp2_offload"):
        shard_fsdp2(model, cpu_offload=strategy == "fsdp2_offload")
        return model, harness.optimizer(trainable())
    if strategy == "fsdp1":
        root = shard_fsdp1(model)
        return root, harness.optimizer(p for p in root.parameters() if p.requires_grad)
    if strategy in ZERO_CONFIGS:
        cfg = deepspeed_config(os.path.join(CONFIG_DIR, ZERO_CONFIGS[strategy]),
                               micro_batch_size=harness.GLOBAL_BATCH // dist.get_world_size())
        if strategy.startswith("zero3"):  # the tiny model's small weights partitioned too, as a real model's are
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 100
        engine, _, _ = deepspeed_initialize(model, cfg, optimizer=harness.optimizer(trainable()))
        return engine, None
    raise ValueError(f"unknown strategy {strategy!r}")


def base_weight_facts(strategy: str, engine, shira) -> dict:
    """Entries outside the mask that differ from the base, over this rank's own shards."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = harness.base_model()
    compared = differing = 0
    facts: dict = {}
    indices = {path: layer.shira_indices["default"] for path, layer in shira.shira_layers()}
    for path, layer in shira.shira_layers():
        ref_w = ref.get_submodule(path.replace("_fsdp_wrapped_module.", "")).weight.detach()
        idx = indices[path]
        w = layer.base_layer.weight
        if strategy.startswith("fsdp2"):
            facts["weight_type"] = type(w).__name__
            local = w.to_local()
            offset = rank * math.ceil(ref_w.shape[0] / world)
            c, d = harness.outside_mask_differences(local, ref_w, idx, offset)
            facts.setdefault("local_rows", []).append([offset, local.shape[0], ref_w.shape[0]])
        elif strategy == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(layer.base_layer, recurse=False, writeback=False):
                c, d = harness.outside_mask_differences(layer.base_layer.weight, ref_w, idx)
        elif strategy.startswith("zero3"):
            facts.setdefault("numel_outside_forward", []).append(w.numel())
            part = w.ds_tensor
            c, d = harness.flat_outside_mask_differences(part, rank * part.numel(), ref_w, idx)
        else:
            c, d = harness.outside_mask_differences(w, ref_w, idx)
        compared, differing = compared + c, differing + d
    facts.update(outside_mask_compared=compared, outside_mask_differing=differing)
    return facts


def run(strategy: str, start: str, args) -> dict:
    began = time.perf_counter()
    model = harness.shira_model(start, args.start_dir)
    sync_adapters(model)
    engine, opt = wrap(strategy, model)
    rows = data_parallel_slice(harness.GLOBAL_BATCH, dist.get_rank(), dist.get_world_size())
    losses, digests = [], []
    shira = unwrap_shira_model(engine)
    engine.train()
    for ids in harness.batches():
        local = ids[rows]
        loss = engine(input_ids=local, labels=local).loss
        if opt is None:  # DeepSpeed: the engine scales, reduces and steps
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(mean_over_ranks(loss))
        digests.append(harness.digest(gather_adapter_state_dict(engine, rank0_only=False)))
    facts = base_weight_facts(strategy, engine, shira)
    check_adapters_consistent(engine, values=True)  # raises on every rank if they diverged
    save_adapter(engine, os.path.join(args.out, f"{strategy}-{start}"))
    return dict(strategy=strategy, start=start, losses=losses, value_digests=digests,
                seconds=round(time.perf_counter() - began, 2), **facts)


def mismatch_checks() -> dict:
    """Per-process random masks must be caught; broadcasting rank 0's must fix them."""
    out: dict = {}
    model = harness.shira_model("scratch", random_seed=None)  # each process draws its own mask
    try:
        check_adapters_consistent(model)
        out["unseeded_error"] = None
    except MaskMismatchError as e:
        out["unseeded_error"] = str(e)
    sync_adapters(model)  # random_seed=None -> broadcast from rank 0, then check
    out["after_sync_indices"] = harness.digest({n: l.shira_indices["default"] for n, l in model.shira_layers()})
    with torch.no_grad():
        if dist.get_rank() == 1:
            next(p for p in model.parameters() if p.requires_grad).view(-1)[0] += 1.0
    try:
        check_adapters_consistent(model, values=True)
        out["diverged_values_error"] = None
    except MaskMismatchError as e:
        out["diverged_values_error"] = str(e)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--start-dir", required=True)
    parser.add_argument("--runs", required=True, help="strategy:start,... or 'mismatch'")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher adds it
    args = parser.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    if any(r.split(":")[0] in ZERO_CONFIGS for r in runs):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")

        unlink_shm_buffer()  # DeepSpeed never removes its CPU all-reduce buffer's name
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    record: dict = {"rank": rank, "world_size": dist.get_world_size(), "runs": []}
    try:
        for item in runs:
            if item == "mismatch":
                record["mismatch"] = mismatch_checks()
            else:
                strategy, start = item.split(":")
                record["runs"].append(run(strategy, start, args))
    except BaseException:
        record["error"] = traceback.format_exc()
        raise
    finally:
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
