"""Training step on a torchao int8 weight-only base (QSHiRA vs PEFT's SHiRA vs QLoRA), side by side.

    python benchmarks/bench_quantized.py [--threads 2] [--rounds 7] [--hidden 1024 --inter 2816]

One float Llama (random init, 4 layers, vocab 8000) is saved once and loaded four times through
``from_pretrained(..., quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))``, so every
configuration trains on the same int8 base (lm_head stays float, as transformers leaves it):

  floor       the quantized base, forward + backward through the activations only (no parameters)
  shira_dist  SHiRA r on the 7 projections: each layer runs the int8 base forward once plus the sparse product
  peft_shira  PEFT's SHiRA r on the same layers (its torchao path: the weight is dequantized, the dense
              delta added, and F.linear run on that float copy at every forward)
  peft_lora   PEFT LoRA r (QLoRA-style: same r, so r*(in+out) trainable entries per layer as SHiRA)

A step is forward + backward + AdamW step + zero_grad on batch x seq random tokens. The
configurations take turns one step each per round in this process; "step / floor" is the median
of the per-round ratios. PEFT's SHiRA also accepts a base quantized by ``torchao.quantize_``
directly only with the transformers quantizer attached: without it get_peft_model raises
(printed below). Prints a table; nothing is asserted. Public APIs only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ["floor", "shira_dist", "peft_shira", "peft_lora"]
LABELS = {"floor": "frozen int8 base (floor)", "shira_dist": "shira_dist SHiRA", "peft_shira": "PEFT SHiRA",
          "peft_lora": "PEFT LoRA (QLoRA-style)"}


def _save_float_llama(args, directory: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      vocab_size=args.vocab, max_position_embeddings=args.seq)
    LlamaForCausalLM(cfg).save_pretrained(directory)


def _int8_base(directory: str):
    import torch
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    quant = TorchAoConfig(quant_type=Int8WeightOnlyConfig(set_inductor_config=False))
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, dtype=torch.float32)


def _model(name: str, directory: str, r: int):
    """(model, optimizer or None) for one configuration on a freshly loaded int8 base."""
    import peft
    import torch

    import shira_dist

    base = _int8_base(directory)
    if name == "floor":
        base.requires_grad_(False)
        base.enable_input_require_grads()  # the backward runs through every layer's activations
        return base, None
    if name == "shira_dist":
        model = shira_dist.get_peft_model(base, shira_dist.ShiraConfig(r=r, target_modules=TARGETS, random_seed=0))
    elif name == "peft_shira":
        model = peft.get_peft_model(base, peft.ShiraConfig(r=r, target_modules=TARGETS, random_seed=0))
    else:
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def _step(model, optimizer, ids) -> float:
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def _peft_shira_on_plain_quantize(directory: str) -> str:
    """What PEFT's get_peft_model does with a base quantized by torchao.quantize_ (no transformers quantizer)."""
    import peft
    from torch import nn
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(directory)
    quantize_(base, Int8WeightOnlyConfig(set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head")
    try:
        peft.get_peft_model(base, peft.ShiraConfig(r=4, target_modules=TARGETS))
    except Exception as e:  # noqa: BLE001 - reported, not handled
        return f"{type(e).__name__}: {e}"
    return "accepted"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        _save_float_llama(args, directory)
        models = {name: _model(name, directory, args.r) for name in CONFIGS}
        print("PEFT SHiRA on a base from torchao.quantize_ directly:", _peft_shira_on_plain_quantize(directory))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for model, optimizer in models.values():  # warm-up
        model.train()
        _step(model, optimizer, ids)
    times = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (model, optimizer) in models.items():
            times[name].append(_step(model, optimizer, ids))

    print(f"Llama hidden {args.hidden}, inter {args.inter}, {args.layers} layers, vocab {args.vocab}; "
          f"batch {args.batch}x{args.seq}; r={args.r} on {len(TARGETS)} projections; torchao int8 weight-only base; "
          f"{args.threads} threads, {args.rounds} rounds")
    print("| config | trainable | step s | step / floor |\n|---|---|---|---|")
    for name, (model, optimizer) in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if optimizer else 0
        ratio = statistics.median(t / f for t, f in zip(times[name], times["floor"]))
        print(f"| {LABELS[name]} | {trainable:,d} | {statistics.median(times[name]):.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
