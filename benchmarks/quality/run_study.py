"""SHiRA against LoRA at an equal budget on three small tasks, single-task and fused.

    python benchmarks/quality/run_study.py                        # the whole study, resumable
    python benchmarks/quality/run_study.py --quick                # 1 seed, 2 methods, tiny slice
    python benchmarks/quality/run_study.py [--cache runs/quality] [--seeds 0 1 2] [--methods ...]
                                           [--tasks ...] [--threads N]

SmolLM2-135M-Instruct (packaged, converted once) learns each task (tasks.py) by its next
token, with each method (methods.py) at the same budget on the same layers; every
(method, seed, task) cell trains one adapter, scores its held-out accuracy and saves it.
Then, per (method, seed), the task adapters are fused (summed) and each task is scored
again. Every cell is cached (cache.py), so a re-run computes only what is missing. Prints
and writes <cache>/tables.md: (a) single-task accuracy, time, memory; (b) fused accuracy and
the average drop; the paper's numbers beside ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import loop  # noqa: E402
import methods as M  # noqa: E402
import tables  # noqa: E402
from cache import Cache, read_json, save_dir_atomically, write_json, write_text  # noqa: E402
from tasks import TASKS  # noqa: E402


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2-135m-instruct"
    r: int = 8  # per targeted layer: r*(in+out) trained values (LoRA: rank r)
    # q/k/v/o and gate/up/down of the upper 6 of 30 layers: the backward pass stops there
    target_modules: str = r"model\.layers\.(2[4-9])\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    max_length: int = 56  # prompt tokens (the text is cut to fit)
    steps: int = 32
    batch_size: int = 8
    warmup: int = 3
    lr_shira: float = 2e-3
    lr_lora: float = 2e-3  # with lora_alpha = 2r
    eval_examples: int = 200  # per task, at most (topic holds 69)
    calibration_batches: int = 4  # SHiRA-Grad/SNIP score entries on the cell's first training batches
    eval_batch_size: int = 16
    loss: str = "vocab"  # "vocab": the job's CE over the vocabulary; "label_words": over the label words only


FULL = Settings()
QUICK = dataclasses.replace(FULL, steps=3, eval_examples=16, calibration_batches=1)
QUICK_METHODS = ["lora", "shira_wm_disjoint"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=None, help="cache directory (default runs/quality; --quick: runs/quality-quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    p.add_argument("--methods", nargs="+", default=None, choices=M.METHODS,
                   help=f"default all (--quick: {' '.join(QUICK_METHODS)})")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="check the pipeline end to end in a few minutes")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"override a setting (a new --cache is needed then): {[f.name for f in dataclasses.fields(Settings)]}")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads={args.threads}: must be at least 1")
    args.settings = override(QUICK if args.quick else FULL, args.set, p)
    args.cache = args.cache or ("runs/quality-quick" if args.quick else "runs/quality")
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.methods = args.methods or (QUICK_METHODS if args.quick else list(M.METHODS))
    args.tasks = [t for t in TASKS if t in args.tasks]  # the fixed order (non-overlapping masks follow it)
    return args


def override(settings: Settings, pairs: list[str], parser: argparse.ArgumentParser) -> Settings:
    """``KEY=VALUE`` pairs applied to ``settings``, each value parsed as its field's type."""
    known = {f.name: type(getattr(settings, f.name)) for f in dataclasses.fields(Settings)}
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            parser.error(f"--set {pair!r}: expected KEY=VALUE with KEY one of {sorted(known)}")
        try:
            changes[key] = known[key](value)
        except ValueError:
            parser.error(f"--set {pair!r}: {value!r} is not a valid {known[key].__name__}")
    if changes.get("loss", "vocab") not in ("vocab", "label_words"):
        parser.error(f"--set loss={changes['loss']!r}: allowed: vocab, label_words")
    return dataclasses.replace(settings, **changes)


