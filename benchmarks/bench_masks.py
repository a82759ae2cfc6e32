"""Mask creation time and peak memory per mask type, each measured in its own process.

    python benchmarks/bench_masks.py

Data-free types (random, struct, weight_magnitude) on one 4096x14336 layer; the data-driven
types (gradient, snip) calibrate the benchmark Llama (hidden 1024, inter 2816, 4 layers,
vocab 8000, 7 projections, r=32) on 2 batches of 4x256 tokens. PEFT's random mask is timed
beside them. Peak memory is the growth of peak RSS during the call. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DATA_FREE = ["peft_random", "random", "struct", "weight_magnitude"]
DATA_DRIVEN = ["gradient", "snip"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(kind: str, threads: int) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    if kind in DATA_FREE:
        layer = nn.Linear(14336, 4096, bias=False)
        if kind == "peft_random":
            from peft.tuners.shira.mask_functions import random_mask as fn
        else:
            from shira_dist import MASK_FUNCTIONS

            fn = MASK_FUNCTIONS[kind]
        before = _rss_mb()
        t = time.perf_counter()
        mask = fn(layer, 32, random_seed=0)
        secs = time.perf_counter() - t
        nnz = int(mask._nnz()) if mask.is_sparse else int(mask.count_nonzero())
        return {"kind": kind, "what": "one 4096x14336 layer", "seconds": secs, "peak_mb": _rss_mb() - before, "nnz": nnz}

    from transformers import LlamaConfig, LlamaForCausalLM

    from shira_dist import ShiraConfig, calibrate_masks

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                         num_attention_heads=16, num_key_value_heads=16, vocab_size=8000))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 8000, (4, 256), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    before = _rss_mb()
    t = time.perf_counter()
    idx = calibrate_masks(model, ShiraConfig(r=32, target_modules=TARGETS, mask_type=kind), batches)
    secs = time.perf_counter() - t
    return {"kind": kind, "what": "benchmark Llama, 2 batches 4x256", "seconds": secs,
            "peak_mb": _rss_mb() - before, "nnz": sum(int(i.shape[1]) for i in idx.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.threads)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print(f"mask creation, {args.threads} threads, r=32\n")
    print("| mask type | measured on | seconds | peak RSS growth MB | nnz |")
    print("|---|---|---|---|---|")
    for kind in DATA_FREE + DATA_DRIVEN:
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--threads", str(args.threads)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['kind']} | {r['what']} | {r['seconds']:.3f} | {r['peak_mb']:.0f} | {r['nnz']:,d} |")


if __name__ == "__main__":
    main()
