"""The Triton kernels as an NVIDIA GPU would build them, checked on a machine without one.

The interpreter tests (test_triton_kernels.py) check the kernels' arithmetic; these record the
specialization every launch of a real training run would compile on CUDA (through
tools.cuda_compile), compile each with Triton's compiler and ptxas for sm_80
(A100) and sm_90 (H100/H200), and check the generated code: it compiles, nothing spills, the
gathers load 128-bit vectors, the tensor-core SDDMM really uses the tensor cores for half
inputs, and fp32 stays IEEE fp32 unless torch allows TF32.
"""

from __future__ import annotations

import os

import pytest
import torch

from tools import cuda_compile
from tools.cuda_compile import Launch, compile_launches, exercise, record_launches

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = torch.device("cpu" if INTERPRET else "cuda")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _exercise(monkeypatch, dtype: torch.dtype, mode: str, sddmm: str, batch: int = 2, seq: int = 16) -> None:
    """Two SGD steps, an inference forward, a merge and an unmerge of a tiny Llama on the
    Triton backend."""
    from shira_dist import ShiraConfig, get_peft_model
    from tests.conftest import tiny_llama

    monkeypatch.setenv("SHIRA_DIST_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("SHIRA_DIST_TRITON_SDDMM", sddmm)
    model = get_peft_model(tiny_llama(dtype=dtype), ShiraConfig(r=2, target_modules=TARGETS, random_seed=0)).to(DEV)
    model.set_fuse_mode(mode)
    exercise(model, torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(0)).to(DEV))


def _by_kernel(reports, dtype: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in reports:
        if r.dtypes.startswith(dtype):
            out.setdefault(r.kernel.strip("_").removesuffix("_kernel"), []).append(r)
    return out


def test_every_launch_of_a_training_run_compiles_for_a100_and_h100(monkeypatch):
    with record_launches() as launches:
        for dtype in (torch.float32, torch.bfloat16):
            _exercise(monkeypatch, dtype, "fused", "gather")
            _exercise(monkeypatch, dtype, "unfused", "gather")
            _exercise(monkeypatch, dtype, "unfused", "blocked")
    reports = compile_launches(launches, archs=(80, 90))
    assert len(reports) == 2 * len(launches)
    assert {r.arch for r in reports} == {80, 90}
    every = {"scatter_merge", "scatter_restore", "sddmm", "sddmm_blocked", "csr_spmm"}
    fp32, bf16 = _by_kernel(reports, "fp32"), _by_kernel(reports, "bf16")
    assert set(fp32) == every and set(bf16) == every  # all kernels, both dtypes, as a training run launches them
    for r in reports:
        assert not r.spills() and r.stack_bytes == 0, r  # nothing in local memory
    for name in ("scatter_merge", "scatter_restore", "sddmm", "csr_spmm"):
        for r in fp32[name] + bf16[name]:
            assert r.widest_load_bits == 128, r  # the gathers read 16 contiguous bytes per thread
            assert not r.tensor_cores, r
    for r in fp32["sddmm"] + bf16["sddmm"] + fp32["csr_spmm"] + bf16["csr_spmm"]:
        # latency-bound gathers: <= 64 registers per thread keeps at least half of an SM's 64
        # warps resident (65536 registers); the gather SDDMM had 126 at 4 warps, 64 at 8
        assert r.registers <= 64, r
    for r in bf16["sddmm_blocked"]:  # tiles of grad_y^T @ x on the tensor cores, fed by 16-byte cp.async
        assert r.tensor_cores and not r.tf32 and r.widest_load_bits == 128, r
    for r in fp32["sddmm_blocked"]:  # torch's default fp32 matmul precision ("highest"): no TF32
        assert r.constexprs["IEEE"] is True and not r.tf32 and not r.tensor_cores, r


def test_odd_token_counts_still_load_whole_vectors(monkeypatch):
    # 2 x 9 tokens: the feature-major copies the gathers read have rows padded to 16 elements,
    # so Triton still specializes their stride as divisible by 16 and loads 128-bit vectors
    # (with a row stride of 18 every load would be one element).
    from shira_dist.kernels import triton_kernels

    x = torch.randn(18, 40, device=DEV)
    fm = triton_kernels.feature_major(x)
    assert fm.shape == (40, 18) and fm.stride() == (32, 1) and torch.equal(fm, x.t())
    assert triton_kernels.feature_major(fm.t()).data_ptr() == fm.data_ptr()  # already in the layout: no copy
    with record_launches() as launches:
        _exercise(monkeypatch, torch.float32, "unfused", "gather", batch=2, seq=9)
    reports = compile_launches(launches, archs=(80,))
    kernels = _by_kernel(reports, "fp32")
    assert set(kernels) >= {"sddmm", "csr_spmm"}
    for r in kernels["sddmm"] + kernels["csr_spmm"]:
        assert r.widest_load_bits == 128, r


def test_tf32_follows_torch_float32_matmul_precision(monkeypatch):
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # torch's switch that allows TF32 in fp32 matmuls
        with record_launches() as launches:
            _exercise(monkeypatch, torch.float32, "unfused", "blocked")
    finally:
        torch.set_float32_matmul_precision(precision)
    blocked = _by_kernel(compile_launches(launches, archs=(80,)), "fp32")["sddmm_blocked"]
    assert blocked and all(r.constexprs["IEEE"] is False and r.tf32 and r.tensor_cores for r in blocked)


def test_compile_failures_and_bad_targets_are_reported():
    with record_launches() as launches:
        from shira_dist.kernels import triton_kernels

        y = torch.zeros(32, 8, device=DEV)
        crow = torch.arange(9, device=DEV) * 2
        col = torch.arange(16, device=DEV) % 4
        triton_kernels.csr_spmm_add_(y, torch.randn(32, 4, device=DEV), crow, col, torch.ones(16, device=DEV), 1.0)
    (launch,) = launches
    names = triton_kernels._csr_spmm_kernel.arg_names
    bad = Launch(launch.kernel, launch.signature, {**launch.constexprs, (names.index("BLOCK_T"),): 48}, launch.attrs,
                 launch.options)  # tl.arange needs a power of two
    with pytest.raises(RuntimeError, match="compiling the Triton kernels for sm_.*failed(.|\n)*power of 2"):
        compile_launches([bad], archs=(80,))
    with pytest.raises(ValueError, match=r"archs=\(8, 0\): each must be an int compute capability >= 75"):
        compile_launches([launch], archs=(8, 0))
    assert cuda_compile.KERNELS == tuple(n for n in cuda_compile.KERNELS if hasattr(triton_kernels, n))
