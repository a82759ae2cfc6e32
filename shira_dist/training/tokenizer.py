"""Tokenizers behind one small interface: a Hugging Face tokenizer, or built-in bytes.

    tok.encode(text, add_special_tokens) -> list[int]
    tok.pad_id, tok.eos_id, tok.vocab_size, tok.fingerprint   (fingerprint keys data caches)

``bytes`` (for models built from an inline config, which ship no tokenizer): every UTF-8
byte is its own token 0..255; 256 is padding, 257 end of sequence. Needs vocab_size >= 258.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Protocol


class Tokenizer(Protocol):
    pad_id: int
    eos_id: Optional[int]
    vocab_size: int
    fingerprint: str

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens; no special tokens are ever added at the start."""

    pad_id = 256
    eos_id = 257
    vocab_size = 258
    fingerprint = "bytes-v1"

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A transformers tokenizer; padding falls back to EOS (or 0) when it has no pad token."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self.eos_id = hf_tokenizer.eos_token_id
        pad = hf_tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = len(hf_tokenizer)
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else repr(sorted(hf_tokenizer.get_vocab().items()))
        self.fingerprint = f"{type(hf_tokenizer).__name__}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]


def load_tokenizer(spec: str, model_dir: Optional[str]) -> Tokenizer:
    """``spec``: "bytes", a local tokenizer directory, or "" for the model directory's own."""
    if spec == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    directory = spec or model_dir
    return HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))
