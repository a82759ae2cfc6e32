"""``adapter: lora | dora``: PEFT's LoRA (or DoRA) in place of SHiRA, at the same budget, in the same job.

An A/B of SHiRA against LoRA changes one key. Targets, modules_to_save and the rank come from
the ``shira:`` section; everything else (data, loop, seeds, evaluation, checkpoints) is the job's:

    SHiRA, shira.r = r     r·(in+out) trainable entries of each targeted (out, in) weight
    LoRA,  rank r          A: (r, in) + B: (out, r)  =  r·(in+out)     the same count, exactly
    DoRA,  rank r          LoRA's + a magnitude vector: (out,)  ->  r·(in+out) + out
    modules_to_save        trained in full by both (PEFT adds the head, classifier/score, for
                           task.type sequence_classification)

    lora.r       None: shira.r (the equal budget)
    lora.alpha   None: 2·r, as PEFT's own LoRA baselines (MetaMathQA, r=32 with lora_alpha=64)
    lora.dropout 0.0

The adapter is a plain ``peft`` model built by ``peft.get_peft_model`` (DoRA:
``LoraConfig(use_dora=True)``); checkpoints and ``final/`` hold PEFT's own files
(adapter_config.json + adapter_model.safetensors), which ``peft.PeftModel.from_pretrained``
loads, and from which a run resumes. Strategies: single and ddp (config.py refuses fsdp and
deepspeed, whose sharding helpers are SHiRA's).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Optional

import peft
import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from ..targeting import find_targets
from .errors import ConfigError
from .schema import RunConfig


def lora_rank(cfg: RunConfig) -> int:
    """lora.r, or shira.r (the equal budget) when it is null."""
    return cfg.lora.r if cfg.lora.r is not None else cfg.shira.r


def lora_alpha(cfg: RunConfig) -> float:
    """lora.alpha, or 2·rank when it is null (scaling alpha/r = 2)."""
    return cfg.lora.alpha if cfg.lora.alpha is not None else 2.0 * lora_rank(cfg)


def lora_config(cfg: RunConfig) -> peft.LoraConfig:
    task_type = "SEQ_CLS" if cfg.task.type == "sequence_classification" else "CAUSAL_LM"
    alpha = lora_alpha(cfg)
    s = cfg.shira
    return peft.LoraConfig(r=lora_rank(cfg), lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                           lora_dropout=cfg.lora.dropout, use_dora=cfg.adapter == "dora",
                           target_modules=_copy(s.target_modules), modules_to_save=_copy(s.modules_to_save),
                           task_type=task_type)


def _copy(value):
    """PEFT extends modules_to_save lists in place (the head, for SEQ_CLS): never the run config's own."""
    return list(value) if isinstance(value, list) else value


LORA_STRATEGIES = ("single", "ddp")


def check_lora_config(cfg: RunConfig) -> None:
    """lora.* values, and adapter lora/dora against the rest of the config (config.check_run_config)."""
    lo, s = cfg.lora, cfg.shira
    if lo.r is not None and lo.r < 1:
        raise ConfigError(f"lora.r={lo.r} is invalid: must be >= 1, or null for shira.r (the equal budget)")
    if lo.alpha is not None and lo.alpha <= 0:
        raise ConfigError(f"lora.alpha={lo.alpha:g} is invalid: must be > 0, or null for 2*r")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.dropout={lo.dropout:g} is invalid: must be in [0, 1)")
    if cfg.adapter == "shira":
        return
    if s.mask_type != "random":
        raise ConfigError(f"shira.mask_type={s.mask_type!r} does not apply to adapter={cfg.adapter!r} (LoRA has no "
                          "mask): leave shira.mask_type at 'random' (its default), or set adapter=shira")
    strategy = cfg.distributed.strategy
    if strategy not in LORA_STRATEGIES:
        raise ConfigError(f"adapter={cfg.adapter!r} with distributed.strategy={strategy!r} is not supported: the job's "
                          "FSDP2 and DeepSpeed sharding and gathering are SHiRA's; use distributed.strategy "
                          f"{' or '.join(LORA_STRATEGIES)}, or adapter=shira")
    if getattr(cfg.model, "quantization", None) is not None:
        raise ConfigError(f"model.quantization={cfg.model.quantization!r} with adapter={cfg.adapter!r} is not "
                          "supported (the quantized base is wired under SHiRA layers); use model.quantization=null, "
                          "or adapter=shira")


# ---- the model ------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(path in the base model, layer) of every LoRA layer of a peft model, in model order."""
    return [(name, m) for name, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)]


def build_lora_adapter(base: nn.Module, cfg: RunConfig, resume_dir: Optional[str]) -> peft.PeftModel:
    """A new LoRA/DoRA adapter on ``base`` (A drawn from torch's RNG, B zero), or the one saved in
    ``resume_dir`` (trainable). It must sit on exactly the layers SHiRA would target."""
    try:
        wanted = [name for name, _ in find_targets(base, cfg.shira.target_modules)]
    except ValueError as e:
        raise ConfigError(f"shira.target_modules={cfg.shira.target_modules!r}: {e}") from None
    with warnings.catch_warnings():  # PEFT calls a transformers method that transformers itself deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if resume_dir is not None:
            model = peft.PeftModel.from_pretrained(base, resume_dir, is_trainable=True)
        else:
            model = peft.get_peft_model(base, lora_config(cfg))
    if resume_dir is not None:
        _check_modules_to_save(model.peft_config["default"].modules_to_save, cfg, resume_dir)
    got = [name for name, _ in lora_layers(model)]
    if got != wanted:
        missing, extra = sorted(set(wanted) - set(got)), sorted(set(got) - set(wanted))
        if resume_dir is not None:
            where = f"the adapter in {resume_dir}"
            fix = "use another output_dir, or training.resume=never to start over"
        else:
            where, fix = "PEFT's LoRA", "list the target modules by name in shira.target_modules"
        raise ConfigError(f"adapter={cfg.adapter!r}: {where} targets other layers than SHiRA would with "
                          f"shira.target_modules={cfg.shira.target_modules!r} (missing {missing[:3]}, extra "
                          f"{extra[:3]}); {fix}")
    return model