def load_base(settings: Settings):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shira_dist.training.models import HFTokenizer, builtin_model_dir, default_cache_dir

    directory = builtin_model_dir(settings.model, default_cache_dir())
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    base.eval()  # dropout off
    base.requires_grad_(False)
    return base, HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.s = args, args.settings
        self.cache = Cache(args.cache)
        self.cache.check_settings(dataclasses.asdict(self.s))
        self.base, self.tok = load_base(self.s)
        self.train, self.eval, self.obj = {}, {}, {}
        for name in args.tasks:
            task = TASKS[name]
            train_rows, eval_rows = task.rows()
            self.train[name] = loop.encode(task, train_rows, self.tok, self.s.max_length)
            self.eval[name] = loop.encode(task, eval_rows[: self.s.eval_examples], self.tok, self.s.max_length)
            self.obj[name] = loop.objective(task, self.base, self.tok, self.s.max_length)
        self.budget = M.Budget(self.s.r, self.s.target_modules)

    def accuracy(self, model, task: str) -> float:
        return loop.accuracy(model, self.obj[task], self.eval[task], self.tok.pad_id, self.s.eval_batch_size)

    def base_cell(self, task: str) -> None:
        if read_json(self.cache.base(task)) is not None:
            return
        with loop.measured() as m:
            acc = self.accuracy(self.base, task)
        write_json(self.cache.base(task), {"task": task, "accuracy": acc, "eval_seconds": m["seconds"],
                                           "n_eval": len(self.eval[task])})
        print(f"[base] {task}: accuracy {acc:.3f} ({m['seconds']:.1f} s)", flush=True)

    def train_cell(self, method: str, seed: int, task: str) -> None:
        if self.cache.cell_done(method, seed, task) is not None:
            return
        s = self.s
        batches = loop.batches(self.train[task], s.steps, s.batch_size, seed, self.tok.pad_id)
        calibration = batches[: s.calibration_batches] if method in M.CALIBRATED else None
        torch.manual_seed(seed)  # LoRA's A init
        base = M.fresh(self.base)
        with loop.measured() as train_m:
            loss_fn = loop.batch_loss(self.obj[task], s.loss)
            model = M.build(method, base, self.budget, seed, list(TASKS).index(task), calibration, loss_fn)
            n_trainable = M.trainable(model)
            losses = loop.train(model, loss_fn, batches, s.lr_lora if method == "lora" else s.lr_shira,
                                s.warmup)
        with loop.measured() as eval_m:
            acc = self.accuracy(model, task)
        save_dir_atomically(self.cache.adapter(method, seed, task), model.save_pretrained)
        write_json(self.cache.cell(method, seed, task), {
            "method": method, "seed": seed, "task": task, "accuracy": acc, "n_eval": len(self.eval[task]),
            "train_seconds": train_m["seconds"], "eval_seconds": eval_m["seconds"],
            "train_cpu_seconds": train_m["cpu_seconds"], "eval_cpu_seconds": eval_m["cpu_seconds"],
            "peak_delta_rss_mb": train_m["peak_delta_rss_mb"], "peak_rss_mb": train_m["peak_rss_mb"],
            "trainable": n_trainable, "losses": losses, "threads": torch.get_num_threads()})
        print(f"[cell] {method} seed {seed} {task}: accuracy {acc:.3f}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
              f"train {train_m['seconds']:.1f} s (CPU {train_m['cpu_seconds']:.1f} s), "
              f"eval {eval_m['seconds']:.1f} s (CPU {eval_m['cpu_seconds']:.1f} s), "
              f"peak ΔRSS {train_m['peak_delta_rss_mb']:.0f} MB, {n_trainable:,} trainable", flush=True)

    def fused_cell(self, method: str, seed: int) -> None:
        tasks = self.args.tasks
        path = self.cache.fused(method, seed, tasks)
        if len(tasks) < 2 or read_json(path) is not None:
            return
        t0, c0 = time.perf_counter(), time.process_time()
        model, facts = M.fuse(method, M.fresh(self.base), [str(self.cache.adapter(method, seed, t)) for t in tasks])
        accs = {t: self.accuracy(model, t) for t in tasks}
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        write_json(path, {"method": method, "seed": seed, "tasks": tasks, "accuracy": accs, "seconds": seconds,
                          "cpu_seconds": cpu,
                          **facts})
        shown = ", ".join(f"{t} {a:.3f}" for t, a in accs.items())
        print(f"[fused] {method} seed {seed}: {shown} ({seconds:.1f} s, CPU {cpu:.1f} s)", flush=True)

    def run(self) -> None:
        for task in self.args.tasks:
            self.base_cell(task)
        for seed in self.args.seeds:
            for method in self.args.methods:
                for task in self.args.tasks:
                    self.train_cell(method, seed, task)
                self.fused_cell(method, seed)

    def tables(self) -> str:
        a = self.args
        cells = {(m, s, t): c for m in a.methods for s in a.seeds for t in a.tasks
                 if (c := self.cache.cell_done(m, s, t)) is not None}
        fused = {(m, s): f for m in a.methods for s in a.seeds
                 if (f := read_json(self.cache.fused(m, s, a.tasks))) is not None}
        base = {t: b for t in a.tasks if (b := read_json(self.cache.base(t))) is not None}
        s = self.s
        sizes = ", ".join(f"{t} {len(self.eval[t])}" for t in a.tasks)
        return "\n\n".join([
            f"Settings: SmolLM2-135M-Instruct (fp32), r={s.r} on `{s.target_modules}`, {s.steps} steps of "
            f"{s.batch_size}, max_length {s.max_length}, lr SHiRA {s.lr_shira} / LoRA {s.lr_lora} (alpha 2r), "
            f"seeds {a.seeds}, {torch.get_num_threads()} thread(s). Held-out examples: {sizes}.",
            "(a) Single-task accuracy (%), mean ± std over seeds. Time per cell: adapter creation (mask, "
            "calibration) + training, then held-out scoring. Peak ΔRSS: the process's peak RSS while creating "
            "and training the adapter (sampled every 10 ms) over its RSS before.",
            tables.single_table(cells, base, a.methods, a.tasks, a.seeds),
            "(b) Accuracy (%) after fusing the task adapters (summed: LoRA by PEFT add_weighted_adapter 'cat', "
            "SHiRA by shira_dist add_weighted_adapter 'linear', weights 1), single-task in brackets; drop = single "
            "− fused, averaged over tasks. Shared entries: the mean fraction of entries two task adapters share.",
            tables.fused_table(cells, fused, a.methods, a.tasks, a.seeds),
            "The paper (Bhardwaj et al., NeurIPS 2024) beside this study (drops in points):",
            tables.paper_table(cells, fused, a.methods, a.tasks, a.seeds),
        ])


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    study = Study(args)
    t0 = time.perf_counter()
    study.run()
    text = study.tables()
    write_text(study.cache.root / "tables.md", text + "\n")
    print(f"\n{text}\n\n(this run: {time.perf_counter() - t0:.0f} s; tables written to {study.cache.root / 'tables.md'})")


if __name__ == "__main__":
    main()
