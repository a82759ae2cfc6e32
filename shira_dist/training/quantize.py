"""A quantized frozen base (QSHiRA): ``model.quantization`` quantizes the base's linear layers
under the adapter, and the job scores the saved adapter on the float base after training.

    int8_weight_only   torchao ``Int8WeightOnlyConfig``: int8, one scale per output row (Int8Tensor)
    int4_weight_only   torchao ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``:
                       int4 values with one scale per 32 inputs, held one per int8 byte
                       (IntxUnpackedToInt8Tensor); in_features must be a multiple of 32
    nf4                bitsandbytes ``Linear4bit`` (NF4, QLoRA's format, compute in the base dtype); CUDA only

    float base ─► adapter (mask scored here) ─► base linears quantized under it ─► train ─► final/
                                                                                          │
    float base again ─► PeftModel.from_pretrained(final/) ─► held-out eval  ◄─────────────┘
                                                        compared with the quantized base's eval

Why this order: weight_magnitude, gradient and snip masks score the real weights and their dense
gradients, which a quantized weight does not have; scored on the float weights the mask is the one
the same config picks without quantization, and the adapter is meant for the float base anyway.
Then each SHiRA layer runs its quantized base forward once plus the sparse product per step.

Which layers: every ``nn.Linear`` of the base, targeted or not, except those transformers' own
quantizers keep in full precision (``get_keys_to_not_convert``: the output embeddings/lm_head,
tied weights, the last module) and ``shira.modules_to_save`` (trained in full). Embeddings are
``nn.Embedding``s and stay as they are.

What this torch/torchao build cannot do, and so the config refuses:
  - torchao's ``Int4WeightOnlyConfig`` has no CPU path: its plain and preshuffled formats need the
    ``mslk`` CUDA kernels, plain_int32 has no CPU support, tile_packed_to_4d needs CUDA (and bf16);
    the prototype CPU format (Int4OpaqueTensor, ``_weight_int4pack_mm_for_cpu``) runs forward but has no
    derivative for its input, so no layer below it could train. Hence IntxWeightOnlyConfig above.
  - nf4 without CUDA: bitsandbytes' 4-bit CPU path repacks the weight in place at the first forward
    without autograd (an evaluation) and from then on passes no gradient to its input.
  - fsdp / deepspeed: FSDP2 splits every parameter, frozen ones included (torchao's Int8Tensor has no
    split op), and DeepSpeed's engine re-applies ``module.to`` to them (the tensor swap fails). DDP runs:
    it is told not to broadcast the quantized weights, which every rank quantizes alike.
  - adapter lora/dora: the job's quantized path and its float-base comparison are SHiRA's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from .. import PeftModel
from ..modules_to_save import ModulesToSave
from .errors import ConfigError
from .schema import RunConfig

QUANTIZATIONS = ("int8_weight_only", "int4_weight_only", "nf4")
QUANTIZED_STRATEGIES = ("single", "ddp")
INT4_GROUP_SIZE = 32  # inputs per int4 scale


# ---- the config -------------------------------------------------------------------------------
def check_quantization(cfg: RunConfig) -> None:
    """model.quantization against the rest of the config and this machine."""
    method, strategy = cfg.model.quantization, cfg.distributed.strategy
    if method is None:
        return
    adapter = getattr(cfg, "adapter", "shira")
    if adapter != "shira":
        raise ConfigError(f"model.quantization={method!r} with adapter={adapter!r} is not supported by the job: the "
                          "quantized base and the float-base comparison are built for SHiRA adapters; use adapter=shira "
                          "(benchmarks/bench_quantized.py times PEFT's LoRA on a quantized base)")
    if strategy not in QUANTIZED_STRATEGIES:
        raise ConfigError(
            f"model.quantization={method!r} with distributed.strategy={strategy!r} is not supported: FSDP2 and "
            "DeepSpeed shard or flatten every parameter, the frozen base included, and the quantized weights are "
            f"tensor subclasses they cannot split; use strategy {' or '.join(QUANTIZED_STRATEGIES)} (each rank holds "
            "the whole quantized base), or model.quantization=null")
    if method == "nf4" and not torch.cuda.is_available():
        raise ConfigError(
            "model.quantization='nf4' needs CUDA, and this machine has none: bitsandbytes' 4-bit CPU path repacks the "
            "weight at the first forward without autograd (the evaluation) and then passes no gradient to its input. "
            "On the CPU use int8_weight_only or int4_weight_only (torchao)")
    package = "bitsandbytes" if method == "nf4" else "torchao"
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"model.quantization={method!r} needs the {package} package, which is not installed")


# ---- quantizing the base under the adapter ----------------------------------------------------------
def layers_to_quantize(model: PeftModel) -> list[tuple[str, nn.Linear]]:
    """(path in the base model, layer) of every plain, frozen ``nn.Linear`` of the base that gets quantized;
    a SHiRA layer's base is named by the SHiRA layer's path."""
    from transformers.quantizers.base import get_keys_to_not_convert

    base = model.get_base_model()
    keep = set(get_keys_to_not_convert(base))
    saved = [name for name, m in base.named_modules() if isinstance(m, ModulesToSave)]
    out = []
    for fqn, module in base.named_modules():
        if not isinstance(module, nn.Linear) or type(module.weight) is not nn.Parameter or module.weight.requires_grad:
            continue
        path = fqn.removesuffix(".base_layer")
        if path in keep or any(fqn.startswith(s + ".") for s in saved):
            continue
        out.append((path, module))
    return out


def _torchao_config(method: str):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if method == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE))


def _nf4_linear(lin: nn.Linear) -> nn.Module:
    """A bitsandbytes NF4 layer holding ``lin``'s weight; quantized when it reaches a CUDA device."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=lin.weight.dtype, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.cpu(), requires_grad=False)
    return q.to(lin.weight.device)


