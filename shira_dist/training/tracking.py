"""Experiment tracking with the real ``wandb`` package: rank 0 only, never blocking on a network.

    tracking.backend: none   -> NullTracker (nothing is written or imported)
    tracking.mode:    auto   -> online only if WANDB_API_KEY is set (or WANDB_MODE says so), else offline
                      offline-> files under <output_dir>/wandb/offline-run-*/; upload later with `wandb sync`

An online start that fails (no network, bad key) falls back to offline with a note, so a
run never hangs or dies because of tracking.
"""

from __future__ import annotations

import os
from typing import Optional

from .schema import TrackingConfig


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