def _check_modules_to_save(saved: Optional[list[str]], cfg: RunConfig, directory: str) -> None:
    """The checkpoint trains the modules shira.modules_to_save names (PEFT adds, and saves, the heads
    classifier/score itself for sequence classification, once per load)."""
    added = {"classifier", "score"} if cfg.task.type == "sequence_classification" else set()
    if set(saved or []) - added != set(cfg.shira.modules_to_save or []) - added:
        raise ConfigError(f"{directory} holds an adapter with modules_to_save={saved!r}, but the config asks for "
                          f"shira.modules_to_save={cfg.shira.modules_to_save!r}; use another output_dir, or "
                          "training.resume=never to start over")


def unwrap_lora_model(model: nn.Module) -> Optional[peft.PeftModel]:
    """The PEFT LoRA model inside ``model`` (itself, or DDP's ``.module``), else None (e.g. SHiRA)."""
    seen = model
    while not isinstance(seen, peft.PeftModel):
        seen = getattr(seen, "module", None)
        if not isinstance(seen, nn.Module):
            return None
    return seen if seen.peft_type == peft.PeftType.LORA else None


# ---- tensors: save, sync, compare ---------------------------------------------------------------------------
def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under the keys ``save_pretrained`` writes, as CPU copies (A, B, DoRA
    magnitudes, modules_to_save copies). Replicated strategies only: no collective."""
    inner = unwrap_lora_model(model)
    live = peft.get_peft_model_state_dict(inner, adapter_name=adapter_name, save_embedding_layers=False)
    return {k: v.detach().to("cpu", copy=True) for k, v in live.items()}


@torch.no_grad()
def broadcast_lora(model: nn.Module, device: torch.device) -> None:
    """Rank 0's trainable tensors on every rank (before wrapping; a no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in unwrap_lora_model(model).parameters():
        if p.requires_grad:
            buf = p.data if p.device == device else p.data.to(device)
            dist.broadcast(buf, src=0)
            if buf is not p.data:
                p.data.copy_(buf)


def lora_replicas_in_sync(model: nn.Module) -> bool:
    """Every rank's adapter tensors bit-identical (digests all-gathered); True without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    digest = hashlib.blake2b(digest_size=16)
    for key, t in sorted(lora_state_dict(model).items()):
        digest.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, digest.hexdigest())
    return len(set(everyone)) == 1


# ---- what the run reports and checks ----------------------------------------------------------------------
def lora_summary(model: nn.Module, cfg: RunConfig) -> dict:
    """Per LoRA layer its trainable entries ("nnz": r·(in+out), + out for DoRA) and their share of the
    weight ("density"), and totals; the same keys as the SHiRA summary (report.adapter_summary)."""
    layers, nnz, dense = {}, 0, 0
    for name, layer in lora_layers(model):
        out_f, in_f = layer.out_features, layer.in_features
        k = sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad and "base_layer" not in n)
        layers[name] = {"nnz": k, "shape": [out_f, in_f], "density": k / (out_f * in_f)}
        nnz, dense = nnz + k, dense + out_f * in_f
    trainable, total = model.get_nb_trainable_parameters()
    return {"type": cfg.adapter, "rank": lora_rank(cfg), "alpha": lora_alpha(cfg), "layers": layers,
            "num_layers": len(layers), "nnz": nnz, "density": nnz / max(dense, 1),
            "trainable_parameters": trainable, "all_parameters": total}


def lora_log_line(summary: dict, cfg: RunConfig) -> str:
    r = summary["rank"]
    budget = sum(r * sum(v["shape"]) for v in summary["layers"].values())
    magnitude = summary["nnz"] - budget
    same = "the same as SHiRA's at shira.r" if r == cfg.shira.r else f"SHiRA's at r={r}; shira.r={cfg.shira.r}"
    return (f"{'DoRA' if cfg.adapter == 'dora' else 'LoRA'} adapter (PEFT): {summary['num_layers']} layers, rank {r}, "
            f"alpha {summary['alpha']:g}: A+B {budget:,d} entries ({same})"
            + (f" + DoRA magnitudes {magnitude:,d}" if magnitude else "")
            + f"; {summary['trainable_parameters']:,d} trainable of {summary['all_parameters']:,d} parameters")


def lora_resume_expectations(cfg: RunConfig) -> list[tuple[str, object, str, object]]:
    """(adapter_config.json key, the value this config needs, the config key, its value) for a resume
    check; target layers and modules_to_save are checked when the adapter loads."""
    return [("peft_type", "LORA", "adapter", cfg.adapter),
            ("use_dora", cfg.adapter == "dora", "adapter", cfg.adapter),
            ("r", lora_rank(cfg), "lora.r" if cfg.lora.r is not None else "shira.r", lora_rank(cfg)),
            ("lora_alpha", lora_alpha(cfg), "lora.alpha" if cfg.lora.alpha is not None else "lora.alpha (null: 2*r)",
             lora_alpha(cfg)),
            ("lora_dropout", cfg.lora.dropout, "lora.dropout", cfg.lora.dropout)]
