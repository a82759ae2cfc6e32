"""TRL's SFTTrainer and DPOTrainer train a shira_dist model as the PEFT model it is.

The supported route is to pass the shira_dist model itself (``model=get_peft_model(base,
shira_dist.ShiraConfig(...))``, no ``peft_config``): TRL recognises it as a PEFT model, trains
only its SHiRA values, and for DPO with ``ref_model=None`` adds a frozen "ref" adapter and
takes the reference log-probs with it. ``peft_config=shira_dist.ShiraConfig(...)`` is refused
by TRL, which accepts only ``peft.PeftConfig`` there (checked below).

Tiny Llama, character-level local tokenizer, in-memory datasets, 6 steps each. TRL's defaults
otherwise (fused AdamW, gradient checkpointing, fused LM-head loss) except ``bf16=False``: with
bf16 autocast the in-memory model would compute in bf16 after training (accelerate leaves its
autocast wrapper on the forward), so it could not be compared with a reloaded fp32 model.

Tolerances: losses of one adapter computed two ways rtol 1e-5; a reference model equal to the
base model by construction (zero values): logits atol 1e-6, log-probs rtol 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from shira_dist import ShiraConfig
from tests.conftest import tiny_llama
from tests.integrations import common

STEPS = 6
TEXTS = ["the cat sat on the mat.", "a dog ran to the red house.", "the big blue tree.", "a small cat ran home."] * 2
PREFERENCES = {"prompt": ["the cat", "a dog", "the tree", "a small"] * 2,
               "chosen": [" sat.", " ran.", " is big.", " cat."] * 2,
               "rejected": [" xq.", " zz.", " qj kx.", " vvv."] * 2}


def _args(config_cls, output_dir):
    return config_cls(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-2,
                      report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, bf16=False,
                      disable_tqdm=True)


def _logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """(model, trainer, saved adapter dir) after SFTTrainer trained a shira_dist model."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = tmp_path_factory.mktemp("sft")
    model = common.shira_model()
    trainer = SFTTrainer(model=model, args=_args(SFTConfig, out), train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=common.char_tokenizer())
    trainer.train()
    trainer.save_model(str(out / "final"))
    return model, trainer, out / "final"


@pytest.fixture(scope="module")
def dpo(tmp_path_factory):
    """(model, trainer, saved adapter dir) after DPOTrainer (ref_model=None) trained a shira_dist model."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    out = tmp_path_factory.mktemp("dpo")
    model = common.shira_model()
    trainer = DPOTrainer(model=model, ref_model=None, args=_args(DPOConfig, out),
                         train_dataset=Dataset.from_dict(PREFERENCES), processing_class=common.char_tokenizer())
    trainer.train()
    trainer.save_model(str(out / "final"))
    return model, trainer, out / "final"


def _text_batch():
    batch = common.char_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


# ---- SFTTrainer ---------------------------------------------------------------------------


def test_sft_trains_the_shira_model_and_saves_a_peft_adapter(sft):
    """SFTTrainer keeps the model (no second wrap), trains only SHiRA values, the loss falls,
    and the saved adapter loaded by shira_dist and by PEFT gives the in-memory model's loss."""
    model, trainer, saved = sft
    assert trainer.model is model
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if ".shira_weight.default" in n}
    losses = _logged_losses(trainer)
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    common.assert_adapter_files_only(saved)
    ids, mask = _text_batch()
    common.assert_reloads_equal(saved, common.loss_of(model, ids, mask).item(), ids, mask)


def test_sft_refuses_a_shira_dist_config_as_peft_config():
    """TRL accepts only a ``peft.PeftConfig`` as ``peft_config`` (documented limitation): pass
    the shira_dist model instead, as the tests above do."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with pytest.raises(TypeError, match=r"`peft_config` must be a `peft.PeftConfig` instance .* got ShiraConfig"):
        SFTTrainer(model=tiny_llama(), args=_args(SFTConfig, "unused"),
                   train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=common.char_tokenizer(),
                   peft_config=ShiraConfig(r=2, target_modules=common.TARGETS, random_seed=0))


# ---- DPOTrainer ---------------------------------------------------------------------------


def test_dpo_trains_the_shira_model_and_saves_a_peft_adapter(dpo):
    """The first step's loss is ln 2 (policy == reference), the loss falls and the margin grows;
    the saved adapter loads in both libraries with the in-memory model's loss."""
    model, trainer, saved = dpo
    losses = _logged_losses(trainer)
    assert len(losses) == STEPS
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and losses[-1] < losses[0], losses
    assert trainer.state.log_history[STEPS - 1]["rewards/margins"] > 0
    common.assert_adapter_files_only(saved)
    ids, mask = _text_batch()
    common.assert_reloads_equal(saved, common.loss_of(model, ids, mask).item(), ids, mask)


def _completion_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens (chosen rows, rejected rows), by hand."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(1).chunk(2)


def test_dpo_reference_is_the_base_model(dpo):
    """With ``ref_model=None`` TRL adds a "ref" adapter (frozen, never trained) and computes the
    reference log-probs through it: they equal the bare base model's; so do the logits with
    "ref" active and with the adapter disabled, while the trained "default" adapter differs."""
    from trl.trainer.utils import use_adapter

    model, trainer, _ = dpo
    assert sorted(model.peft_config) == ["default", "ref"] and model.active_adapter == "default"
    for name, p in model.named_parameters():
        if ".shira_weight.ref" in name:
            assert not p.requires_grad and not p.any(), name  # frozen at its zero init
    base = tiny_llama()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    base_chosen, base_rejected = _completion_logps(base, batch)
    torch.testing.assert_close(ref_chosen, base_chosen, rtol=common.RTOL, atol=0)
    torch.testing.assert_close(ref_rejected, base_rejected, rtol=common.RTOL, atol=0)

    ids = batch["input_ids"]
    with torch.no_grad():
        base_logits = base(ids).logits
        with use_adapter(model, "ref"):
            ref_logits = model(ids).logits
        with model.disable_adapter():
            disabled_logits = model(ids).logits
        trained_logits = model(ids).logits
    torch.testing.assert_close(ref_logits, base_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(disabled_logits, base_logits, rtol=0, atol=1e-6)
    assert (trained_logits - base_logits).abs().max() > 1e-3  # the policy did move
    assert model.active_adapter == "default"


def test_dpo_saves_the_reference_adapter_beside_the_policy(dpo):
    """``save_model`` writes "default" at the root and "ref" in a subfolder (PEFT's layout for
    several adapters), each loadable by PEFT."""
    import peft

    _, _, saved = dpo
    common.assert_adapter_files_only(saved / "ref")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(saved / "ref"))
    ids, mask = _text_batch()
    assert common.loss_of(loaded, ids, mask).item() == pytest.approx(common.loss_of(tiny_llama(), ids, mask).item(),
                                                                      rel=common.RTOL)
