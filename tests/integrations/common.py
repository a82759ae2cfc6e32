"""What the integration tests share: a tiny Llama with a SHiRA adapter, fixed data, a local
tokenizer, and the checks every integration makes on what it saved.

Everything is built here from configs with random init; nothing is downloaded.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import tiny_llama

RTOL = 1e-5  # fp32 losses of one adapter computed two ways: only summation order differs
TARGETS = ["q_proj", "v_proj"]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json"}


def shira_config(mask_seed: int = 0):
    """shira_dist's config; ``mask_seed`` draws the random pattern."""
    from shira_dist import ShiraConfig

    return ShiraConfig(r=2, target_modules=list(TARGETS), random_seed=mask_seed)


def shira_model(mask_seed: int = 0, model_seed: int = 0):
    """A fresh tiny Llama (weights from ``model_seed``) with a SHiRA adapter "default"."""
    from shira_dist import get_peft_model

    return get_peft_model(tiny_llama(model_seed), shira_config(mask_seed))


def token_rows(n: int = 8, length: int = 12) -> torch.Tensor:
    """(n, length) fixed token ids < 101 (tiny Llama's vocabulary)."""
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(0))


def loss_of(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM loss on ``ids`` (padding masked out of the labels), eval mode, no grad."""
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, -100)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """Every SHiRA value and index tensor of ``model``, by its state_dict name."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".shira_" in k}


def assert_adapter_files_only(directory) -> None:
    """``directory`` holds a PEFT adapter and no full-model weights."""
    names = set(os.listdir(directory))
    assert ADAPTER_FILES <= names, f"{directory}: no PEFT adapter in {sorted(names)}"
    assert not names & FULL_MODEL_FILES, f"{directory}: full-model weights {sorted(names & FULL_MODEL_FILES)}"


def reloaded_losses(directory, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, float]:
    """The loss on ``ids`` of a fresh tiny Llama with the adapter in ``directory`` loaded by
    shira_dist and by PEFT itself."""
    import peft

    import shira_dist

    ours = shira_dist.PeftModel.from_pretrained(tiny_llama(), str(directory))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(directory))
    assert not isinstance(theirs, shira_dist.PeftModel)
    return {"shira_dist": loss_of(ours, ids, attention_mask).item(),
            "peft": loss_of(theirs, ids, attention_mask).item()}


def assert_reloads_equal(directory, expected: float, ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> None:
    """The adapter in ``directory``, loaded by both libraries, gives the loss ``expected``."""
    for library, loss in reloaded_losses(directory, ids, attention_mask).items():
        assert loss == pytest.approx(expected, rel=RTOL, abs=0), \
            f"{directory} loaded by {library}: loss {loss} != {expected}"


ALPHABET = "abcdefghijklmnopqrstuvwxyz ."


def char_tokenizer():
    """A character-level transformers tokenizer over ``ALPHABET`` (ids < 101), built locally."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate([*specials, *ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
