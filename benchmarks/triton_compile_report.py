"""What the Triton kernels compile to on NVIDIA GPUs, measured without a GPU.

Trains a small Llama a few steps through the Triton backend under Triton's interpreter (on the
CPU), in each mode and dtype (fused, unfused, both SDDMM variants, merge/unmerge, inference),
records the specialization of every kernel launch a CUDA device would compile, compiles each
for sm_80 (A100) and sm_90 (H100/H200) with Triton's compiler and ptxas, and prints one table:
registers per thread, stack frame and spills, shared memory, tensor-core instructions, TF32,
and the widest global load. Static facts of the generated code, not speed.

    python benchmarks/triton_compile_report.py [--tokens 2x32] [--archs 80 90]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for tools/
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the launches run on the CPU
os.environ.setdefault("SHIRA_DIST_KERNEL_BACKEND", "triton")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from shira_dist import ShiraConfig, get_peft_model  # noqa: E402
from tools.cuda_compile import compile_launches, exercise, record_launches  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_model(dtype: torch.dtype, mode: str, batch: int, seq: int) -> None:
    """A small Llama with all 7 projections adapted, through exercise(): training steps,
    inference, merge, unmerge."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=seq)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(cfg).to(dtype), ShiraConfig(r=4, target_modules=TARGETS, random_seed=0))
    model.set_fuse_mode(mode)
    exercise(model, torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="2x32", help="batch x sequence of the exercised model (default 2x32)")
    ap.add_argument("--archs", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    args = ap.parse_args()
    try:
        batch, seq = (int(v) for v in args.tokens.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--tokens={args.tokens!r}: expected BATCHxSEQ, e.g. 2x32") from None
    torch.set_num_threads(2)
    with record_launches() as launches:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for mode, sddmm in (("fused", "gather"), ("unfused", "gather"), ("unfused", "blocked")):
                os.environ["SHIRA_DIST_TRITON_SDDMM"] = sddmm
                run_model(dtype, mode, batch, seq)
    reports = compile_launches(launches, tuple(args.archs))
    print(f"{len(launches)} distinct launches at {batch}x{seq} tokens, compiled for "
          + ", ".join(f"sm_{a}" for a in args.archs) + f" (triton {__import__('triton').__version__})\n")
    print("| kernel | pointer dtypes | sm | warps | regs | stack B | spill st/ld B | shared B | tensor cores "
          "| tf32 | widest load bits | constexprs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        cx = ", ".join(f"{k}={v}" for k, v in r.constexprs.items() if not k.startswith("s"))
        print(f"| {r.kernel.strip('_').removesuffix('_kernel')} | {r.dtypes} | {r.arch} | {r.num_warps} "
              f"| {r.registers} | {r.stack_bytes} | {r.spill_store_bytes}/{r.spill_load_bytes} | {r.shared_bytes} "
              f"| {'yes' if r.tensor_cores else 'no'} | {'yes' if r.tf32 else 'no'} | {r.widest_load_bits} | {cx} |")


if __name__ == "__main__":
    main()
