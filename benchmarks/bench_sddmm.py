"""Micro-benchmark of the sparse kernels behind a SHiRA layer, side by side (CPU or CUDA).

    python benchmarks/bench_sddmm.py            # T=1024 tokens, r=32, 2 threads
    python benchmarks/bench_sddmm.py --repeats 5 --no-inductor
    python benchmarks/bench_sddmm.py --device cuda --dtype bf16 --tokens 8192 --shapes 11008x4096 4096x11008 4096x4096

Every time is the median of ``--steps`` calls, divided by the dense forward matmul
``x @ W.T`` of the same layer measured in the same round; each round runs all methods, and
the table shows the median ratio over ``--repeats`` rounds (the machine may be shared).
Transposed copies a method needs are included in its time.

SDDMM (values gradient, (nnz,)):
  dense           (grad_y^T @ x) then gather the nnz entries
  sampled_addmm   torch.sparse.sampled_addmm on CSR(S), with grad_y^T made contiguous
  inductor        torch.compile gather-multiply-reduce on transposed copies of grad_y and x
  native          shira_dist's C++ kernel (kernels/cpu_sddmm.cpp), the default CPU path
Forward delta y = x @ S^T (unfused forward and inference):
  csr(S) spmm     torch.sparse.mm on CSR(S) (MKL)
  native          the C++ kernel (with fewer token tiles than threads, threads split S's rows)
  native add      the same adding into an existing output (the inference path)
  LoRA (x A^T) B^T  for scale: LoRA's two thin dense products at the same budget (r=R)
grad_x = grad_y @ S:
  csr(S^T) spmm   torch.sparse.mm on a CSR of S^T (needs a second index copy)
  mm(gy, csr S)   torch.mm(grad_y, CSR(S)): only the CSR of S
  native          the C++ kernel, from S's rows
With ``--device cuda`` the native and inductor rows are replaced by shira_dist's Triton
kernels (kernels/triton_kernels.py: "triton", and "triton blocked" for the tensor-core SDDMM
that SHIRA_DIST_TRITON_SDDMM=blocked selects), torch.sparse runs cuSPARSE, times are taken
after ``torch.cuda.synchronize()``, and a method the device/dtype does not support shows "n/a".
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from bench_train import _median_time  # benchmarks/ is on sys.path when run as a script

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _inputs(out_f: int, in_f: int, tokens: int, r: int, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nnz = r * (in_f + out_f)
    flat = torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values
    rows, cols = flat // in_f, flat % in_f
    x, gy = torch.randn(tokens, in_f, generator=g), torch.randn(tokens, out_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    return (rows.to(device), cols.to(device), *(t.to(device=device, dtype=dtype) for t in (x, gy, w)))


def _crow(major: torch.Tensor, n: int) -> torch.Tensor:
    crow = torch.zeros(n + 1, dtype=torch.int32, device=major.device)
    crow[1:] = torch.cumsum(torch.bincount(major, minlength=n), 0)
    return crow


def methods(out_f: int, in_f: int, rows, cols, x, gy, use_inductor: bool, gpu_set: bool = False) -> dict:
    from shira_dist.kernels import cpu_sddmm

    if x.is_cuda or gpu_set:
        return cuda_methods(out_f, in_f, rows, cols, x, gy)
    nnz = rows.numel()
    r32, c32, crow = rows.int(), cols.int(), _crow(rows, out_f)
    pattern = torch.sparse_csr_tensor(crow, c32, torch.zeros(nnz), (out_f, in_f))
    s_csr = torch.sparse_csr_tensor(crow, c32, torch.randn(nnz), (out_f, in_f))
    v = s_csr.values()
    order_t = torch.argsort(cols * out_f + rows)
    s_t = torch.sparse_csr_tensor(_crow(cols, in_f), r32[order_t], s_csr.values()[order_t], (in_f, out_f))
    flat = rows * in_f + cols
    y_acc = torch.zeros(x.shape[0], out_f)
    r = nnz // (in_f + out_f)
    lora_a, lora_b = torch.randn(r, in_f), torch.randn(out_f, r)
    m = {
        "sddmm dense": lambda: (gy.t() @ x).view(-1)[flat],
        "sddmm sampled_addmm": lambda: torch.sparse.sampled_addmm(pattern, gy.t().contiguous(), x, beta=0.0),
        "sddmm native": lambda: cpu_sddmm.sddmm(gy, x, crow, c32),
        "forward csr(S) spmm": lambda: torch.sparse.mm(s_csr, x.t()).t(),
        "forward native": lambda: cpu_sddmm.spmm(x, crow, c32, v, in_f),
        "forward native add": lambda: cpu_sddmm.spmm(x, crow, c32, v, in_f, out=y_acc),
        "forward LoRA (x A^T) B^T": lambda: (x @ lora_a.t()) @ lora_b.t(),
        "grad_x csr(S^T) spmm": lambda: torch.sparse.mm(s_t, gy.t()).t(),
        "grad_x mm(gy, csr S)": lambda: torch.mm(gy, s_csr),
        "grad_x native": lambda: cpu_sddmm.spmm(gy, crow, c32, v, in_f, transposed=True),
    }
    if use_inductor:
        gather_reduce = torch.compile(lambda a, b, i, j: (a[i] * b[j]).sum(-1), dynamic=True)
        m["sddmm inductor"] = lambda: gather_reduce(gy.t().contiguous(), x.t().contiguous(), rows, cols)
    return m


def cuda_methods(out_f: int, in_f: int, rows, cols, x, gy) -> dict:
    """The same products on CUDA: dense and cuSPARSE references, shira_dist's Triton kernels."""
    from shira_dist.kernels import triton_kernels

    nnz, dt = rows.numel(), x.dtype
    r32, c32, crow = rows.int(), cols.int(), _crow(rows, out_f)
    v = torch.randn(nnz, device=x.device, dtype=dt)
    order_t = torch.argsort(cols * out_f + rows)
    crow_t, row_t, v_t = _crow(cols, in_f), r32[order_t], v[order_t]
    flat = rows * in_f + cols
    y_acc = torch.zeros(x.shape[0], out_f, device=x.device, dtype=dt)
    r = nnz // (in_f + out_f)
    lora_a = torch.randn(r, in_f, device=x.device, dtype=dt)
    lora_b = torch.randn(out_f, r, device=x.device, dtype=dt)

    def cusparse(make):  # cuSPARSE takes only some dtypes: a method that fails shows n/a
        try:
            fn = make()
            fn()
            return fn
        except (RuntimeError, NotImplementedError):
            return None

    def sampled_addmm():
        pattern = torch.sparse_csr_tensor(crow, c32, torch.zeros(nnz, device=x.device, dtype=dt), (out_f, in_f))
        return lambda: torch.sparse.sampled_addmm(pattern, gy.t().contiguous(), x, beta=0.0)

    def csr_mm(crow_, col_, val_, shape, inp):
        csr = torch.sparse_csr_tensor(crow_, col_, val_, shape)
        return lambda: torch.sparse.mm(csr, inp.t()).t()

    return {
        "sddmm dense": lambda: (gy.t() @ x).view(-1)[flat],
        "sddmm sampled_addmm": cusparse(sampled_addmm),
        "sddmm triton": lambda: triton_kernels.sddmm(gy, x, r32, c32),
        "sddmm triton blocked": lambda: triton_kernels.sddmm_blocked(gy, x, crow, r32, c32),
        "forward csr(S) spmm": cusparse(lambda: csr_mm(crow, c32, v, (out_f, in_f), x)),
        "forward triton add": lambda: triton_kernels.csr_spmm_add_(y_acc, x, crow, c32, v, 1.0),
        "forward LoRA (x A^T) B^T": lambda: (x @ lora_a.t()) @ lora_b.t(),
        "grad_x csr(S^T) spmm": cusparse(lambda: csr_mm(crow_t, row_t, v_t, (in_f, out_f), gy)),
        "grad_x triton (CSR of S^T)": lambda: triton_kernels.csr_spmm_add_(
            torch.zeros(gy.shape[0], in_f, device=x.device, dtype=dt), gy, crow_t, row_t, v_t, 1.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=["2816x1024", "1024x2816", "1024x1024"],
                    help="(out)x(in) weight shapes")
    ap.add_argument("--no-inductor", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: CUDA (or --gpu-set) only")
    ap.add_argument("--gpu-set", action="store_true",
                    help="the CUDA methods on the CPU (with TRITON_INTERPRET=1): checks this script, times nothing useful")
    args = ap.parse_args()
    if args.dtype == "bf16" and args.device == "cpu" and not args.gpu_set:
        ap.error("--dtype bf16: the CPU methods take fp32 only (use --device cuda)")
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    from shira_dist.kernels import cpu_sddmm

    if args.device == "cpu" and not args.gpu_set and cpu_sddmm.library() is None:
        raise SystemExit("the native SDDMM kernel did not build (see the warning above)")
    table: dict[str, dict[str, float]] = {}
    fwd_ms: dict[str, float] = {}
    for shape in args.shapes:
        out_f, in_f = (int(s) for s in shape.split("x"))
        rows, cols, x, gy, w = _inputs(out_f, in_f, args.tokens, args.r, args.device, dtype)
        ms = methods(out_f, in_f, rows, cols, x, gy, not args.no_inductor, args.gpu_set)
        ratios: dict[str, list[float]] = {name: [] for name in ms}
        fwds = []
        for _ in range(args.repeats):
            fwd = _median_time(lambda: x @ w.t(), args.steps, sync)
            fwds.append(fwd)
            for name, fn in ms.items():
                ratios[name].append(_median_time(fn, args.steps, sync) / fwd if fn is not None else float("nan"))
        fwd_ms[shape] = statistics.median(fwds) * 1e3
        for name, vals in ratios.items():
            table.setdefault(name, {})[shape] = statistics.median(vals)
    where = "CUDA" if args.device == "cuda" else f"{args.threads} threads"
    print(f"\nT={args.tokens}, r={args.r}, {where}, {args.dtype}; time / forward matmul x @ W.T "
          f"(median of {args.repeats} rounds)\n")
    print("| method | " + " | ".join(args.shapes) + " |")
    print("|---|" + "---|" * len(args.shapes))
    print("| forward x @ W.T, ms | " + " | ".join(f"{fwd_ms[s]:.1f}" for s in args.shapes) + " |")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join("n/a" if row[s] != row[s] else f"{row[s]:.2f}x" for s in args.shapes) + " |")


if __name__ == "__main__":
    main()
