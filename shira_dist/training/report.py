"""What a run reports: the adapter summary, metrics.json (atomic), and where everything went."""

from __future__ import annotations

import json
import os
from typing import Optional

from .. import ShiraModel
from ..io import atomic_write_bytes
from .loop import LoopState


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


def metrics_document(state: LoopState, status: str, eval_after: Optional[dict], adapter: dict, info: dict) -> dict:
    """``info``: this process's run (strategy, world size, resumed_from, ...); ``state``: the training
    history it continued. Skipped non-finite steps are null in ``losses`` and listed in ``skipped_steps``."""
    finite = [x for x in state.losses if x is not None]
    window = finite[-10:]
    train = {"steps": state.step, "tokens": state.tokens, "seconds": round(state.train_seconds, 3),
             "tokens_per_second": state.tokens / state.train_seconds if state.train_seconds else None,
             "first_loss": finite[0] if finite else None,
             "final_loss": sum(window) / len(window) if window else None, "losses": state.losses,
             "skipped_steps": state.skipped}
    return {"status": status, **info, "train": train, "eval_before": state.eval_before, "eval_after": eval_after,
            "evals": state.evals, "log": state.log, "segments": state.segments,
            "adapter": dict(adapter)}


def write_metrics(path: str, document: dict) -> None:
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode())


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
