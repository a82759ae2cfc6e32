"""Sample packing (task.packing) against one example per row: training tokens/s and padding waste.

    python benchmarks/bench_packing.py                         # rotten tomatoes, SmolLM2 tokenizer
    python benchmarks/bench_packing.py --max-length 512 --rows 8 --examples 32

The data: the job's own rotten_tomatoes preparation, rendered as the causal-LM task
"Review: {text}\\nSentiment:" + " {label}" + eos by the SmolLM2-135M-Instruct tokenizer (the
packaged model, converted once into the shira_dist cache by any job that used it, or here).
The model: a random-init Llama with SmolLM2's vocabulary (--hidden, --layers), SHiRA r=32
on the 7 projections, AdamW; one model, both sides take turns step by step in this process,
so machine drift hits both. Batches are built by the job's own functions: unpacked,
``--examples`` examples per micro-batch padded to the longest (collate); packed,
``--rows`` rows of up to --max-length tokens from packing.pack_examples (best-fit decreasing).

    tokens/s        real (non-padding) tokens per second of forward + backward + step
    padding waste   padded positions / all positions of the batches

Prints one table; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _examples(max_length: int) -> list[dict]:
    from transformers import AutoTokenizer

    from shira_dist.training.models import builtin_model_dir, default_cache_dir
    from shira_dist.training.prepare import prepare_data

    tok = AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m-instruct", default_cache_dir()))
    with tempfile.TemporaryDirectory() as d:
        train, _ = prepare_data("rotten_tomatoes", d)
        rows = [json.loads(line) for line in Path(train).read_text().splitlines()]
    out = []
    for row in rows:
        prompt = tok.encode(f"Review: {row['text']}\nSentiment:")
        response = tok.encode(f" {row['label']}") + [tok.eos_token_id]
        ids = (prompt + response)[:max_length]
        out.append({"input_ids": ids, "targets": ([-100] * len(prompt) + response)[:max_length]})
    return out


def _model(args, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shira_dist import ShiraConfig, get_peft_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                        num_key_value_heads=args.hidden // 64, vocab_size=vocab,
                                        max_position_embeddings=args.max_length))
    return get_peft_model(base, ShiraConfig(r=32, target_modules=TARGETS, random_seed=0))


def _waste(batches) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    return 1.0 - real / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-length", type=int, default=256, help="task.max_length: tokens per packed row")
    ap.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch")
    ap.add_argument("--examples", type=int, default=16, help="examples per unpacked micro-batch")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per side (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from shira_dist.training.batches import Objective, collate
    from shira_dist.training.packing import pack_examples

    torch.set_num_threads(args.threads)
    examples = _examples(args.max_length)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [examples[i] for i in order]
    rows = pack_examples(examples, args.max_length)
    rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()]
    sides = {
        "unpacked": [collate(examples[i:i + args.examples], 0, False)
                     for i in range(0, len(examples) - args.examples + 1, args.examples)],
        "packed": [collate(rows[i:i + args.rows], 0, False) for i in range(0, len(rows) - args.rows + 1, args.rows)],
    }
    model = _model(args, vocab=49152)
    objective = Objective.for_model("causal_lm", model.get_base_model(), None)  # as the job: the base's signature
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = {k: [] for k in sides}
    tokens = {k: [] for k in sides}
    for step in range(args.steps + 1):
        for name, batches in sides.items():
            batch = batches[step % len(batches)]
            t0 = time.perf_counter()
            loss, _ = objective(model, batch)
            (loss / objective.num_targets(batch)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            if step:  # the first step of each side warms up
                times[name].append(seconds)
                tokens[name].append(int(batch["attention_mask"].sum()))
    lengths = [len(e["input_ids"]) for e in examples]
    print(f"rotten_tomatoes train: {len(examples)} examples, {sum(lengths):,} tokens "
          f"(mean {statistics.mean(lengths):.1f}, max {max(lengths)}); packed into {len(rows)} rows of up to {args.max_length} "
          f"({sum(lengths) / (len(rows) * args.max_length):.1%} full)")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab 49152, SHiRA r=32; {args.threads} threads; "
          f"median of {args.steps} steps per side, alternating\n")
    print("| batches | per micro-batch | real tokens / step | step s | tokens/s | padding waste (all batches) |")
    print("|---|---|---|---|---|---|")
    rate = {}
    for name, batches in sides.items():
        per = f"{args.examples} examples" if name == "unpacked" else f"{args.rows} rows x <= {args.max_length}"
        step_s = statistics.median(times[name])
        rate[name] = sum(tokens[name]) / sum(times[name])
        print(f"| {name} | {per} | {statistics.median(tokens[name]):,.0f} | {step_s:.3f} | {rate[name]:,.0f} | "
              f"{_waste(batches):.1%} |")
    print(f"\npacked / unpacked tokens/s: {rate['packed'] / rate['unpacked']:.2f}x")


if __name__ == "__main__":
    main()
