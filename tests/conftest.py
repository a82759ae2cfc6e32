"""Shared fixtures: tiny randomly initialised transformers models (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels are tested on the CPU through its interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def random_pattern(out_f: int, in_f: int, nnz: int, seed: int, shuffle: bool, empty_rows: bool = False):
    """A SHiRA pattern: (2, nnz) int32 distinct (row, col), row-major unless ``shuffle``;
    with ``empty_rows`` the lower half of the rows holds no entry."""
    from shira_dist.masks import sample_distinct

    g = torch.Generator().manual_seed(seed)
    rows_allowed = out_f // 2 if empty_rows else out_f  # rows >= rows_allowed stay empty
    flat = sample_distinct(rows_allowed * in_f, nnz, g, torch.device("cpu"))
    idx = torch.stack([flat // in_f, flat % in_f]).to(torch.int32)
    return idx[:, torch.randperm(nnz, generator=g)] if shuffle else idx


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
                    max_position_embeddings=64, word_embed_proj_dim=128)
    torch.manual_seed(seed)
    return OPTForCausalLM(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 101, (2, 9), generator=g)


_SHM = "/dev/shm"


def _deepspeed_shm_names() -> set[str]:
    try:
        return {n for n in os.listdir(_SHM) if n.startswith("deepspeed_allreduce_buffer_")}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_shared_memory():
    """Nothing outside its directory: a test that ran DeepSpeed on the CPU leaves no 69 MB
    all-reduce buffer in /dev/shm (tmpfs, so memory) once its processes are gone."""
    before = _deepspeed_shm_names()
    yield
    leaked = _deepspeed_shm_names() - before
    assert not leaked, f"left in {_SHM}: {sorted(leaked)}"
