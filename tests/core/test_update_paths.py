"""The default execution mode is correct however the SHiRA values are updated (one process).

A model from ``get_peft_model`` runs in the default mode ("auto": fp32 base weights hold
W0 + delta, written in place) unless told otherwise. Whatever code changes the values
between two forwards -- torch's foreach/fused/for-loop optimizers, a hand-written step,
writes through ``.data``, rebinding ``.data``, ``load_state_dict``, bitsandbytes' 8-bit
AdamW -- the next forward must compute with the values as they are now.

Every update path below trains the tiny Llama of tests/distributed/dist/harness.py (hidden 64, 2
layers, vocab 128; SHiRA r=2 on all 7 projections, random_seed=0) for harness.STEPS steps
on harness.batches() (4 x 16 tokens per step), twice in this process:

    default    get_peft_model(...) as returned (set_fuse_mode is never called)
    reference  the same, after model.set_fuse_mode("unfused"): base forward + sparse
               product with the values as they are, no cached state (the pure reference)

Each update path is checked by the tests of this file (one training per path and mode,
cached per module):

    losses        every step's loss equals the reference's            rtol 1e-5, atol 0
    values        final values equal the reference's                  atol 1e-5, rtol 0
                  and they trained: max |value| > 1e-4 in both runs (no test passes by not
                  training: the values start at zero)
    logits        after training, logits under torch.no_grad() (eval) equal the reference
                  model's                                             atol 1e-5, rtol 0
    same model    one more forward (train mode, autograd on) of the trained model in the
                  default mode gives the loss of that same model switched to "unfused":
                  the in-memory model computes with its current values  rtol 1e-5, atol 0

Stale fused state shows up as a loss mismatch from the second step on (the first forward
is computed before any update), a logits mismatch, and a same-model mismatch.

Run: .venv/bin/pytest tests/core/test_update_paths.py   (single process; ~10-40 s on 2 cores)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
from torch import Tensor, nn

from tests.distributed.dist import harness

ADAM_LR = harness.LR  # 5e-3: an Adam step moves a value by up to ~5e-3
SGD_LR = 0.5  # plain SGD steps: gradients of the values are <= ~0.06, so steps of up to ~3e-2
SGD_MOMENTUM_LR = 0.1
LOSS_RTOL = 1e-5
VALUE_ATOL = 1e-5
LOGITS_ATOL = 1e-5
TRAINED = 1e-4  # max |value| after training must exceed this (values start at 0)

Step = Callable[[], None]  # applies one update from the gradients in .grad, then clears them


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _zero_grads(params) -> None:
    for _, p in params:
        p.grad = None


def _optimizer_step(opt: torch.optim.Optimizer) -> Step:
    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt  # for the checks on which optimizer really stepped
    return step


def adamw_foreach(model: nn.Module) -> Step:
    """torch AdamW, multi-tensor (foreach) implementation: in-place _foreach_ ops."""
    return _optimizer_step(torch.optim.AdamW([p for _, p in _trainable(model)], lr=ADAM_LR, foreach=True))


def adamw_single_tensor(model: nn.Module) -> Step:
    """torch AdamW, single-tensor (for-loop) implementation (foreach=False)."""
    return _optimizer_step(torch.optim.AdamW([p for _, p in _trainable(model)], lr=ADAM_LR, foreach=False))


def adamw_fused(model: nn.Module) -> Step:
    """torch AdamW(fused=True): one fused kernel writes the parameters (CPU fp32 supported)."""
    return _optimizer_step(torch.optim.AdamW([p for _, p in _trainable(model)], lr=ADAM_LR, fused=True))


def sgd_fused_momentum(model: nn.Module) -> Step:
    """torch SGD(fused=True, momentum=0.9)."""
    return _optimizer_step(torch.optim.SGD([p for _, p in _trainable(model)], lr=SGD_MOMENTUM_LR, momentum=0.9,
                                           fused=True))


def bnb_adamw8bit(model: nn.Module) -> Step:
    """bitsandbytes AdamW8bit (its CPU build), with 8-bit blockwise state on these small tensors
    (min_8bit_size=1; the default 4096 would keep 32-bit state for tensors of 256-384 values)."""
    import bitsandbytes as bnb

    return _optimizer_step(bnb.optim.AdamW8bit([p for _, p in _trainable(model)], lr=ADAM_LR, min_8bit_size=1))


def manual_add_(model: nn.Module) -> Step:
    """A hand-written SGD step: ``with torch.no_grad(): p.add_(p.grad, alpha=-lr)`` per parameter."""
    params = _trainable(model)

    def step() -> None:
        with torch.no_grad():
            for _, p in params:
                p.add_(p.grad, alpha=-SGD_LR)
        _zero_grads(params)

    return step


def data_add_(model: nn.Module) -> Step:
    """SGD written through ``.data``: ``p.data.add_(p.grad, alpha=-lr)`` (old-style code)."""
    params = _trainable(model)

    def step() -> None:
        for _, p in params:
            p.data.add_(p.grad, alpha=-SGD_LR)
        _zero_grads(params)

    return step


def data_rebind(model: nn.Module) -> Step:
    """SGD by rebinding ``.data`` to a new tensor: ``p.data = p.data - lr * p.grad``."""
    params = _trainable(model)

    def step() -> None:
        for _, p in params:
            p.data = p.data - SGD_LR * p.grad
        _zero_grads(params)

    return step


def load_state_dict_adapter(model: nn.Module) -> Step:
    """SGD computed out of place, loaded with ``model.load_state_dict(values, strict=False)``
    (a state dict holding only the trainable values)."""
    params = _trainable(model)

    def step() -> None:
        new = {n: (p.detach() - SGD_LR * p.grad).clone() for n, p in params}
        result = model.load_state_dict(new, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        _zero_grads(params)

    return step


def load_state_dict_full(model: nn.Module) -> Step:
    """SGD computed out of place into a copy of the full ``model.state_dict()`` (base weights,
    indices and values), loaded with ``model.load_state_dict(state)`` (strict)."""
    params = _trainable(model)

    def step() -> None:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for n, p in params:
            state[n] = p.detach() - SGD_LR * p.grad
        model.load_state_dict(state)
        _zero_grads(params)

    return step


UPDATE_PATHS: dict[str, Callable[[nn.Module], Step]] = {
    f.__name__: f for f in (adamw_foreach, adamw_single_tensor, adamw_fused, sgd_fused_momentum, manual_add_,
                            data_add_, data_rebind, load_state_dict_adapter, load_state_dict_full, bnb_adamw8bit)
}


def probe_ids() -> Tensor:
    """Rows never trained on, for the logits and the extra forward after training."""
    return torch.randint(0, harness.HF_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(99))


@dataclass
class Run:
    losses: list[float]
    values: dict[str, Tensor]  # every shira_weight after the last step
    logits: Tensor  # eval + no_grad, after training, in the run's own mode
    next_loss: float  # one more forward (train mode, autograd on), the run's own mode
    next_loss_unfused: float  # the same forward, after switching that model to "unfused"
    optimizer: Optional[torch.optim.Optimizer] = None
    extra: dict = field(default_factory=dict)


def train(path: str, mode: Optional[str]) -> Run:
    """Train a fresh model with ``path``; ``mode=None`` keeps the default mode."""
    model = harness.shira_model("scratch")
    if mode is not None:
        model.set_fuse_mode(mode)
    step = UPDATE_PATHS[path](model)
    losses = harness.train_steps(model, step)
    values = {n: p.detach().clone() for n, p in model.named_parameters() if ".shira_weight." in n}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids()).logits.clone()
    model.train()
    probe = probe_ids()
    next_loss = model(input_ids=probe, labels=probe).loss.item()
    model.set_fuse_mode("unfused")
    next_loss_unfused = model(input_ids=probe, labels=probe).loss.item()
    return Run(losses, values, logits, next_loss, next_loss_unfused, getattr(step, "optimizer", None))


@pytest.fixture(scope="module")
def runs():
    """path -> {"default": Run, "reference": Run}, trained on first use."""
    cache: dict[str, dict[str, Run]] = {}

    def get(path: str) -> dict[str, Run]:
        if path not in cache:
            cache[path] = {"default": train(path, None), "reference": train(path, "unfused")}
        return cache[path]

    return get


PATHS = list(UPDATE_PATHS)


@pytest.mark.parametrize("path", PATHS)
def test_losses_match_unfused_reference(runs, path):
    """Every step's loss: a stale fused weight changes the loss from the second step on."""
    got, ref = runs(path)["default"], runs(path)["reference"]
    assert len(got.losses) == len(ref.losses) == harness.STEPS
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=LOSS_RTOL, atol=0,
                               msg=lambda m: f"[{path}] per-step losses, default mode vs unfused reference "
                                             f"{got.losses} vs {ref.losses}: {m}")


