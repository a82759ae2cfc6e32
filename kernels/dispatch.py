"""Which implementation runs: Triton on CUDA, PyTorch elsewhere.

``SHIRA_DIST_KERNEL_BACKEND`` overrides it: "auto" (default), "torch" (never Triton), or
"triton" (always; on the CPU only under Triton's interpreter, ``TRITON_INTERPRET=1``, which
is how the tests cover the Triton dispatch without a GPU).

With Triton, ``SHIRA_DIST_TRITON_SDDMM`` picks the values' SDDMM: "gather" (default: each
entry's dot product from gathered rows) or "blocked" (tiles of grad_y^T @ x on tensor cores,
entries picked out on chip); see triton_kernels.py and ``bench_sddmm.py --device cuda``.

On the CPU, the values' SDDMM has its own switch, ``SHIRA_DIST_CPU_SDDMM`` = "auto" | "native"
| "torch" (native C++ kernel or torch.sparse.sampled_addmm), see cpu_sddmm.py.
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
# looked up once, at import: a compiled graph cannot trace a search of the import path
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def use_triton(t: Tensor) -> bool:
    backend = os.environ.get("SHIRA_DIST_KERNEL_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"SHIRA_DIST_KERNEL_BACKEND={backend!r} is invalid; allowed: {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return t.is_cuda and _TRITON_INSTALLED


TRITON_SDDMM = ("gather", "blocked")


def triton_sddmm() -> str:
    """The Triton SDDMM variant chosen by ``SHIRA_DIST_TRITON_SDDMM``."""
    kind = os.environ.get("SHIRA_DIST_TRITON_SDDMM", "gather")
    if kind not in TRITON_SDDMM:
        raise ValueError(f"SHIRA_DIST_TRITON_SDDMM={kind!r} is invalid; allowed: {TRITON_SDDMM}")
    return kind
