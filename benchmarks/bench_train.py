"""Training-step, inference and adapter-switch cost, side by side, each configuration in its own process.

    python benchmarks/bench_train.py                      # the issue's model, 2 threads
    python benchmarks/bench_train.py --hidden 2048 --inter 5632

Configurations: frozen-base floor (forward + backward through activations only), PEFT LoRA,
PEFT SHiRA, full fine-tuning of the targeted weights, shira_dist fused (random mask, the
default mode), shira_dist unfused (random), shira_dist struct mask (fused), all r=32 on the
7 Llama projections, AdamW. Prints one table of medians and ratios; nothing here is asserted.
Step time is compared with the floor's process; inference (one sequence of --infer-tokens)
with the same model's adapters disabled, in alternating blocks inside one process.
Uses only public APIs (transformers, peft, shira_dist).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ["floor", "peft_lora", "peft_shira", "full_ft", "shira_dist_fused", "shira_dist_unfused",
           "shira_dist_struct"]


def _build(args, name):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      vocab_size=args.vocab, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg)
    if name in ("floor", "full_ft"):
        model.requires_grad_(False)
        if name == "full_ft":  # full fine-tuning of exactly the targeted weights
            for mod_name, mod in model.named_modules():
                if mod_name.rsplit(".", 1)[-1] in TARGETS:
                    mod.weight.requires_grad_(True)
        return model
    if name.startswith("peft_"):
        import peft

        pc = (peft.LoraConfig(r=args.r, lora_alpha=args.r, target_modules=TARGETS) if name == "peft_lora"
              else peft.ShiraConfig(r=args.r, target_modules=TARGETS, random_seed=0))
        return peft.get_peft_model(model, pc)
    import shira_dist

    mask_type = "struct" if name == "shira_dist_struct" else "random"
    model = shira_dist.get_peft_model(model, shira_dist.ShiraConfig(r=args.r, target_modules=TARGETS,
                                                                    mask_type=mask_type, random_seed=0))
    model.set_fuse_mode("unfused" if name == "shira_dist_unfused" else "auto")
    return model


def _median_time(fn, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _paired_inference(model, fwd, merge, unmerge, rounds: int, steps: int) -> dict:
    """Inference with the adapter (unmerged, then merged) against the same model with its
    adapters disabled, in alternating blocks in one process, so machine noise hits all three
    alike. Each block: one untimed forward (a mode change settles there), then ``steps`` timed.
    Returns median latencies and the ratios unmerged / base and merged / base."""
    base, unmerged, merged = [], [], []
    for _ in range(rounds):
        with model.disable_adapter():
            fwd()
            base.append(_median_time(fwd, steps))
        fwd()
        unmerged.append(_median_time(fwd, steps))
        merge()
        fwd()
        merged.append(_median_time(fwd, steps))
        unmerge()
    b = statistics.median(base)
    return {"infer_base_s": b, "infer_unmerged_s": statistics.median(unmerged),
            "infer_ratio": statistics.median(unmerged) / b, "infer_merged_ratio": statistics.median(merged) / b}


def run_one(args, name) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = _build(args, name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    embed = model.get_input_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step():
        x = embed(ids).detach().requires_grad_(True)  # the floor still back-propagates through every layer
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up
    res = {"name": name, "step_s": _median_time(step, args.steps),
           "trainable": sum(p.numel() for p in params)}
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.eval()
    small = ids[:1, :args.infer_tokens]
    with torch.no_grad():
        fwd = lambda: model(small)  # noqa: E731
        if name not in ("floor", "full_ft"):
            if name == "peft_lora" or name == "peft_shira":
                merge, unmerge = model.base_model.merge_adapter, model.base_model.unmerge_adapter
            else:
                merge, unmerge = model.merge_adapter, model.unmerge_adapter
            res.update(_paired_inference(model, fwd, merge, unmerge, args.infer_rounds, args.infer_steps))
            res["switch_s"] = _median_time(lambda: (merge(), unmerge()), 3)
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                res["adapter_mb"] = os.path.getsize(os.path.join(d, "adapter_model.safetensors")) / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--infer-steps", type=int, default=5, help="timed forwards per inference block")
    ap.add_argument("--infer-rounds", type=int, default=7, help="alternating base/unmerged/merged blocks")
    ap.add_argument("--infer-tokens", type=int, default=128, help="tokens of the 1-sequence inference forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    ap.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args, args.one)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = []
    for name in args.configs:
        sizes = ["hidden", "inter", "layers", "vocab", "batch", "seq", "r", "steps", "infer_steps", "infer_rounds",
                 "infer_tokens", "threads"]
        cmd = [sys.executable, __file__, "--one", name]
        for key in sizes:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  done {name}", file=sys.stderr)
    floor = next((r for r in rows if r["name"] == "floor"), None)
    print(f"\nLlama hidden {args.hidden}, inter {args.inter}, {args.layers} layers, vocab {args.vocab}, fp32, "
          f"batch {args.batch}x{args.seq}, r={args.r} on 7 projections, AdamW, {args.threads} threads\n")
    print("| config | step s | step / floor | peak RSS MB | infer / base | merged infer / base | merge+unmerge s | adapter MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['step_s'] / floor['step_s']:.2f}x" if floor else "-"
        inf = f"{r['infer_ratio']:.3f}x" if "infer_ratio" in r else "-"
        minf = f"{r['infer_merged_ratio']:.3f}x" if "infer_merged_ratio" in r else "-"
        sw = f"{r['switch_s']:.3f}" if "switch_s" in r else "-"
        mb = f"{r['adapter_mb']:.2f}" if "adapter_mb" in r else "-"
        print(f"| {r['name']} | {r['step_s']:.3f} | {ratio} | {r['peak_rss_mb']:.0f} | {inf} | {minf} | {sw} | {mb} |")


if __name__ == "__main__":
    main()
