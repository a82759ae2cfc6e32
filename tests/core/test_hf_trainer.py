"""SHiRA models trained by ``transformers.Trainer`` and ``trl.SFTTrainer`` with their default optimizer.

transformers 5.23 defaults ``optim`` to ``adamw_torch_fused``: a ``torch.optim.AdamW(fused=True)``.
Its fused kernel updates the parameters in place without bumping their version counter, so any
cache keyed on that counter goes stale. The contract checked here: in the default execution mode
the next forward computes with the values as they are *now*, whatever optimizer changed them.

Every check compares the model as the trainer left it against two references that hold no
cached state: the same model switched to ``set_fuse_mode("unfused")`` (base forward plus the
sparse product) and a fresh base with the adapter reloaded from ``save_pretrained``.

Tolerances: losses and logits of one model in two modes (or reloaded) agree to rtol 1e-5 and
atol 1e-5 (fp32; only summation order differs); the per-step losses of two whole training runs
agree to rtol 1e-5 and their final values to atol 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from shira_dist import PeftModel, ShiraConfig, ShiraLinear, get_peft_model
from tests.conftest import tiny_llama

RTOL = 1e-5
ATOL = 1e-5
STEPS = 6


def _cfg() -> ShiraConfig:
    return ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], random_seed=0)


def _token_rows() -> torch.Tensor:
    """8 fixed sequences of 12 token ids (the training set, and the batch every check evaluates)."""
    return torch.randint(0, 101, (8, 12), generator=torch.Generator().manual_seed(0))


def _loss_and_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, -100)  # no loss on padding
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention_mask, labels=labels)
    return out.loss, out.logits


def _values(model) -> dict[str, torch.Tensor]:
    return {name: layer.shira_weight["default"].detach().clone()
            for name, layer in model.named_modules() if isinstance(layer, ShiraLinear)}


def _inner_optimizer(trainer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _assert_default_optimizer_is_fused_adamw(trainer) -> None:
    assert trainer.args.optim == OptimizerNames.ADAMW_TORCH_FUSED, trainer.args.optim
    opt = _inner_optimizer(trainer)
    assert type(opt) is torch.optim.AdamW, type(opt)
    assert opt.defaults["fused"] is True, opt.defaults
    assert opt.param_groups and all(group["fused"] is True for group in opt.param_groups)
    # the optimizer updates exactly the SHiRA values
    optimized = {id(p) for group in opt.param_groups for p in group["params"]}
    values = {id(layer.shira_weight["default"]) for layer in trainer.model.modules() if isinstance(layer, ShiraLinear)}
    assert optimized == values


def _train(output_dir, fuse_mode: str | None = None):
    """A tiny Llama + SHiRA trained by ``Trainer`` with its default optimizer; ``fuse_mode`` is set
    (if given) before training. Returns (model, trainer, untrained loss on the fixed batch)."""
    model = get_peft_model(tiny_llama(), _cfg())
    if fuse_mode is not None:
        model.set_fuse_mode(fuse_mode)
    rows = _token_rows()
    untrained, _ = _loss_and_logits(model, rows)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    trainer.train()
    return model, trainer, untrained


def _assert_matches_unfused_self_and_reload(model, ids, tmp_path, untrained_loss, attention_mask=None) -> None:
    """In-memory model (default mode) == same model unfused == fresh base + reloaded adapter; and trained."""
    loss, logits = _loss_and_logits(model, ids, attention_mask)
    model.set_fuse_mode("unfused")
    loss_unfused, logits_unfused = _loss_and_logits(model, ids, attention_mask)
    model.set_fuse_mode("auto")
    model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    loss_reloaded, logits_reloaded = _loss_and_logits(reloaded, ids, attention_mask)

    torch.testing.assert_close(loss, loss_unfused, rtol=RTOL, atol=0,
                               msg=lambda m: f"default-mode model after training != its unfused self: {m}")
    torch.testing.assert_close(logits, logits_unfused, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss, loss_reloaded, rtol=RTOL, atol=0,
                               msg=lambda m: f"default-mode model after training != its saved adapter reloaded: {m}")
    torch.testing.assert_close(logits, logits_reloaded, rtol=RTOL, atol=ATOL)
    assert loss_unfused < untrained_loss, (loss_unfused, untrained_loss)  # the values really trained
    assert loss < untrained_loss, (loss, untrained_loss)


# ---- transformers.Trainer -----------------------------------------------------------------


def test_trainer_default_optimizer_is_torch_fused_adamw(tmp_path):
    """The setting under test is real: Trainer's default optimizer on this stack is
    ``torch.optim.AdamW`` with ``fused=True`` (in defaults and every param group), over
    exactly the SHiRA values."""
    _, trainer, _ = _train(tmp_path)
    _assert_default_optimizer_is_fused_adamw(trainer)


def test_trainer_model_computes_with_trained_values(tmp_path):
    """After ``trainer.train()`` (default mode, fused AdamW) the in-memory model's loss and logits
    on a fixed batch equal those of the same model switched to "unfused" and of a fresh base with
    the saved adapter reloaded (rtol 1e-5); and the loss is below the untrained model's."""
    model, _, untrained = _train(tmp_path)
    _assert_matches_unfused_self_and_reload(model, _token_rows(), tmp_path, untrained)


