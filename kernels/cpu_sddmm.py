"""The native CPU kernels (cpu_sddmm.cpp): built once with the system C++ compiler, called via ctypes.

    sddmm     out[k] = Σ_t grad_y[t, rows[k]] · x[t, cols[k]]      grad_y: (T, out), x: (T, in)
    spmm      out[t, dst[k]] += v[k] · inp[t, src[k]]              x @ S^T and grad_y @ S
    scatter_  W[rows[k], cols[k]] = W0_k + scale·v[k]  /  = W0_k     merge, rewrite, restore

Why a small C++ kernel: on the CPU, ``torch.sparse.sampled_addmm`` (MKL) costs about as much
as the layer's forward matmul, and torch.compile's gather-reduce needs transposed copies of
grad_y and x that cost as much again; the kernel transposes tiles of 128 tokens into
L2-sized buffers instead (see the .cpp header). benchmarks/bench_sddmm.py compares them.
The sparse products use the same tiles (one vectorised axpy per entry), read the row-major
entry list both ways, so no CSR of S^T is kept (measured 0.4-0.7x of the layer's dense
forward vs MKL CSR's 0.5-1.1x, T=1024, r=32, 2 threads).

The library is compiled on first use (about a second; ``-march=native``) into
``$SHIRA_DIST_CACHE`` (default ``~/.cache/shira_dist``), under a name that hashes the source,
the flags and the CPU, so a shared home across different machines is safe. Without a
compiler, :func:`library` returns None (with one warning) and callers fall back to
torch.sparse. ``SHIRA_DIST_CPU_SDDMM`` chooses: "auto" (default: native if it builds),
"native" (error if it does not), "torch" (always torch.sparse).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

CHOICES = ("auto", "native", "torch")
_SOURCE = Path(__file__).with_name("cpu_sddmm.cpp")
# -fassociative-math (with the two flags it needs) lets the compiler sum each dot product's
# vector lanes as a tree; without it the 16 lanes are added one after another in order, which
# made the kernel ~1.3-1.8x slower. The sums' order is arbitrary anyway (tiles, threads).
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
          "-std=c++17", "-shared", "-fPIC"]
_FUNCS = {torch.float32: "shira_sddmm_f32", torch.float64: "shira_sddmm_f64"}
_SPMM_FUNCS = {torch.float32: "shira_spmm_f32", torch.float64: "shira_spmm_f64"}
_SCATTER_FUNCS = {torch.float32: "shira_scatter_f32", torch.float64: "shira_scatter_f64"}
SCATTER_MODES = {"merge": 0, "rewrite": 1, "restore": 2}


def choice() -> str:
    value = os.environ.get("SHIRA_DIST_CPU_SDDMM", "auto")
    if value not in CHOICES:
        raise ValueError(f"SHIRA_DIST_CPU_SDDMM={value!r} is invalid; allowed: {CHOICES}")
    return value


def usable(x: Tensor, rows: Tensor) -> bool:
    """Whether :func:`sddmm` takes these inputs (CPU, fp32/fp64, int32 indices) and is chosen."""
    if x.device.type != "cpu" or x.dtype not in _FUNCS or rows.dtype != torch.int32:
        return False
    want = choice()
    if want == "torch":
        return False
    if library() is None:
        if want == "native":
            raise RuntimeError("SHIRA_DIST_CPU_SDDMM=native but the native SDDMM kernel did not build "
                               "(see the warning above); use 'auto' or 'torch'")
        return False
    return True


def _cpu_id() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel library, building it on first use; None if it cannot be built."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        warnings.warn("shira_dist: no C++ compiler found; the CPU SDDMM falls back to torch.sparse (slower)")
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([compiler, *_FLAGS]).encode() + _cpu_id().encode())
    cache = Path(os.environ.get("SHIRA_DIST_CACHE", Path.home() / ".cache" / "shira_dist"))
    path = cache / f"cpu_sddmm_{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: safe with
                built = Path(tmp) / path.name                    # several processes building at once
                subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], check=True,
                               capture_output=True, text=True)
                os.replace(built, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"shira_dist: building the native CPU SDDMM failed; falling back to torch.sparse "
                      f"(slower): {detail[-2000:]}")
        return None
    for name in _FUNCS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_void_p]
        fn.restype = None
    for name in _SPMM_FUNCS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
        fn.restype = None
    for name in _SCATTER_FUNCS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_double,
                                                                      ctypes.c_void_p] + [ctypes.c_int64] * 2
        fn.restype = None
    return lib


def scatter_usable(weight: Tensor, indices: Tensor) -> bool:
    """Whether :func:`scatter_` takes this weight (CPU, fp32/fp64, contiguous) and indices (int32)."""
    return (weight.device.type == "cpu" and weight.dtype in _SCATTER_FUNCS and weight.is_contiguous()
            and indices.dtype == torch.int32 and indices.device.type == "cpu" and usable(weight, indices))


def scatter_(weight: Tensor, indices: Tensor, mode: str, saved: Tensor, values: Optional[Tensor] = None,
             scale: float = 1.0) -> None:
    """In place at ``indices`` of ``weight`` (out, in): mode "merge" fills ``saved`` (nnz,) with W0's
    entries and writes W0 + scale*values; "rewrite" writes saved + scale*values; "restore"
    writes ``saved`` back (bit-exact). indices: (2, nnz) int32. Check :func:`scatter_usable` first.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available; check scatter_usable() first")
    nnz = indices.shape[1]
    if saved.dtype != weight.dtype or saved.shape != (nnz,) or not saved.is_contiguous():
        raise ValueError(f"scatter_: saved must be a contiguous ({nnz},) {weight.dtype} tensor, got "
                         f"{tuple(saved.shape)} {saved.dtype}")
    if mode != "restore":
        values = values.detach().to(weight.dtype).contiguous()
    rows, cols = indices[0].contiguous(), indices[1].contiguous()
    getattr(lib, _SCATTER_FUNCS[weight.dtype])(
        weight.data_ptr(), rows.data_ptr(), cols.data_ptr(), weight.shape[1], nnz,
        None if values is None else values.data_ptr(), float(scale), saved.data_ptr(), SCATTER_MODES[mode],
        torch.get_num_threads())


