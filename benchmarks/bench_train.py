"""Training-step, inference and adapter-switch cost, side by side, each configuration in its own process.

    python benchmarks/bench_train.py                      # the issue's model, 2 threads
    python benchmarks/bench_train.py --hidden 2048 --inter 5632
    python benchmarks/bench_train.py --device cuda --dtype bf16 --hidden 4096 --inter 11008 --seq 1024
    python benchmarks/bench_train.py --compile --configs floor shira_dist_default shira_dist_fused shira_dist_unfused

Configurations: frozen-base floor (forward + backward through activations only), PEFT LoRA,
PEFT SHiRA, full fine-tuning of the targeted weights, shira_dist in its default mode (random
mask; fp32 training forwards run fused), the same with ``AdamW(fused=True)`` (the HF
Trainer's default optimizer), shira_dist unfused (random), shira_dist struct mask (default
mode), all r=32 on the 7 Llama projections, AdamW (torch's default implementation unless
named); on request, shira_dist in "fused" mode (the default mode's eager run, but fused also
when compiled, where "auto" runs unfused). Each shira_dist row says the mode its training and inference really ran in
(inference, autograd off, runs unfused in every mode). Prints one table of medians and
ratios; nothing here is asserted.
Step time is compared with the floor's process, which stays up while each configuration runs:
their steps alternate one by one (only one process computes at a time), and "step / floor" is
the median of the per-pair ratios, so drifting machine speed hits both sides of each ratio.
Inference (one sequence of --infer-tokens) is compared with the same model's adapters
disabled, in alternating blocks inside one process. At most two models are in memory at once
(three with ``--compile``).
With ``--compile`` each configuration also trains through ``torch.compile(model)`` in a process
of its own, whose steps join the alternation; a second table gives its first step (compiling
included, from an empty inductor cache) and its step time against the same configuration's eager
process (median of per-round ratios).
With ``--device cuda`` every time is taken after ``torch.cuda.synchronize()`` and the memory
column is the peak of ``torch.cuda.max_memory_allocated`` (model, optimizer, activations)
instead of the process's peak RSS. Uses only public APIs (transformers, peft, shira_dist).
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
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
CONFIGS = ["floor", "peft_lora", "peft_shira", "full_ft", "shira_dist_default", "shira_dist_default_fused_adamw",
           "shira_dist_unfused", "shira_dist_struct"]
EXTRA_CONFIGS = ["shira_dist_fused"]  # run when named in --configs


def _build(args, name):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      vocab_size=args.vocab, max_position_embeddings=args.seq)
    with torch.device(args.device):  # initialised where it runs: a GPU builds a 1B model in a second
        model = LlamaForCausalLM(cfg).to(getattr(torch, DTYPES[args.dtype]))
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
    model.set_fuse_mode({"shira_dist_unfused": "unfused", "shira_dist_fused": "fused"}.get(name, "auto"))
    return model


def _median_time(fn, steps, sync=None):
    """Median wall time of ``steps`` calls of fn; ``sync`` (e.g. torch.cuda.synchronize) runs
    before the clock starts and before it stops, so queued GPU work is counted."""
    times = []
    for _ in range(steps):
        if sync is not None:
            sync()
        t = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _paired_inference(model, fwd, merge, unmerge, rounds: int, steps: int, sync=None) -> dict:
    """Inference with the adapter (unmerged, then merged) against the same model with its
    adapters disabled, in alternating blocks in one process, so machine noise hits all three
    alike. Each block: one untimed forward (a mode change settles there), then ``steps`` timed.
    Returns median latencies and the medians over rounds of each round's ratios unmerged / base
    and merged / base."""
    base, unmerged, merged = [], [], []
    for _ in range(rounds):
        with model.disable_adapter():
            fwd()
            base.append(_median_time(fwd, steps, sync))
        fwd()
        unmerged.append(_median_time(fwd, steps, sync))
        merge()
        fwd()
        merged.append(_median_time(fwd, steps, sync))
        unmerge()
    return {"infer_base_s": statistics.median(base), "infer_unmerged_s": statistics.median(unmerged),
            "infer_ratio": statistics.median(u / b for u, b in zip(unmerged, base)),
            "infer_merged_ratio": statistics.median(m / b for m, b in zip(merged, base))}


class _Job:
    """One configuration's model, optimizer and batch, built in this (worker) process."""

    def __init__(self, args, name: str):
        import torch

        torch.set_num_threads(args.threads)
        self.args, self.name = args, name
        self.sync = torch.cuda.synchronize if args.device == "cuda" else None
        self.model = _build(args, name)
        self.forward = torch.compile(self.model) if args.compiled else self.model
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        fused_adamw = name.endswith("_fused_adamw")  # what the HF Trainer builds by default
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=fused_adamw or None) if self.params else None
        self.model.train()
        self.first_step_s = self.step()  # warm-up (compiling, with --compile)
        if args.compiled:
            self.step()  # a guard that changes after the first step (e.g. "fused" mode) recompiles here

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        if self.sync is not None:
            self.sync()
        t = time.perf_counter()
        x = self.model.get_input_embeddings()(self.ids).detach().requires_grad_(True)  # the floor still
        loss = self.forward(inputs_embeds=x, labels=self.ids).loss                      # back-propagates
        loss.backward()                                                                  # through every layer
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.sync is not None:
            self.sync()
        return time.perf_counter() - t

    def finish(self) -> dict:
        """Peak RSS of the training so far, then inference, switching and the adapter file."""
        import torch

        args, model, name = self.args, self.model, self.name
        peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        res = {"name": name, "trainable": sum(p.numel() for p in self.params), "peak_mb": peak}
        if name.startswith("shira_dist"):  # the mode training really ran in ("auto" trains bf16 unfused)
            import shira_dist

            fused = {m.fused for m in model.modules() if isinstance(m, shira_dist.ShiraLinear)}
            res["mode"] = "fused" if fused == {True} else "unfused" if fused == {False} else "mixed"
            res["mode"] += " training" if args.compiled else " training, unfused inference"
        if args.compiled:  # compiled training only
            return res
        model.eval()
        small = self.ids[:1, :args.infer_tokens]
        with torch.no_grad():
            fwd = lambda: model(small)  # noqa: E731
            if name not in ("floor", "full_ft"):
                if name == "peft_lora" or name == "peft_shira":
                    merge, unmerge = model.base_model.merge_adapter, model.base_model.unmerge_adapter
                else:
                    merge, unmerge = model.merge_adapter, model.unmerge_adapter
                res.update(_paired_inference(model, fwd, merge, unmerge, args.infer_rounds, args.infer_steps,
                                             self.sync))
                res["switch_s"] = _median_time(lambda: (merge(), unmerge()), 3, self.sync)
                with tempfile.TemporaryDirectory() as d:
                    model.save_pretrained(d)
                    res["adapter_mb"] = os.path.getsize(os.path.join(d, "adapter_model.safetensors")) / 2**20
        return res


