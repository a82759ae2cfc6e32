"""What a run reports, on rank 0: log lines, the progress bar, W&B, metrics.json, the last summary.

    log / eval_line        "[shira_dist] ..." lines on stdout
    Progress               tqdm: steps done, loss, tokens/s, tqdm's own ETA
    tracker                tracking.backend: none  -> NullTracker (nothing is written or imported)
                           tracking.mode:    auto  -> online only if WANDB_API_KEY is set (or WANDB_MODE
                                                      says so), else offline
                                             offline -> files under <output_dir>/wandb/offline-run-*/;
                                                      upload later with `wandb sync`
    metrics.json           metrics_document (the one place its content is put together), written
                           atomically by RunRecord

metrics.json's status:

    running      from the start of training (rewritten at every checkpoint)
    stopped      training.stop_after_step reached; a later run resumes
    completed    final/ written and evaluated
    failed       an exception (with "reason"); RunFailed and ConfigError are the job's own,
                 anything else a bug (its traceback is printed too)
    interrupted  SIGTERM / SIGINT (with "reason"), exit 128 + signal

It describes what this process did: its strategy, world size and precision, the checkpoint it
resumed from and the steps it trained ("start_step", "steps_this_run"); the training history
it continued ("train", "log", ...) and every earlier process's share ("segments") come from the
checkpoint. When the disk is full, a short document replaces the old one in place, so it never
stays at "running" if anything can be written at all.

An online W&B start that fails (no network, bad key) falls back to offline with a note, so a
run never hangs or dies because of tracking.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Optional

from tqdm.auto import tqdm

from ..io import atomic_write_bytes
from .dist_env import DistEnv
from .errors import RunInterrupted, one_line
from .schema import TrackingConfig

if TYPE_CHECKING:
    from ..model import ShiraModel
    from .loop import LoopState


# ---- log lines and the progress bar -------------------------------------------------------------
def log(env: DistEnv, message: str) -> None:
    """A line on rank 0's stdout."""
    if env.is_main:
        print(f"[shira_dist] {message}", flush=True)


def eval_line(prefix: str, metrics: dict) -> str:
    parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
    return f"[shira_dist] {prefix}: " + ", ".join(parts)


class Progress:
    def __init__(self, total_steps: int, done_steps: int, enabled: bool, is_main: bool) -> None:
        self.is_main = is_main
        # In a log file (SLURM, CI) every refresh is a new chunk of text: refresh rarely there.
        interval = 0.5 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(total=total_steps, initial=done_steps, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (enabled and is_main), mininterval=interval, file=sys.stderr)

    def update(self, loss: float, tokens_per_second: float, lr: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        """A log line on rank 0 that does not break the bar."""
        if self.is_main:
            if self.bar.disable:
                print(message, flush=True)
            else:
                self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


# ---- experiment tracking ------------------------------------------------------------------------
class NullTracker:
    run_dir: Optional[str] = None
    mode = "none"

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "online", "disabled"):
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbTracker:
    """The real ``wandb`` package, never blocking on a network."""

    def __init__(self, cfg: TrackingConfig, output_dir: str, run_config: dict) -> None:
        import wandb

        self.wandb = wandb
        self.mode = resolve_mode(cfg.mode)
        name = cfg.run_name or os.path.basename(os.path.normpath(output_dir))
        init = dict(project=cfg.project, name=name, tags=list(cfg.tags), config=run_config, dir=output_dir)
        try:
            self.run = wandb.init(mode=self.mode, settings=self._settings(self.mode), **init)
        except Exception as e:  # noqa: BLE001 - any online failure: keep training, track offline
            if self.mode != "online":
                raise
            print(f"[shira_dist] wandb online start failed ({type(e).__name__}: {e}); tracking offline instead",
                  flush=True)
            self.mode = "offline"
            self.run = wandb.init(mode="offline", settings=self._settings("offline"), **init)
        self.run_dir = os.path.dirname(self.run.dir) if self.run is not None else None

    def _settings(self, mode: str):
        # console="off": tqdm and our own log lines stay on the terminal untouched.
        return self.wandb.Settings(console="off", silent=True, init_timeout=60 if mode == "online" else 30,
                                   disable_git=True, save_code=False)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()
        if self.mode == "offline" and self.run_dir:
            print(f"[shira_dist] W&B run saved offline in {self.run_dir}\n"
                  f"[shira_dist]   upload it with: wandb sync {self.run_dir}", flush=True)


def make_tracker(cfg: TrackingConfig, output_dir: str, run_config: dict, is_main: bool):
    if not is_main or cfg.backend == "none" or resolve_mode(cfg.mode) == "disabled":
        return NullTracker()
    return WandbTracker(cfg, output_dir, run_config)


def check_tracking(cfg: TrackingConfig) -> None:
    """Fail fast when W&B is asked for but not installed."""
    if cfg.backend == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ModuleNotFoundError("tracking.backend='wandb' needs the wandb package (pip install 'shira-dist[train]'); "
                                      "or set tracking=none")


# ---- the adapter ------------------------------------------------------------------------------------
def adapter_summary(model: ShiraModel, adapter_name: str = "default") -> dict:
    """nnz and density (nnz / (out*in)) per SHiRA layer, and totals."""
    layers, nnz, dense = {}, 0, 0
    for name, layer in model.shira_layers():
        if adapter_name not in layer.shira_weight:
            continue
        k = layer.shira_weight[adapter_name].numel()
        size = layer.out_features * layer.in_features
        layers[name] = {"nnz": k, "shape": [layer.out_features, layer.in_features], "density": k / size}
        nnz, dense = nnz + k, dense + size
    trainable, total = model.get_nb_trainable_parameters()
    return {"layers": layers, "num_layers": len(layers), "nnz": nnz, "density": nnz / max(dense, 1),
            "trainable_parameters": trainable, "all_parameters": total}