def sddmm(grad_y: Tensor, x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """grad_y: (T, out), x: (T, in) same dtype (fp32/fp64, CPU); rows/cols: (nnz,) int32 -> (nnz,).

    Uses ``torch.get_num_threads()`` threads. Check :func:`usable` first.
    """
    if grad_y.dtype != x.dtype or grad_y.shape[0] != x.shape[0]:
        raise ValueError(f"sddmm: grad_y {tuple(grad_y.shape)} {grad_y.dtype} and x {tuple(x.shape)} {x.dtype} "
                         "need the same dtype and number of tokens")
    lib = library()
    if lib is None:
        raise RuntimeError("the native SDDMM kernel is not available; check usable() first")
    grad_y, x = grad_y.contiguous(), x.contiguous()
    rows, cols = rows.contiguous(), cols.contiguous()
    out = torch.empty(rows.numel(), dtype=x.dtype)
    getattr(lib, _FUNCS[x.dtype])(grad_y.data_ptr(), x.data_ptr(), rows.data_ptr(), cols.data_ptr(), rows.numel(),
                                  x.shape[0], grad_y.shape[1], x.shape[1], torch.get_num_threads(), out.data_ptr())
    return out


def spmm(inp: Tensor, src: Tensor, dst: Tensor, values: Tensor, n_dst: int, n_wide: int) -> Tensor:
    """``out[t, dst[k]] += values[k] * inp[t, src[k]]``: (T, n_src) -> (T, n_dst), fresh.

    That is ``inp @ A^T`` for the sparse A (n_dst, n_src) with ``A[dst[k], src[k]] = values[k]``:
    the forward ``x @ S^T`` with (src, dst) = (cols, rows), and ``grad_y @ S`` with (rows,
    cols), from the same entry list (no CSR of S^T). inp/values fp32 or fp64 on the CPU,
    src/dst (nnz,) int32; n_wide: the in-features width, which picks the token tile.
    Reference: ``inp @ A.t()`` with A dense.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available; check usable() first")
    if values.dtype != inp.dtype:
        raise ValueError(f"spmm: values {values.dtype} and input {inp.dtype} need the same dtype")
    inp, values = inp.contiguous(), values.contiguous()
    src, dst = src.contiguous(), dst.contiguous()
    out = torch.empty(inp.shape[0], n_dst, dtype=inp.dtype)
    getattr(lib, _SPMM_FUNCS[inp.dtype])(inp.data_ptr(), src.data_ptr(), dst.data_ptr(), values.data_ptr(),
                                         src.numel(), inp.shape[0], inp.shape[1], n_dst, n_wide,
                                         torch.get_num_threads(), out.data_ptr())
    return out