@pytest.mark.parametrize("path", PATHS)
def test_final_values_match_unfused_reference(runs, path):
    """The values the default-mode run trained to (gradients computed from stale weights differ)."""
    got, ref = runs(path)["default"], runs(path)["reference"]
    assert got.values.keys() == ref.values.keys() and len(got.values) == 14
    for run, name in ((got, "default"), (ref, "reference")):
        biggest = max(v.abs().max().item() for v in run.values.values())
        assert biggest > TRAINED, f"[{path}] {name} run did not train: max |value| = {biggest}"
    for key, value in ref.values.items():
        torch.testing.assert_close(got.values[key], value, atol=VALUE_ATOL, rtol=0,
                                   msg=lambda m: f"[{path}] {key}: {m}")


@pytest.mark.parametrize("path", PATHS)
def test_inference_logits_match_unfused_reference(runs, path):
    """After training, inference (eval, torch.no_grad()) in the default mode gives the
    reference's logits."""
    got, ref = runs(path)["default"], runs(path)["reference"]
    assert max(v.abs().max().item() for v in got.values.values()) > TRAINED, f"[{path}] did not train"
    torch.testing.assert_close(got.logits, ref.logits, atol=LOGITS_ATOL, rtol=0,
                               msg=lambda m: f"[{path}] logits after training: {m}")


