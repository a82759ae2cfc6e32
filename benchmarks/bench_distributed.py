"""Per-rank peak memory, step time and collective traffic: 1 vs 2 processes under each engine.

    python benchmarks/bench_distributed.py                       # the issue's model, everything
    python benchmarks/bench_distributed.py --strategies zero3 --methods shira_dist peft_lora

Model: Llama hidden 1024, intermediate 2816, 4 layers, vocab 8000, fp32, random init;
global batch 4x256 tokens per step (each of W ranks takes 4/W rows); r=32 on all 7
projections; AdamW. Methods: shira_dist (SHiRA, random mask), PEFT SHiRA, PEFT LoRA, under
the same engine config: ddp, fsdp2 (fully_shard per decoder layer + root), zero2, zero3 and
zero3_offload (configs/deepspeed/*.json, ZeRO-3 tuned), zero3_default (DeepSpeed's default
stage-3 settings). Every (strategy, method, world size) runs in its own torchrun job; each
process uses cores/W threads so 1 and 2 processes share the same cores. Per rank:
  peak RSS       ru_maxrss of the process (model construction included: every rank builds
                 the whole model before the engine shards it)
  train RSS      highest RSS sampled (5 ms) while training steps run
  train private  highest anonymous resident memory (RssAnon) sampled alongside: RSS without the
                 file-backed pages (library code, shared by the ranks of a node), i.e. the memory
                 the rank itself allocated
  built/wrapped  RSS after building the model, and after the engine took it
  index          bytes of SHiRA indices the rank holds (shira_dist: the CSR buffers, 2 bytes
                 per entry plus one int32 per row; PEFT SHiRA: its (2, nnz) int32 indices; both
                 whole on every rank; LoRA: none)
  step           median wall time of the timed steps
  reduced        bytes through all-reduce / reduce-scatter per step (gradient traffic)
  gathered       bytes through all-gather per step (sharded weights re-assembled)
By default each job runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc's adaptive threshold
otherwise serves big activation buffers from the heap, where freed ones fragment and RSS grows
for several steps (measured: +750 MB per rank after 4 steps of ZeRO-3, for every method), so
RSS would measure the allocator more than the program. ``--malloc default`` keeps glibc's.
Nothing is asserted. Uses public APIs only (transformers, peft, deepspeed, shira_dist).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for tools/

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STRATEGIES = ["ddp", "fsdp2", "zero2", "zero3", "zero3_offload", "zero3_default"]
METHODS = ["shira_dist", "peft_shira", "peft_lora"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO_FILES = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json",
              "zero3_default": None}


class RssSampler:
    """Highest resident set size, and highest anonymous (private) resident memory, seen while
    running (a 5 ms polling thread)."""

    def __init__(self) -> None:
        self.peak = 0
        self.peak_private = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def private() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self.peak_private = max(self.peak_private, self.private())
            time.sleep(0.005)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _build(args, method: str):
    """The method's model; with --zero-init under ZeRO-3 the base is built partitioned
    (``deepspeed.zero.Init``: no rank ever holds the whole model) before adapters are added."""
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      vocab_size=args.vocab, max_position_embeddings=args.seq)
    partitioned = contextlib.nullcontext()
    if args.zero_init and args.strategy.startswith("zero3"):
        import deepspeed

        partitioned = deepspeed.zero.Init(config_dict_or_path=_zero_config(args.strategy, args.batch))
    with partitioned:
        base = LlamaForCausalLM(cfg)
    if method == "shira_dist":
        import shira_dist

        return shira_dist.get_peft_model(base, shira_dist.ShiraConfig(r=args.r, target_modules=TARGETS, random_seed=0))
    import peft

    pc = (peft.LoraConfig(r=args.r, lora_alpha=args.r, target_modules=TARGETS) if method == "peft_lora"
          else peft.ShiraConfig(r=args.r, target_modules=TARGETS, random_seed=0))
    return peft.get_peft_model(base, pc)


def _zero_config(strategy: str, micro_batch: int) -> dict:
    from shira_dist.distributed import deepspeed_config

    name = ZERO_FILES[strategy]
    base = (os.path.join(REPO, "configs", "deepspeed", name) if name else
            {"zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    return deepspeed_config(base, micro_batch_size=micro_batch)


def _wrap(strategy: str, method: str, model, micro_batch: int):
    """(engine, optimizer or None if the engine steps itself)."""
    import torch
    import torch.distributed as dist

    from shira_dist import distributed as sd

    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, forward_sync_buffers=False)
        from tools.traffic import route_ddp_through_python

        route_ddp_through_python(ddp)  # so count_collectives sees its all-reduces
        return ddp, torch.optim.AdamW(trainable(model), lr=1e-4)
    if strategy == "fsdp2":
        if method == "shira_dist":
            sd.shard_fsdp2(model)
        else:  # the same units for PEFT models: each decoder layer, then the root
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for layer in model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(trainable(model), lr=1e-4)
    cfg = _zero_config(strategy, micro_batch)
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    if method == "shira_dist":
        engine, _, _ = sd.deepspeed_initialize(model, cfg, optimizer=opt)
    else:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, None


def _index_bytes(model, method: str) -> int:
    if method == "shira_dist":
        from shira_dist.distributed import unwrap_shira_model

        return sum(t.numel() * t.element_size() for _, layer in unwrap_shira_model(model).shira_layers()
                   for t in layer.shira_indices.buffers())
    return sum(t.numel() * t.element_size() for m in model.modules()
               if isinstance(getattr(m, "shira_indices", None), dict)
               for t in m.shira_indices.values())  # PEFT SHiRA's per-layer dict; LoRA has none


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.strategy.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    import torch.distributed as dist

    from shira_dist.distributed import data_parallel_slice
    from tools.traffic import count_collectives, trainable_bytes

    rank, world = dist.get_rank(), dist.get_world_size()
    # Every method's process loads the same libraries before building the model, so RSS compares
    # the methods, not their imports: importing peft alone adds ~130 MB of resident pages here,
    # and imported after the model is built it lands in heap the model's construction had freed.
    import peft  # noqa: F401
    import shira_dist  # noqa: F401

    model = _build(args, args.method)
    adapter_bytes = trainable_bytes(model)
    built_rss = RssSampler.rss()
    engine, opt = _wrap(args.strategy, args.method, model, args.batch // world)
    wrapped_rss = RssSampler.rss()
    index_bytes = _index_bytes(model, args.method)
    rows = data_parallel_slice(args.batch, rank, world)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)[rows]
    engine.train()

    def step() -> None:
        loss = engine(input_ids=ids, labels=ids).loss
        if opt is None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    with RssSampler() as sampler:
        with count_collectives() as counts:
            step()  # warm-up, also counts one step's traffic
        times = []
        for _ in range(args.steps):
            dist.barrier()
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    res = {"rank": rank, "world": world, "step_s": statistics.median(times),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "train_rss_mb": sampler.peak / 2**20, "train_private_mb": sampler.peak_private / 2**20,
           "built_rss_mb": built_rss / 2**20,
           "wrapped_rss_mb": wrapped_rss / 2**20, "reduced_b": counts.gradient_bytes,
           "gathered_b": counts.bytes.get("all_gather", 0), "adapter_b": adapter_bytes, "index_b": index_bytes}
    print("RESULT " + json.dumps(res), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _failure(text: str) -> str:
    """The last exception line a failed job printed (what the table shows for it)."""
    lines = [ln.split("]: ", 1)[-1].strip() for ln in text.splitlines() if "Error:" in ln]
    return lines[-1][:160] if lines else "see stderr"


def launch(args, strategy: str, method: str, world: int) -> list[dict] | str:
    """Each rank's result, sorted by rank, or the reason the job failed."""
    threads = max(1, args.cores // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))}
    if args.malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), os.path.abspath(__file__), "--worker"]
    # The job's sizes travel in the environment: torchrun's own parser would take --r for --rdzv-*.
    spec = {key: getattr(args, key) for key in ("hidden", "inter", "layers", "vocab", "batch", "seq", "r", "steps",
                                                "zero_init")}
    env["BENCH_DISTRIBUTED_JOB"] = json.dumps({**spec, "strategy": strategy, "method": method, "threads": threads})
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    # Ranks print at the same time: two results may share a line, so decode from each marker.
    decoder = json.JSONDecoder()
    results = [decoder.raw_decode(chunk)[0] for chunk in out.stdout.split("RESULT ")[1:]]
    if out.returncode != 0 or len(results) != world:
        tail = (out.stdout + out.stderr)[-2500:]
        print(f"  {strategy}/{method}/{world}: FAILED (exit {out.returncode})\n{tail}", file=sys.stderr)
        return _failure(out.stdout + out.stderr)
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in (("hidden", 1024), ("inter", 2816), ("layers", 4), ("vocab", 8000), ("batch", 4),
                         ("seq", 256), ("r", 32), ("steps", 2), ("cores", 2)):
        ap.add_argument(f"--{key}", type=int, default=default)
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--malloc", choices=["mmap", "default"], default="mmap",
                    help="mmap: MALLOC_MMAP_THRESHOLD_=65536 (RSS = live memory); default: glibc's adaptive")
    ap.add_argument("--zero-init", action="store_true",
                    help="under zero3*: build the base partitioned (deepspeed.zero.Init), as transformers does for "
                         "a ZeRO-3 run, instead of whole on every rank")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(argparse.Namespace(**json.loads(os.environ["BENCH_DISTRIBUTED_JOB"])))
        return
    rows = []
    for strategy in args.strategies:
        for method in args.methods:
            for world in args.worlds:
                began = time.perf_counter()
                results = launch(args, strategy, method, world)
                print(f"  done {strategy} {method} world={world} ({time.perf_counter() - began:.0f} s)",
                      file=sys.stderr, flush=True)
                rows.append((strategy, method, world, results))
    print(f"\nLlama hidden {args.hidden}, inter {args.inter}, {args.layers} layers, vocab {args.vocab}, fp32; "
          f"global batch {args.batch}x{args.seq}; r={args.r} on 7 projections; AdamW; {args.cores} cores shared "
          f"by the ranks; 1 warm-up + {args.steps} timed steps; malloc: {args.malloc}; "
          f"{'zero3 base built partitioned (zero.Init); ' if args.zero_init else ''}per-rank values are the "
          f"max over ranks\n")
    print("| strategy | method | ranks | peak RSS MB/rank | train RSS MB/rank | train private MB/rank "
          "| RSS built / wrapped MB | step s | reduced MB/step/rank | gathered MB/step/rank | trainable MB "
          "| index MB/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for strategy, method, world, res in rows:
        if isinstance(res, str):
            print(f"| {strategy} | {method} | {world} | fails: {res} |" + " |" * 8)
            continue
        mb = lambda key: max(r[key] for r in res) / 2**20  # noqa: E731
        print(f"| {strategy} | {method} | {world} | {max(r['peak_rss_mb'] for r in res):.0f} | "
              f"{max(r['train_rss_mb'] for r in res):.0f} | {max(r['train_private_mb'] for r in res):.0f} | "
              f"{max(r['built_rss_mb'] for r in res):.0f} / "
              f"{max(r['wrapped_rss_mb'] for r in res):.0f} | {max(r['step_s'] for r in res):.2f} | "
              f"{mb('reduced_b'):.2f} | {mb('gathered_b'):.1f} | {res[0]['adapter_b'] / 2**20:.2f} | "
              f"{mb('index_b'):.2f} |")


if __name__ == "__main__":
    main()
