"""One rank of ``tests/distributed/test_zero_init.py``: SHiRA adapters on a model built under ZeRO-3 zero.Init.

    torchrun --nproc_per_node 2 tests/distributed/dist/zero_init_worker.py MODEL_DIR OUT_DIR

Loads MODEL_DIR with transformers while a ZeRO-3 ``HfDeepSpeedConfig`` is alive (so the model is
built under ``deepspeed.zero.Init``: every weight partitioned from the start), adds adapters with
each shape- or weight-based mask type, and writes what it saw to OUT_DIR/rank<r>.pt: the
patterns, the modules_to_save copy, the parameter counts and the errors for what cannot work
on a partitioned model (merge, data-driven masks).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from shira_dist.distributed import unlink_shm_buffer  # noqa: E402
from tests.distributed.dist.harness import TARGETS  # noqa: E402

MASK_TYPES = ("random", "struct", "weight_magnitude")


def _error(fn) -> str:
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        return str(e)
    return ""


def main() -> None:
    import deepspeed
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import shira_dist

    model_dir, out_dir = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    unlink_shm_buffer()  # DeepSpeed never removes its CPU all-reduce buffer's name
    rank = torch.distributed.get_rank()
    keep = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})  # noqa: F841
    facts: dict = {"patterns": {}, "head": {}, "counts": {}}
    for mask_type in MASK_TYPES:
        base = LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True)
        weight = base.model.layers[0].self_attn.q_proj.weight
        facts["partitioned_numel"] = weight.numel()
        facts["full_shape"] = tuple(weight.ds_shape)
        cfg = shira_dist.ShiraConfig(r=2, target_modules=TARGETS, mask_type=mask_type, random_seed=0,
                                     modules_to_save=["lm_head"])
        model = shira_dist.get_peft_model(base, cfg)
        facts["patterns"][mask_type] = {name: layer.shira_indices["default"] for name, layer in model.shira_layers()}
        head = model.base_model.model.lm_head.modules_to_save["default"].weight
        facts["head"][mask_type] = (head.detach().clone(), hasattr(head, "ds_id"), head.requires_grad)
        facts["counts"][mask_type] = model.get_nb_trainable_parameters()
        if mask_type == "random":
            facts["merge_error"] = _error(model.merge_adapter)
    base = LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True)
    ids = torch.zeros(1, 4, dtype=torch.long)
    facts["calibration_error"] = _error(lambda: shira_dist.get_peft_model(
        base, shira_dist.ShiraConfig(r=2, target_modules=TARGETS, mask_type="gradient"),
        calibration_data=[{"input_ids": ids, "labels": ids}]))
    torch.save(facts, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
