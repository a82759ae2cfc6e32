"""What the trainer examples share: a small Llama built from a config (random init) and a
byte-level tokenizer made on the spot, so they run on a CPU in seconds with nothing downloaded.

Swap in a real model and its tokenizer (``AutoModelForCausalLM.from_pretrained(...)``,
``AutoTokenizer.from_pretrained(...)``) and the examples run unchanged.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from shira_dist import ShiraConfig

TEXTS = ["the cat sat on the mat.", "a dog ran to the red house.", "the big blue tree grew.",
         "a small cat ran home.", "the red dog sat by the tree.", "a blue house on a hill."]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 0-255), then <pad> = 256 and <eos> = 257."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # one printable symbol per byte
    tok = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def small_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def shira_config() -> ShiraConfig:
    return ShiraConfig(r=8, target_modules="all-linear", random_seed=0)


def print_losses(trainer, **metrics: str) -> None:
    """One line per logged training step: its loss and ``metrics`` (label=log key)."""
    for entry in trainer.state.log_history:
        if "loss" in entry:
            extra = "".join(f"  {label} {entry[key]:.4f}" for label, key in metrics.items())
            print(f"step {entry['step']:3d}  loss {entry['loss']:.4f}{extra}")


def peft_reload_diff(model, directory: str, vocab_size: int, batch: dict) -> float:
    """Max |logit difference| on ``batch`` between ``model`` and a fresh base model with the
    adapter saved in ``directory`` loaded by plain PEFT."""
    import peft

    reloaded = peft.PeftModel.from_pretrained(small_llama(vocab_size), directory).eval()
    model.eval()
    with torch.no_grad():
        return (reloaded(**batch).logits - model(**batch).logits).abs().max().item()