@pytest.mark.parametrize("path", PATHS)
def test_trained_model_computes_with_its_current_values(runs, path):
    """The very model trained in the default mode, one more forward: its loss equals the loss
    of that same model (same values in memory) switched to "unfused". Independent of the
    reference run, so it also holds if the two trainings differed."""
    got = runs(path)["default"]
    assert max(v.abs().max().item() for v in got.values.values()) > TRAINED, f"[{path}] did not train"
    torch.testing.assert_close(torch.tensor(got.next_loss), torch.tensor(got.next_loss_unfused), rtol=LOSS_RTOL,
                               atol=0, msg=lambda m: f"[{path}] default-mode forward {got.next_loss} vs the same "
                                                     f"model unfused {got.next_loss_unfused}: {m}")


def test_bnb_cell_really_steps_with_8bit_state(runs):
    """The bitsandbytes cell is bitsandbytes' own 8-bit optimizer stepping (not a 32-bit fallback):
    every trainable tensor has uint8 first and second moments after training."""
    import bitsandbytes as bnb

    for name in ("default", "reference"):
        opt = runs("bnb_adamw8bit")[name].optimizer
        assert isinstance(opt, bnb.optim.AdamW8bit)
        params = [p for group in opt.param_groups for p in group["params"]]
        assert len(params) == 14
        for p in params:
            state = opt.state[p]
            assert state["step"] == harness.STEPS
            assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8, \
                {k: getattr(v, "dtype", v) for k, v in state.items()}


def test_optimizers_are_the_implementations_named(runs):
    """The torch cells run the implementation their name says (foreach / single-tensor / fused)."""
    flags = {"adamw_foreach": dict(foreach=True), "adamw_single_tensor": dict(foreach=False),
             "adamw_fused": dict(fused=True), "sgd_fused_momentum": dict(fused=True, momentum=0.9)}
    for path, expected in flags.items():
        opt = runs(path)["default"].optimizer
        for key, value in expected.items():
            assert opt.defaults[key] == value, (path, key, opt.defaults)
