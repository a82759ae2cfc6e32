"""Which implementation runs: Triton on CUDA, PyTorch elsewhere.

``SHIRA_DIST_KERNEL_BACKEND`` overrides it: "auto" (default), "torch" (never Triton), or
"triton" (always; on the CPU only under Triton's interpreter, ``TRITON_INTERPRET=1``, which
is how the tests cover the Triton dispatch without a GPU).

On the CPU, the values' SDDMM has its own switch, ``SHIRA_DIST_CPU_SDDMM`` = "auto" | "native"
| "torch" (native C++ kernel or torch.sparse.sampled_addmm), see cpu_sddmm.py.
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


def use_triton(t: Tensor) -> bool:
    backend = os.environ.get("SHIRA_DIST_KERNEL_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"SHIRA_DIST_KERNEL_BACKEND={backend!r} is invalid; allowed: {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return t.is_cuda and importlib.util.find_spec("triton") is not None
