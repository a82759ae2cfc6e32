"""Sparse SHiRA math: pure functions over tensors, each next to its dense reference.

Installed as ``shira_dist.kernels``. Modules only decide which tensors to pass;
everything numerical lives here.
"""

# With the repository root on sys.path (pytest, ``python -c``) this directory is also the
# top-level "kernels", the name of Hugging Face's kernels package, which transformers imports
# when it probes for that package. That copy stays empty: the custom ops of ops.py register
# once per process, and every class exists once.
if __name__ == "shira_dist.kernels":
    from .layout import CsrLayout, build_csr_layout, compress_indices, csr_layout, expand_indices, flat_index
    from .merge import scatter_merge_, scatter_merge_reference, scatter_restore_, scatter_rewrite_
    from .sparse_delta import (
        delta_matmul_reference,
        fused_values_grad,
        sddmm,
        sddmm_reference,
        sparse_delta_add_,
        sparse_delta_matmul,
    )

__all__ = [
    "CsrLayout",
    "build_csr_layout",
    "compress_indices",
    "csr_layout",
    "expand_indices",
    "flat_index",
    "scatter_merge_",
    "scatter_merge_reference",
    "scatter_restore_",
    "scatter_rewrite_",
    "sparse_delta_matmul",
    "sparse_delta_add_",
    "fused_values_grad",
    "sddmm",
    "sddmm_reference",
    "delta_matmul_reference",
]
