"""What the distributed tests share: the tiny model, the data, the single-process reference,
and the per-rank facts a worker records (imported by worker.py and by test_distributed.py).

Every run trains ``STEPS`` AdamW steps on the same ``GLOBAL_BATCH`` rows per step: one
process takes all rows, rank r of W takes rows [r*B/W, (r+1)*B/W). A run starts either
from scratch (``get_peft_model`` with a seeded mask, zero values) or by resuming a saved
adapter (``PeftModel.from_pretrained(..., is_trainable=True)``, non-zero values).
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import Tensor, nn

HF_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 2
GLOBAL_BATCH, SEQ, STEPS, LR = 4, 16, 4, 5e-3
WARMUP_STEPS = 3  # steps of the single-process run whose adapter the "resume" runs start from

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def base_model() -> nn.Module:
    """The tiny Llama, random init, identical in every process (seeded, nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**HF_CONFIG))


def shira_model(start: str, start_dir: str | None = None, random_seed: int | None = 0):
    """start="scratch": a fresh adapter on all 7 projections; "resume": the saved one in start_dir."""
    from shira_dist import PeftModel, ShiraConfig, get_peft_model

    if start == "scratch":
        return get_peft_model(base_model(), ShiraConfig(r=R, target_modules=TARGETS, random_seed=random_seed))
    if start == "resume":
        return PeftModel.from_pretrained(base_model(), start_dir, is_trainable=True)
    raise ValueError(f"start={start!r}: use 'scratch' or 'resume'")


def batches(steps: int = STEPS, seed: int = 1) -> list[Tensor]:
    """``steps`` global batches of token ids, (GLOBAL_BATCH, SEQ) each."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, HF_CONFIG["vocab_size"], (GLOBAL_BATCH, SEQ), generator=g) for _ in range(steps)]


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=LR)


def train_steps(model, step, steps: int = STEPS, seed: int = 1) -> list[float]:
    """Train on whole global batches: forward, backward, then ``step()`` (the update path)."""
    model.train()
    losses = []
    for ids in batches(steps, seed):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        step()
        losses.append(loss.item())
    return losses


def train_single(model, steps: int = STEPS, seed: int = 1) -> list[float]:
    """The single-process reference: whole global batch per step, AdamW."""
    opt = optimizer(p for p in model.parameters() if p.requires_grad)

    def step() -> None:
        opt.step()
        opt.zero_grad()

    return train_steps(model, step, steps, seed)


def digest(tensors: dict[str, Tensor]) -> str:
    """A bit-exact fingerprint of a state dict (for comparing ranks)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(key.encode() + str(t.dtype).encode() + t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def outside_mask_differences(local: Tensor, reference: Tensor, indices: Tensor, row_offset: int = 0) -> tuple[int, int]:
    """Compare a (local block of rows of a) weight with the base weight outside the SHiRA mask.

    local: (rows, in) rows [row_offset, row_offset + rows) of the layer's weight;
    reference: (out, in) the base weight; indices: (2, nnz) the adapter's positions.
    Returns (entries compared, entries not bit-identical).
    """
    rows = local.shape[0]
    block = reference[row_offset:row_offset + rows]
    outside = torch.ones_like(block, dtype=torch.bool)
    r, c = indices[0].long() - row_offset, indices[1].long()
    keep = (r >= 0) & (r < rows)
    outside[r[keep], c[keep]] = False
    same = local.detach().to("cpu") == block
    return int(outside.sum()), int((outside & ~same).sum())


def flat_outside_mask_differences(flat_local: Tensor, start: int, reference: Tensor, indices: Tensor) -> tuple[int, int]:
    """Like :func:`outside_mask_differences` for a flat partition: elements [start, start+n) of
    the row-major weight (ZeRO-3's ``ds_tensor``; padding past the end is skipped)."""
    ref_flat = reference.reshape(-1)
    n = max(0, min(flat_local.numel(), ref_flat.numel() - start))
    outside = torch.ones(ref_flat.numel(), dtype=torch.bool)
    outside[indices[0].long() * reference.shape[1] + indices[1].long()] = False
    outside, block = outside[start:start + n], ref_flat[start:start + n]
    same = flat_local.detach().to("cpu")[:n] == block
    return int(outside.sum()), int((outside & ~same).sum())