def quantize_base(model: PeftModel, method: str) -> list[str]:
    """Quantize the frozen base's linear layers (see :func:`layers_to_quantize`) in place, under the SHiRA
    wrappers; returns their paths. The adapter's values and patterns are untouched."""
    model.unfuse()  # a fused weight holds W0 + delta: quantize W0
    layers = layers_to_quantize(model)
    if method == "int4_weight_only":
        for path, layer in layers:
            if layer.in_features % INT4_GROUP_SIZE:
                raise ConfigError(f"model.quantization='int4_weight_only' needs in_features divisible by "
                                  f"{INT4_GROUP_SIZE} (one scale per {INT4_GROUP_SIZE} inputs); {path} has "
                                  f"{layer.in_features}. Use int8_weight_only")
    chosen = {id(layer) for _, layer in layers}
    if method == "nf4":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if id(child) in chosen:
                    setattr(parent, name, _nf4_linear(child))
    else:
        from torchao.quantization import quantize_

        quantize_(model, _torchao_config(method), filter_fn=lambda m, fqn: id(m) in chosen)
    _not_broadcast_by_ddp(model)
    return [path for path, _ in layers]


def _not_broadcast_by_ddp(model: nn.Module) -> None:
    """DDP broadcasts rank 0's parameters at start-up, frozen ones included, and the quantized tensor
    subclasses have no view op for its flat buffers. Every rank quantizes the same float base alike, so
    there is nothing to broadcast: DDP is told to leave them out."""
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, p in model.named_parameters() if type(p) not in (torch.Tensor, nn.Parameter)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


# ---- the adapter on the float base, after training ---------------------------------------------------------
class _EvalOnly:
    """What loop.evaluate reads from a strategy, for a model outside the training engine."""

    def __init__(self, model: nn.Module, strategy) -> None:
        self.model = model
        self.all_reduce_sum = strategy.all_reduce_sum


def float_base_eval(ctx, final_dir: str, model_dir: Optional[str]) -> Optional[dict]:
    """Held-out metrics of the saved adapter on the unquantized base, as loop.evaluate computes them for
    the training model (collective: every rank calls it). The float base is loaded anew (same weights:
    a directory, or an inline config drawn from training.seed) next to the quantized one."""
    from .loop import evaluate
    from .models import load_base_model

    if ctx.eval_data is None:
        return None
    ctx.strategy.barrier()  # rank 0 has written final_dir
    base, _ = load_base_model(ctx.cfg, model_dir)
    model = PeftModel.from_pretrained(base, final_dir).to(ctx.device)
    try:
        return evaluate(dataclasses.replace(ctx, strategy=_EvalOnly(model, ctx.strategy)))
    finally:
        del model, base


def quantized_layer_count(model: nn.Module) -> int:
    """Linear layers whose weight is quantized (a tensor subclass: torchao's, bitsandbytes' Params4bit)."""
    return sum(isinstance(m, nn.Linear) and type(m.weight) not in (torch.Tensor, nn.Parameter)
               for m in model.modules())


def quantization_report(method: str, model: nn.Module, quantized: Optional[dict], floating: Optional[dict]) -> dict:
    """metrics.json's "quantization": the held-out metrics on both bases and float minus quantized."""
    difference = None
    if quantized is not None and floating is not None:
        difference = {k: floating[k] - quantized[k] for k in ("loss", "accuracy", "perplexity")
                      if k in floating and k in quantized}
    return {"method": method, "quantized_layers": quantized_layer_count(model), "eval_quantized_base": quantized,
            "eval_float_base": floating, "difference_float_minus_quantized": difference}


def report_line(report: dict) -> str:
    """One log line: the adapter's held-out numbers on the float base next to the quantized base's."""
    q, f, d = report["eval_quantized_base"], report["eval_float_base"], report["difference_float_minus_quantized"]
    if q is None or f is None:
        return f"[shira_dist] {report['method']} base: no held-out set, so the float base is not scored"
    parts = [f"{k} {f[k]:.4f} (quantized base {q[k]:.4f}, difference {d[k]:+.3g})" for k in d
             if math.isfinite(d[k])]
    return (f"[shira_dist] the adapter on the float (unquantized) base, trained on the {report['method']} base: "
            + ", ".join(parts))
