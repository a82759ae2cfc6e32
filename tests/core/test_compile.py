"""torch.compile of a whole SHiRA model (a tiny Llama): no graph breaks, and eager results.

Every kernel is a torch.library custom op with a fake implementation (kernels/ops.py) and every
data-dependent fact about a pattern is found when it is built, so dynamo traces the training
forward (with the loss) and the no-grad forward as one graph in each fuse mode; the compiled
training steps (inductor, fullgraph) then equal eager ones: per-step losses rtol 1e-5, values
and logits atol 1e-5 (fp32; only summation order differs).
"""

from __future__ import annotations

import pytest
import torch

from shira_dist import ShiraConfig, ShiraLinear, get_peft_model
from tests.conftest import tiny_llama

MODES = ("auto", "fused", "unfused")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
STEPS = 3


def _model(mode: str, mask_type: str = "random"):
    """A tiny Llama with SHiRA values drawn at random (so every delta is non-zero), in ``mode``."""
    config = ShiraConfig(r=2, target_modules=TARGETS, mask_type=mask_type, init_weights=False, random_seed=0)
    model = get_peft_model(tiny_llama(), config)
    model.set_fuse_mode(mode)
    return model.train()


def _breaks(explained) -> str:
    return "; ".join(f"{b.reason.splitlines()[0]} at {b.user_stack[-1].filename}:{b.user_stack[-1].lineno}"
                     if b.user_stack else b.reason.splitlines()[0] for b in explained.break_reasons)


def _values(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _fused(model) -> set[bool]:
    return {m.fused for m in model.modules() if isinstance(m, ShiraLinear)}


def _train(model, forward, ids: torch.Tensor) -> tuple[list[float], set[bool], torch.Tensor]:
    """STEPS AdamW steps through ``forward`` (the model or its compiled form); returns the losses,
    whether the layers were fused after training, and the no-grad logits after it."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    fused = _fused(model)
    with torch.no_grad():
        logits = forward(input_ids=ids).logits
    return losses, fused, logits


@pytest.mark.parametrize("mode", MODES)
def test_forwards_trace_as_one_graph(mode, ids):
    model = _model(mode)
    torch._dynamo.reset()
    train = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    with torch.no_grad():
        infer = torch._dynamo.explain(model)(input_ids=ids)
    assert train.graph_break_count == 0 and train.graph_count == 1, _breaks(train)
    assert infer.graph_break_count == 0 and infer.graph_count == 1, _breaks(infer)


@pytest.mark.parametrize("mode,mask_type,backend", [("auto", "random", "auto"), ("fused", "random", "auto"),
                                                    ("unfused", "random", "auto"), ("unfused", "struct", "auto"),
                                                    ("auto", "random", "triton")])
def test_compiled_training_equals_eager(monkeypatch, mode, mask_type, backend, ids):
    """``mask_type="struct"``: the values' gradient from dense blocks; ``backend="triton"``: the
    Triton kernels (under the interpreter here), through the same custom ops."""
    monkeypatch.setenv("SHIRA_DIST_KERNEL_BACKEND", backend)
    eager, compiled = _model(mode, mask_type), _model(mode, mask_type)
    torch._dynamo.reset()
    losses, fused, logits = _train(eager, eager, ids)
    c_losses, c_fused, c_logits = _train(compiled, torch.compile(compiled, fullgraph=True), ids)

    torch.testing.assert_close(torch.tensor(c_losses), torch.tensor(losses), rtol=1e-5, atol=0)
    values, c_values = _values(eager), _values(compiled)
    assert values.keys() == c_values.keys() and len(values) == 2 * len(TARGETS)
    for name in values:
        torch.testing.assert_close(c_values[name], values[name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(c_logits, logits, rtol=0, atol=1e-5)
    # eager "auto" fuses fp32 weights; compiled, it runs unfused (see shira_dist/layer.py)
    assert fused == {mode != "unfused"}
    assert c_fused == {mode == "fused"}


def _trainer_run(output_dir, compile: bool):
    """3 steps of transformers.Trainer (its default optimizer, fused AdamW) and one evaluation;
    returns the logged losses and the evaluation loss."""
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=TARGETS, random_seed=0))
    rows = torch.randint(0, 101, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             seed=0, torch_compile=compile)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, trainer.evaluate()["eval_loss"]


def test_trainer_with_torch_compile_has_no_graph_breaks(tmp_path):
    """``Trainer(torch_compile=True)`` over a SHiRA model: dynamo counts no graph break in training
    or evaluation, and the losses equal those of the same run without compiling (rtol 1e-5)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    losses, eval_loss = _trainer_run(tmp_path / "compiled", compile=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    ref_losses, ref_eval_loss = _trainer_run(tmp_path / "eager", compile=False)
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(eval_loss), torch.tensor(ref_eval_loss), rtol=1e-5, atol=0)
