"""The native CPU kernels (cpu_sddmm.cpp): built once with the system C++ compiler, called via ctypes.

A pattern S (out, in) comes as CSR (``crow`` (out+1,) int32, ``col`` (nnz,) int16 or int32,
row-major), with r(k) the row of entry k; values and results are (nnz,) in row-major order:

    sddmm     out[k] = Σ_t grad_y[t, r(k)] · x[t, col[k]]          grad_y: (T, out), x: (T, in)
    spmm      x @ S^T (forward) and, ``transposed``, grad_y @ S (grad_x)
    scatter_  W[r(k), col[k]] = W0_k + scale·v[k]  /  = W0_k       merge, rewrite, restore

Why a small C++ kernel: on the CPU, ``torch.sparse.sampled_addmm`` (MKL) costs about as much
as the layer's forward matmul, and torch.compile's gather-reduce needs transposed copies of
grad_y and x that cost as much again; the kernel transposes tiles of 128 tokens into
L2-sized buffers instead (see the .cpp header). benchmarks/bench_sddmm.py compares them.
The sparse products use the same tiles and read S's rows both ways, so no CSR of S^T is kept:
the forward keeps each output row's sums in registers while the row's entries stream past,
grad_x is vectorised axpys (a few times faster than MKL's CSR products at r=32). With fewer
token tiles than threads (small batches), the threads share each tile and split S's rows
instead (see the .cpp header).

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
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

CHOICES = ("auto", "native", "torch")
_SOURCE = Path(__file__).with_name("cpu_sddmm.cpp")
# -fassociative-math (with the two flags it needs) lets the compiler sum each dot product's
# vector lanes as a tree instead of one lane after another, a serial chain; the sums' order
# is arbitrary anyway (tiles, threads).
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
          "-std=c++17", "-shared", "-fPIC"]
_VALUE_TYPES = {torch.float32: "f32", torch.float64: "f64"}
_INDEX_TYPES = {torch.int16: "i16", torch.int32: "i32"}  # column indices; crow is always int32
_KERNELS = ("sddmm", "spmm", "scatter")


def _func(lib: ctypes.CDLL, kernel: str, values: torch.dtype, col: torch.dtype):
    return getattr(lib, f"shira_{kernel}_{_VALUE_TYPES[values]}_{_INDEX_TYPES[col]}")


SCATTER_MODES = {"merge": 0, "rewrite": 1, "restore": 2}


def choice() -> str:
    value = os.environ.get("SHIRA_DIST_CPU_SDDMM", "auto")
    if value not in CHOICES:
        raise ValueError(f"SHIRA_DIST_CPU_SDDMM={value!r} is invalid; allowed: {CHOICES}")
    return value


def usable(x: Tensor, col: Tensor) -> bool:
    """Whether the kernels take these inputs (CPU, fp32/fp64, int16/int32 columns) and are chosen."""
    if x.device.type != "cpu" or x.dtype not in _VALUE_TYPES or col.dtype not in _INDEX_TYPES:
        return False
    want = choice()
    if want == "torch":
        return False
    if not available():
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


@torch.compiler.assume_constant_result  # a compiled graph asks once (the build reads files)
def available() -> bool:
    """Whether the kernel library is built (building it on first use)."""
    return library() is not None


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
            _drop_stale_builds(cache, keep=path)
        else:
            os.utime(path)  # in use: not stale for other versions' clean-up
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"shira_dist: building the native CPU SDDMM failed; falling back to torch.sparse "
                      f"(slower): {detail[-2000:]}")
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = {"sddmm": [ptr] * 4 + [i64] * 4 + [ptr], "spmm": [ptr] * 4 + [ctypes.c_double] + [i64] * 6 + [ptr],
                "scatter": [ptr] * 3 + [i64] * 2 + [ptr, ctypes.c_double, ptr] + [i64] * 2}
    for kernel in _KERNELS:
        for values in _VALUE_TYPES:
            for col in _INDEX_TYPES:
                fn = _func(lib, kernel, values, col)
                fn.argtypes, fn.restype = argtypes[kernel], None
    return lib


_STALE_AFTER_S = 30 * 24 * 3600


def _drop_stale_builds(cache: Path, keep: Path) -> None:
    """Remove builds of other source versions untouched for 30 days (a loaded library stays valid)."""
    now = time.time()
    for old in cache.glob("cpu_sddmm_*.so"):
        try:
            if old != keep and now - old.stat().st_mtime > _STALE_AFTER_S:
                old.unlink()
        except OSError:
            pass  # another process removed it first


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available; check usable() first")
    return lib


def _pattern(crow: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    if (crow.dtype != torch.int32 or col.dtype not in _INDEX_TYPES or crow.device.type != "cpu"
            or col.device.type != "cpu"):
        raise ValueError(f"the native kernels take an int32 crow and an int16/int32 col on the CPU, got "
                         f"{crow.dtype} on {crow.device.type}, {col.dtype} on {col.device.type}")
    return crow.contiguous(), col.contiguous()


def scatter_usable(weight: Tensor, col: Tensor) -> bool:
    """Whether :func:`scatter_` takes this weight (CPU, fp32/fp64, contiguous) and pattern (int32, CPU)."""
    return (weight.device.type == "cpu" and weight.dtype in _VALUE_TYPES and weight.is_contiguous()
            and col.device.type == "cpu" and usable(weight, col))


def scatter_(weight: Tensor, crow: Tensor, col: Tensor, mode: str, saved: Tensor, values: Optional[Tensor] = None,
             scale: float = 1.0) -> None:
    """In place at the pattern's entries of ``weight`` (out, in): mode "merge" fills ``saved`` (nnz,)
    with W0's entries and writes W0 + scale*values; "rewrite" writes saved + scale*values;
    "restore" writes ``saved`` back (bit-exact). saved/values: row-major order. Check
    :func:`scatter_usable` first.
    """
    crow, col = _pattern(crow, col)
    nnz = col.numel()
    if crow.numel() != weight.shape[0] + 1:
        raise ValueError(f"scatter_: crow has {crow.numel()} offsets for a weight with {weight.shape[0]} rows")
    if saved.dtype != weight.dtype or saved.shape != (nnz,) or not saved.is_contiguous():
        raise ValueError(f"scatter_: saved must be a contiguous ({nnz},) {weight.dtype} tensor, got "
                         f"{tuple(saved.shape)} {saved.dtype}")
    if mode != "restore":
        values = values.detach().to(weight.dtype).contiguous()
    _func(_lib(), "scatter", weight.dtype, col.dtype)(
        weight.data_ptr(), crow.data_ptr(), col.data_ptr(), weight.shape[0], weight.shape[1],
        None if values is None else values.data_ptr(), float(scale), saved.data_ptr(), SCATTER_MODES[mode],
        torch.get_num_threads())


def sddmm(grad_y: Tensor, x: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """grad_y: (T, out), x: (T, in) same dtype (fp32/fp64, CPU); crow (out+1,), col (nnz,) int32
    -> (nnz,) in row-major order. Uses ``torch.get_num_threads()`` threads. Check :func:`usable` first.
    """
    if grad_y.dtype != x.dtype or grad_y.shape[0] != x.shape[0]:
        raise ValueError(f"sddmm: grad_y {tuple(grad_y.shape)} {grad_y.dtype} and x {tuple(x.shape)} {x.dtype} "
                         "need the same dtype and number of tokens")
    crow, col = _pattern(crow, col)
    if crow.numel() != grad_y.shape[1] + 1:
        raise ValueError(f"sddmm: crow has {crow.numel()} offsets for grad_y with {grad_y.shape[1]} features")
    grad_y, x = grad_y.contiguous(), x.contiguous()
    out = torch.empty(col.numel(), dtype=x.dtype)
    _func(_lib(), "sddmm", x.dtype, col.dtype)(grad_y.data_ptr(), x.data_ptr(), crow.data_ptr(), col.data_ptr(),
                                     grad_y.shape[1], x.shape[1], x.shape[0], torch.get_num_threads(), out.data_ptr())
    return out


def spmm(inp: Tensor, crow: Tensor, col: Tensor, values: Tensor, n_cols: int, transposed: bool = False,
         scale: float = 1.0, out: Optional[Tensor] = None) -> Tensor:
    """The sparse product with ``scale * S``, S (n_rows, n_cols) = CSR(crow, col, values):

    ``transposed=False``: inp (T, n_cols) -> inp @ (scale*S)^T (T, n_rows)   (the forward x @ S^T)
    ``transposed=True``:  inp (T, n_rows) -> inp @ (scale*S)   (T, n_cols)   (grad_x = grad_y @ S)

    values (nnz,) row-major (columns ascending within a row, as layouts keep them), same dtype
    as inp (fp32/fp64, CPU). With ``out`` (contiguous, that shape and dtype) the product is added
    to it in place and ``out`` returned; else a fresh tensor. Reference: ``inp @ dense(S).t()``
    / ``inp @ dense(S)``, times scale.
    """
    crow, col = _pattern(crow, col)
    if values.dtype != inp.dtype:
        raise ValueError(f"spmm: values {values.dtype} and input {inp.dtype} need the same dtype")
    n_rows = crow.numel() - 1
    width = n_rows if transposed else n_cols
    if inp.shape[1] != width:
        raise ValueError(f"spmm: input has {inp.shape[1]} features, the pattern ({n_rows}, {n_cols}) needs {width}")
    shape = (inp.shape[0], n_cols if transposed else n_rows)
    if out is not None and (tuple(out.shape) != shape or out.dtype != inp.dtype or not out.is_contiguous()
                            or out.device.type != "cpu"):
        raise ValueError(f"spmm: out must be a contiguous {shape} {inp.dtype} CPU tensor, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device.type}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    inp, values = inp.contiguous(), values.contiguous()
    accumulate = out is not None
    if out is None:
        out = torch.empty(shape, dtype=inp.dtype)
    _func(_lib(), "spmm", inp.dtype, col.dtype)(inp.data_ptr(), crow.data_ptr(), col.data_ptr(), values.data_ptr(),
                                            float(scale), n_rows, n_cols, int(transposed), inp.shape[0],
                                            torch.get_num_threads(), int(accumulate), out.data_ptr())
    return out