def test_trainer_default_mode_run_matches_unfused_run(tmp_path):
    """The whole training trajectory in the default mode equals a run in "unfused" mode (no cached
    state at all): every logged per-step loss (rtol 1e-5) and the final values (atol 1e-5)."""
    model, trainer, _ = _train(tmp_path / "default")
    ref_model, ref_trainer, _ = _train(tmp_path / "unfused", fuse_mode="unfused")

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ref_losses = [h["loss"] for h in ref_trainer.state.log_history if "loss" in h]
    assert len(ref_losses) == STEPS and len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=0,
                               msg=lambda m: f"per-step losses, default vs unfused run: {losses} vs {ref_losses}; {m}")
    values, ref_values = _values(model), _values(ref_model)
    assert values.keys() == ref_values.keys() and len(values) == 4
    for name in values:
        assert not torch.equal(ref_values[name], torch.zeros_like(ref_values[name])), name
        torch.testing.assert_close(values[name], ref_values[name], rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")


# ---- trl.SFTTrainer ----------------------------------------------------------------------

_WORDS = "the cat dog sat on mat ran to a red blue big small house tree".split()
_TEXTS = ["the cat sat on the mat", "the dog ran to a red house", "a big blue tree", "the small cat ran to the tree",
          "a red cat sat on a blue mat", "the big dog sat", "a small house", "the tree ran to the cat"]


def _word_tokenizer():
    """A word-level tokenizer over ``_WORDS`` built locally (ids < 101 = tiny Llama's vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _sft_train(output_dir, hand_over_inner_model: bool):
    """Train a SHiRA tiny Llama with ``trl.SFTTrainer``; ``peft_config`` is not passed. TRL's defaults
    otherwise (fused AdamW, gradient checkpointing, fused LM-head loss) except ``bf16=False``: TRL
    defaults to bf16 autocast, and accelerate leaves the autocast wrapper on the model's forward
    after training, so the in-memory model would compute in bf16 (fused vs unfused then differ by
    bf16 rounding, ~2e-3, and a freshly reloaded model would compute in fp32). Returns (model,
    trainer, fixed batch, untrained loss)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = _word_tokenizer()
    model = get_peft_model(tiny_llama(), _cfg())
    batch = tokenizer(_TEXTS, padding=True, return_tensors="pt")
    untrained, _ = _loss_and_logits(model, batch["input_ids"], batch["attention_mask"])
    args = SFTConfig(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, bf16=False)
    handed = model.get_base_model() if hand_over_inner_model else model
    trainer = SFTTrainer(model=handed, args=args, train_dataset=Dataset.from_dict({"text": _TEXTS}),
                         processing_class=tokenizer)
    assert trainer.model is handed  # not wrapped again (no peft_config given)
    trainer.train()
    _assert_default_optimizer_is_fused_adamw(trainer)
    return model, trainer, batch, untrained


def test_sft_trainer_trains_hf_model_holding_shira_layers(tmp_path):
    """``SFTTrainer`` handed ``model.get_base_model()`` (the transformers model with SHiRA layers
    inside, a plain ``PreTrainedModel`` to TRL) trains the SHiRA values, and afterwards the
    in-memory model == its unfused self == fresh base + reloaded adapter (rtol 1e-5), with a loss
    below the untrained one."""
    model, _, batch, untrained = _sft_train(tmp_path, hand_over_inner_model=True)
    _assert_matches_unfused_self_and_reload(model, batch["input_ids"], tmp_path, untrained, batch["attention_mask"])
