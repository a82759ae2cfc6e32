"""Peak memory and step time of a SHiRA training step with and without activation checkpointing
(training.gradient_checkpointing), on bench_train.py's model, each setting in its own process.

    python benchmarks/bench_checkpointing.py                     # bench_train.py's default model
    python benchmarks/bench_checkpointing.py --batch 8 --seq 512
    python benchmarks/bench_checkpointing.py --device cuda --hidden 2048 --inter 5632 --seq 2048

The model: a random-init Llama (--hidden 1024, --inter 2816, --layers 4, --vocab 8000, batch 4 x
seq 256 by default, as bench_train.py), SHiRA r=32 on the 7 projections, AdamW, fp32. With
checkpointing, transformers' own switch (activation_checkpointing_enable, non-reentrant: what
the job turns on) recomputes each decoder layer in backward. Memory: on the CPU the process's
peak RSS, and its rise during training over the RSS after the model and one forward without
autograd (activations, gradients and AdamW's small moments are the difference); on CUDA
torch.cuda.max_memory_allocated. Prints one table; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _measure(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shira_dist import ShiraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      vocab_size=args.vocab, max_position_embeddings=args.seq)
    with torch.device(args.device):
        base = LlamaForCausalLM(cfg)
    if args.checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, ShiraConfig(r=32, target_modules=TARGETS, random_seed=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model.train()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated() / 2**20
    else:
        before = _rss_mb()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else _rss_mb()
    return {"peak_mb": peak, "rise_mb": peak - before, "step_s": statistics.median(times[1:] or times),
            "loss": float(loss)}


def main() -> None:
    from bench_train import add_model_arguments  # this folder is on sys.path when run as a script

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)  # the worker's setting
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_measure(args)))
        return
    rows = {}
    for checkpointing in (False, True):
        cmd = [sys.executable, __file__, "--worker", *sys.argv[1:]] + (["--checkpointing"] if checkpointing else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[checkpointing] = json.loads(out.strip().splitlines()[-1])
    what = "peak GPU MB (max_memory_allocated)" if args.device == "cuda" else "peak RSS MB"
    print(f"Llama hidden {args.hidden}, inter {args.inter}, {args.layers} layers, vocab {args.vocab}; batch "
          f"{args.batch} x seq {args.seq}; SHiRA r=32, AdamW, fp32, {args.device}, {args.threads} threads; "
          f"median of {args.steps - 1} steps after one\n")
    print(f"| activation checkpointing | {what} | rise during training MB | step s | loss after last step |")
    print("|---|---|---|---|---|")
    for checkpointing, r in rows.items():
        print(f"| {'on' if checkpointing else 'off'} | {r['peak_mb']:,.0f} | {r['rise_mb']:,.0f} | {r['step_s']:.2f} | "
              f"{r['loss']:.6f} |")
    off, on = rows[False], rows[True]
    print(f"\nsaved: {off['peak_mb'] - on['peak_mb']:,.0f} MB of the peak ({1 - on['rise_mb'] / off['rise_mb']:.0%} of "
          "the training rise); the step times come from two processes one after the other (on a shared CPU, "
          "compare them only over repeated runs)")


if __name__ == "__main__":
    main()