def tracker_summary(summary: dict) -> dict:
    """Flat keys for the tracker's run summary."""
    out = {f"adapter/{k}": v for k, v in summary.items() if k != "layers"}
    out["adapter/layers"] = {name: {"nnz": v["nnz"], "density": v["density"]} for name, v in summary["layers"].items()}
    return out


# ---- metrics.json ---------------------------------------------------------------------------------------
def metrics_document(status: str, info: dict, state: Optional[LoopState] = None, eval_after: Optional[dict] = None,
                     adapter: Optional[dict] = None) -> dict:
    """metrics.json. ``info``: this process's run (strategy, world size, resumed_from, start_step, ...);
    ``state``: the training history it continued (None: before training, only ``info``). Skipped
    non-finite steps are null in ``losses`` and listed in ``skipped_steps``."""
    if state is None:
        return {"status": status, **info}
    if info.get("start_step") is not None:
        info = {**info, "steps_this_run": state.step - info["start_step"]}
    finite = [x for x in state.losses if x is not None]
    window = finite[-10:]
    train = {"steps": state.step, "tokens": state.tokens, "seconds": round(state.train_seconds, 3),
             "tokens_per_second": state.tokens / state.train_seconds if state.train_seconds else None,
             "first_loss": finite[0] if finite else None,
             "final_loss": sum(window) / len(window) if window else None, "losses": state.losses,
             "skipped_steps": state.skipped}
    return {"status": status, **info, "train": train, "eval_before": state.eval_before, "eval_after": eval_after,
            "evals": state.evals, "log": state.log, "segments": state.segments,
            "adapter": dict(adapter or {})}


def write_metrics(path: str, document: dict) -> None:
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode())


class RunRecord:
    """The metrics.json of this run, written by rank 0 only, and only once the run owns output_dir."""

    def __init__(self, output_dir: str, is_main: bool) -> None:
        self.path = os.path.join(output_dir, "metrics.json")
        self.is_main = is_main
        self.active = False  # output_dir is this run's (set after start-up cleanup)
        self.started = time.perf_counter()
        self.info: dict = {}  # this process's run (see metrics_document)
        self.state: Optional[LoopState] = None  # the training history, once training is set up
        self.adapter: dict = {}  # adapter_summary

    def begin(self, info: dict) -> None:
        """The run owns output_dir now: from here on, however it ends, metrics.json says so."""
        self.active, self.info = True, info

    def follow(self, state: LoopState, adapter: dict, info: dict) -> None:
        """Training is set up: documents carry ``state`` (updated in place by the loop) from now on."""
        self.state, self.adapter, self.info = state, adapter, info

    def write(self, status: str, eval_after: Optional[dict] = None, **extra) -> Optional[dict]:
        if not (self.is_main and self.active):
            return None
        info = {**self.info, **extra, "wall_seconds": time.perf_counter() - self.started}
        document = metrics_document(status, info, self.state, eval_after, self.adapter)
        write_metrics(self.path, document)
        return document

    def finish_with(self, exc: BaseException) -> None:
        """Record a run that ends by ``exc`` (status failed or interrupted, with the reason)."""
        if not (self.is_main and self.active):
            return
        interrupted = isinstance(exc, (RunInterrupted, KeyboardInterrupt))
        status, reason = ("interrupted" if interrupted else "failed"), one_line(exc) or type(exc).__name__
        try:
            self.write(status, reason=reason)
            return
        except OSError:
            pass
        try:  # a full disk: truncating the old file frees its blocks for a short document
            with open(self.path, "w") as f:
                f.write(json.dumps(metrics_document(status, {"reason": reason})) + "\n")
        except OSError as e:
            print(f"[shira_dist] could not record status {status!r} in {self.path}: {e.strerror}", flush=True)


# ---- the last lines ---------------------------------------------------------------------------------------
def _change(before: Optional[dict], after: Optional[dict], key: str) -> str:
    if not after or key not in after:
        return ""
    if before and key in before:
        return f"{key} {before[key]:.4f} -> {after[key]:.4f}"
    return f"{key} {after[key]:.4f}"


def where_everything_went(out: str, final_dir: str, checkpoint: Optional[str], data_files: list[str],
                          model_dir: Optional[str], tracker, document: dict) -> str:
    before, after = document.get("eval_before"), document.get("eval_after")
    scores = ", ".join(s for s in (_change(before, after, "accuracy"), _change(before, after, "loss")) if s)
    lines = [f"[shira_dist] done: {document['train']['steps']} steps in {document['wall_seconds']:.1f} s"
             + (f"; held-out {scores} ({after['examples']} examples)" if scores else ""),
             f"  output dir        {out}",
             f"  resolved config   {os.path.join(out, 'resolved_config.yaml')}",
             f"  final adapter     {final_dir}  (PEFT format: PeftModel.from_pretrained(base_model, this_dir))",
             f"  last checkpoint   {checkpoint}",
             f"  metrics           {os.path.join(out, 'metrics.json')}"]
    if tracker.run_dir:
        lines.append(f"  W&B run ({tracker.mode})  {tracker.run_dir}")
    lines += [f"  data              {p}" for p in data_files]
    if model_dir:
        lines.append(f"  base model        {model_dir}")
    return "\n".join(lines)
