"""The cells of the engine matrix (tests/distributed/test_engine_matrix.py), shared by the 2-rank worker
(tests/distributed/dist/matrix_worker.py) and the single-process reference computed in the pytest process.

A cell is (engine, update path). Every cell trains a fresh model -- harness.base_model() +
``get_peft_model(ShiraConfig(r=2, all 7 projections, random_seed=0))``, in the default
execution mode (``set_fuse_mode`` is never called) -- for harness.STEPS steps on
harness.batches(): one process takes all GLOBAL_BATCH rows of a step, rank r of W takes rows
[r*B/W, (r+1)*B/W), so the mean of the ranks' losses is the single-process loss and the
averaged gradients are the single-process gradients.

Update paths (the same function builds the optimizer on the ranks and for the reference):
    adamw_foreach        torch.optim.AdamW(lr=5e-3, foreach=True)
    adamw_fused          torch.optim.AdamW(lr=5e-3, fused=True)
    sgd_fused_momentum   torch.optim.SGD(lr=0.1, momentum=0.9, fused=True)
    manual_add_          with torch.no_grad(): p.add_(p.grad, alpha=-0.5), then grads cleared
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from tests.distributed.dist import harness

SGD_MOMENTUM_LR = 0.1
MANUAL_LR = 0.5
PROBE_SEED = 99  # the batch of the forward after training (never trained on)

TORCH_ENGINES = ("ddp", "fsdp2", "fsdp1", "accelerate")
DEEPSPEED_ENGINES = ("zero1", "zero2", "zero3")
TORCH_CELLS = ([("ddp", p) for p in ("adamw_foreach", "adamw_fused", "sgd_fused_momentum", "manual_add_")]
               + [(e, p) for e in ("fsdp2", "fsdp1", "accelerate") for p in ("adamw_foreach", "adamw_fused")])
DEEPSPEED_CELLS = [(e, p) for e in DEEPSPEED_ENGINES for p in ("adamw_foreach", "adamw_fused")]


def cell_id(engine: str, path: str) -> str:
    return f"{engine}-{path}"


def shira_model() -> nn.Module:
    """A fresh SHiRA model, identical in every process, in the default execution mode."""
    from shira_dist import ShiraConfig, get_peft_model

    return get_peft_model(harness.base_model(), ShiraConfig(r=harness.R, target_modules=harness.TARGETS,
                                                            random_seed=0))


def make_optimizer(path: str, params: list[nn.Parameter]) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer of ``path`` over ``params`` (None for the hand-written step)."""
    if path == "adamw_foreach":
        return torch.optim.AdamW(params, lr=harness.LR, foreach=True)
    if path == "adamw_fused":
        return torch.optim.AdamW(params, lr=harness.LR, fused=True)
    if path == "sgd_fused_momentum":
        return torch.optim.SGD(params, lr=SGD_MOMENTUM_LR, momentum=0.9, fused=True)
    if path == "manual_add_":
        return None
    raise ValueError(f"unknown update path {path!r}")


def make_step(path: str, params: list[nn.Parameter]) -> Callable[[], None]:
    """One update from the gradients in ``.grad`` (already reduced by the engine), grads cleared."""
    opt = make_optimizer(path, params)
    if opt is not None:
        def step() -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        def step() -> None:
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-MANUAL_LR)
            for p in params:
                p.grad = None
    return step


_WRAPPER_SEGMENTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def canonical(name: str) -> str:
    """A parameter's name in the plain ShiraModel: drops the wrappers' segments (a leading
    "module." of DDP / DeepSpeed / Accelerate, FSDP1's "_fsdp_wrapped_module.")."""
    parts = name.split(".")
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_SEGMENTS)


def is_value(name: str) -> bool:
    """A SHiRA value tensor (``...shira_weight.<adapter>``), whatever the name's prefix."""
    return ".shira_weight." in "." + name


def probe_batch() -> Tensor:
    return harness.batches(1, seed=PROBE_SEED)[0]


def reference(path: str) -> dict:
    """The single-process run of ``path`` in "unfused" mode (the pure reference): per-step
    losses on whole global batches, final values (canonical names), and the loss of one more
    forward under torch.no_grad() on probe_batch()."""
    model = shira_model()
    model.set_fuse_mode("unfused")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    losses = harness.train_steps(model, make_step(path, [p for _, p in named]))
    values = {canonical(n): p.detach().clone() for n, p in named if is_value(n)}
    with torch.no_grad():
        probe = probe_batch()
        probe_loss = model(input_ids=probe, labels=probe).loss.item()
    return {"losses": losses, "values": values, "probe_loss": probe_loss}