def serve(args, name: str) -> None:
    """Worker: build the job, then answer "step" (prints the step's time) and "finish" (prints
    the results and exits), one JSON line per command on stdout."""
    job = _Job(args, name)
    print(json.dumps({"ready": name, "first_step_s": job.first_step_s}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(json.dumps({"step_s": job.step()}), flush=True)
        elif line.strip() == "finish":
            print(json.dumps(job.finish()), flush=True)
            return
        else:
            raise SystemExit(f"unknown command {line.strip()!r}")


class _Worker:
    """A configuration in its own process, driven one command at a time (the others wait idle)."""

    def __init__(self, args, name: str, env: dict, compiled: bool = False):
        cmd = [sys.executable, __file__, "--serve", name] + (["--compiled"] if compiled else [])
        for key in _SIZES:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        self.name = name + (" (compiled)" if compiled else "")
        self.log = tempfile.TemporaryFile(mode="w+")  # the worker's stderr, shown if it fails
        self.cache = tempfile.TemporaryDirectory() if compiled else None  # compiles from nothing cached
        if self.cache is not None:
            env = {**env, "TORCHINDUCTOR_CACHE_DIR": self.cache.name}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.first_step_s = self._read()["first_step_s"]  # "ready": built and warmed up

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.log.seek(0)
                sys.exit(f"{self.name} failed (exit code {self.proc.returncode}):\n{self.log.read()[-3000:]}")
            if line.startswith("{"):
                return json.loads(line)
            sys.stderr.write(f"[{self.name}] {line}")  # a library's own print, not an answer

    def _ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def step(self) -> float:
        return self._ask("step")["step_s"]

    def finish(self) -> dict:
        res = self._ask("finish")
        self.proc.wait()
        self.log.close()
        if self.cache is not None:
            self.cache.cleanup()
        return res


_SIZES = ["hidden", "inter", "layers", "vocab", "batch", "seq", "r", "steps", "infer_steps", "infer_rounds",
          "infer_tokens", "threads", "device", "dtype"]


def _alternate(workers: list[_Worker], steps: int) -> list[list[float]]:
    """``steps`` rounds, each stepping every worker once (one process computes at a time), the
    order rotated every round; returns each worker's step times."""
    times = [[] for _ in workers]
    for i in range(steps):
        first = i % len(workers)
        for j in [*range(first, len(workers)), *range(first)]:
            times[j].append(workers[j].step())
    return times


def _ratio(times: list[float], reference: list[float]) -> float:
    """Median of the per-round ratios."""
    return statistics.median(t / r for t, r in zip(times, reference))


def measure(args, env: dict) -> list[dict]:
    """Every configuration's results. With the floor among them, the floor's process stays up
    and each configuration's steps alternate with floor steps (order rotated every round), so
    machine noise hits both alike; ``step_ratio`` is the median of the per-round ratios. With
    ``--compile`` a compiled process of each configuration (the floor's too) joins the rounds;
    its row has ``compiled``, ``first_step_s`` and ``eager_ratio`` (against the eager process)."""
    floor = _Worker(args, "floor", env) if "floor" in args.configs else None
    floor_times, rows = [], []
    for name in args.configs:
        if name == "floor" and not args.compile:
            continue
        eager = floor if name == "floor" else _Worker(args, name, env)
        workers = [eager] + ([_Worker(args, name, env, compiled=True)] if args.compile else [])
        paced = [floor] + workers if floor is not None and eager is not floor else workers
        if floor is not None:
            floor.step()  # untimed: the floor's caches were cold while the others were built
        times = dict(zip(paced, _alternate(paced, args.steps)))
        if floor is not None:
            floor_times += times[floor]
        for w in workers:
            if w is floor:
                continue
            row = w.finish()
            row["step_s"] = statistics.median(times[w])
            if floor is not None:
                row["step_ratio"] = _ratio(times[w], times[floor])
            if w is not eager:
                row.update(compiled=True, first_step_s=w.first_step_s, eager_step_s=statistics.median(times[eager]),
                           eager_ratio=_ratio(times[w], times[eager]))
            rows.append(row)
        print(f"  done {name}", file=sys.stderr)
    if floor is not None:
        if not floor_times:  # the floor alone
            floor_times = [floor.step() for _ in range(args.steps)]
        row = floor.finish()
        row.update(step_s=statistics.median(floor_times), step_ratio=1.0)
        rows.insert(0, row)
    return rows


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark model's shape and batch (shared with bench_checkpointing.py)."""
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (rounds with the floor)")
    ap.add_argument("--infer-steps", type=int, default=5, help="timed forwards per inference block")
    ap.add_argument("--infer-rounds", type=int, default=7, help="alternating base/unmerged/merged blocks")
    ap.add_argument("--infer-tokens", type=int, default=128, help="tokens of the 1-sequence inference forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's weights and activations")
    ap.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS + EXTRA_CONFIGS)
    ap.add_argument("--compile", action="store_true",
                    help="also train each configuration through torch.compile (its own process)")
    ap.add_argument("--serve", choices=CONFIGS + EXTRA_CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)  # the worker compiles
    args = ap.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no CUDA device here")
    if args.serve:
        serve(args, args.serve)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = measure(args, env)
    where = "CUDA" if args.device == "cuda" else f"{args.threads} threads"
    print(f"\nLlama hidden {args.hidden}, inter {args.inter}, {args.layers} layers, vocab {args.vocab}, {args.dtype}, "
          f"batch {args.batch}x{args.seq}, r={args.r} on 7 projections, AdamW, {where}\n")
    memory = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    print(f"| config | step s | step / floor | {memory} | infer / base | merged infer / base | merge+unmerge s | adapter MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("compiled"):
            continue
        ratio = f"{r['step_ratio']:.2f}x" if "step_ratio" in r else "-"
        inf = f"{r['infer_ratio']:.3f}x" if "infer_ratio" in r else "-"
        minf = f"{r['infer_merged_ratio']:.3f}x" if "infer_merged_ratio" in r else "-"
        sw = f"{r['switch_s']:.3f}" if "switch_s" in r else "-"
        mb = f"{r['adapter_mb']:.2f}" if "adapter_mb" in r else "-"
        label = r["name"] + (f" ({r['mode']})" if "mode" in r else "")
        print(f"| {label} | {r['step_s']:.3f} | {ratio} | {r['peak_mb']:.0f} | {inf} | {minf} | {sw} | {mb} |")
    if args.compile:
        _print_compiled(rows)


def _print_compiled(rows: list[dict]) -> None:
    """The compiled processes against their eager twins (first step: compiling included)."""
    print("\n| config, torch.compile | first step s (compiling) | eager step s | compiled step s | compiled / eager |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r.get("compiled"):
            label = r["name"] + (f" ({r['mode']})" if "mode" in r else "")
            print(f"| {label} | {r['first_step_s']:.1f} | {r['eager_step_s']:.3f} | {r['step_s']:.3f} | "
                  f"{r['eager_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
