"""Many adapters: switching a fused model between adapters, and mixed batches.

    python benchmarks/bench_adapters.py [--threads 2] [--rounds 7]

Switching: one adapter written into the weights, then the next (unmerge + merge), median over
rounds, side by side in one process for
  - one 4096x4096 and one 4096x14336 linear layer (r=32, the paper's per-tensor comparison),
  - the benchmark Llama (hidden 1024, inter 2816, 4 layers, r=32 on all 7 projections),
  - two decoder layers shaped like Llama-3-8B's (hidden 4096, inter 14336, 8 KV heads), whose
    switch is 1/16 of the whole 8B model's,
for shira_dist (``switch_adapter``: W0 back at the old entries, the new ones written), PEFT LoRA (merge_adapter /
unmerge_adapter: a dense W += B@A and back) and PEFT SHiRA (merge_adapter / unmerge_adapter).

Mixed batches: 8 sequences of 128 tokens, each with its own of 4 adapters, through the benchmark
Llama under torch.no_grad(): one forward with ``adapter_names=`` against looping over the
adapters (set_adapter + a forward of that adapter's rows), for shira_dist and PEFT LoRA.
Prints ratios; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _median(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                        num_attention_heads=16, num_key_value_heads=16, vocab_size=8000)).eval()


def _llama_8b_slice():
    """Two decoder layers shaped like Llama-3-8B's (hidden 4096, MLP 14336, 8 KV heads): the
    per-model switch of a 7-8B model is 32 of these layer pairs' worth of the same tensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=1000)).eval()


def _two_adapters(method: str, model, targets):
    """The model with adapters "a" and "b" (random values), and a switch function a <-> b."""
    import peft
    import torch

    import shira_dist

    if method == "shira_dist":
        m = shira_dist.get_peft_model(model, shira_dist.ShiraConfig(r=32, target_modules=targets, random_seed=0,
                                                                    init_weights=False), adapter_name="a")
        m.add_adapter("b", shira_dist.ShiraConfig(r=32, target_modules=targets, random_seed=1, init_weights=False))
        tuner = m
    else:
        cfg = {"peft_lora": lambda s: peft.LoraConfig(r=32, lora_alpha=32, target_modules=targets, init_lora_weights=False),
               "peft_shira": lambda s: peft.ShiraConfig(r=32, target_modules=targets, random_seed=s,
                                                        init_weights=False)}[method]
        m = peft.get_peft_model(model, cfg(0), adapter_name="a")
        m.add_adapter("b", cfg(1))
        tuner = m.base_model
    state = {"current": "a"}
    m.set_adapter("a")
    tuner.merge_adapter() if method == "shira_dist" else tuner.merge_adapter(["a"])

    def switch() -> None:
        nxt = "b" if state["current"] == "a" else "a"
        with torch.no_grad():
            if method == "shira_dist":
                m.switch_adapter(nxt)  # W0 back at a's entries, b's written: one scatter each
            else:
                tuner.unmerge_adapter()
                m.set_adapter(nxt)
                tuner.merge_adapter([nxt])
        state["current"] = nxt

    return switch


def bench_switch(rounds: int) -> list[dict]:
    import torch
    from torch import nn

    rows = []
    for what, build, targets in (
            ("one 4096x4096 tensor", lambda: nn.Sequential(nn.Linear(4096, 4096, bias=False)), ["0"]),
            ("one 4096x14336 tensor", lambda: nn.Sequential(nn.Linear(14336, 4096, bias=False)), ["0"]),
            ("benchmark Llama (hidden 1024, 28 tensors)", _llama, TARGETS),
            ("Llama-3-8B-shaped, 2 layers (14 tensors)", _llama_8b_slice, TARGETS)):
        times = {}
        for method in ("shira_dist", "peft_lora", "peft_shira"):
            torch.manual_seed(0)
            times[method] = _median(_two_adapters(method, build(), targets), rounds)
        rows.append({"what": what, **times})
    return rows


def bench_mixed(rounds: int) -> list[dict]:
    import peft
    import torch

    import shira_dist

    names = ["a", "b", "c", "d"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8000, (8, 128), generator=g)
    per_row = [names[i % 4] for i in range(8)]
    rows = []
    for method in ("shira_dist", "peft_lora"):
        if method == "shira_dist":
            m = shira_dist.get_peft_model(_llama(), shira_dist.ShiraConfig(r=32, target_modules=TARGETS, random_seed=0,
                                                                           init_weights=False), adapter_name="a")
            for i, n in enumerate(names[1:], 1):
                m.add_adapter(n, shira_dist.ShiraConfig(r=32, target_modules=TARGETS, random_seed=i, init_weights=False))
        else:
            m = peft.get_peft_model(_llama(), peft.LoraConfig(r=32, target_modules=TARGETS, init_lora_weights=False),
                                    adapter_name="a")
            for n in names[1:]:
                m.add_adapter(n, peft.LoraConfig(r=32, target_modules=TARGETS, init_lora_weights=False))
        m.eval()

        def mixed() -> None:
            with torch.no_grad():
                m(ids, adapter_names=per_row)

        def loop() -> None:
            with torch.no_grad():
                for n in names:
                    m.set_adapter(n)
                    m(ids[[i for i, x in enumerate(per_row) if x == n]])

        rows.append({"method": method, "mixed": _median(mixed, rounds), "loop": _median(loop, rounds)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"\nSwitching a fused model between two adapters (unmerge + merge), r=32, median of {args.rounds}, "
          f"{args.threads} threads\n")
    print("| what | shira_dist s | PEFT LoRA s | PEFT SHiRA s | LoRA / shira_dist | PEFT SHiRA / shira_dist |")
    print("|---|---|---|---|---|---|")
    for r in bench_switch(args.rounds):
        print(f"| {r['what']} | {r['shira_dist']:.4f} | {r['peft_lora']:.4f} | {r['peft_shira']:.4f} | "
              f"{r['peft_lora'] / r['shira_dist']:.1f}x | {r['peft_shira'] / r['shira_dist']:.1f}x |")
    print("\nMixed batch: 8x128 tokens, 4 adapters, benchmark Llama, no grad\n")
    print("| method | one batch, adapter_names= s | loop over adapters s | loop / mixed |")
    print("|---|---|---|---|")
    for r in bench_mixed(args.rounds):
        print(f"| {r['method']} | {r['mixed']:.3f} | {r['loop']:.3f} | {r['loop'] / r['mixed']:.2f}x |")


if __name__ == "__main__":
    main()
