"""Build the Triton kernels for NVIDIA GPUs on a machine without one, and read what came out.

Triton's interpreter (how CI runs the kernels on the CPU) checks their arithmetic but never
compiles them: a kernel can pass every interpreted test and still fail to compile for a GPU,
spill registers, load one element at a time, or miss the tensor cores. Triton's own compiler
and the ``ptxas`` shipped in its wheel need no GPU, so this module compiles, for real GPU
targets, exactly the specializations that real launches would build:

    with record_launches() as launches:   # run anything that launches the kernels (the launches
        exercise(model, ids)              # still run, e.g. under the interpreter)
    reports = compile_launches(launches, archs=(80, 90))   # sm_80 = A100, sm_90 = H100/H200

A launch's specialization is what Triton's JIT derives from its arguments on a CUDA device:
pointer element types, which integers and pointers are divisible by 16 (this decides vector
loads), which integers equal 1, and the constexprs. Constexprs that the wrappers set only
because the interpreter runs (``_INTERPRETER_ONLY``) are given their GPU value.

Each report holds ptxas's register, stack-frame and spill counts, the shared memory Triton
allocates, whether the PTX has tensor-core instructions (``mma``/``wgmma``) and TF32
operands, and the widest global load in bits (``ld.global`` or ``cp.async``).

Relies on Triton internals of the pinned version (``create_function_from_signature``,
``JITFunction._pack_args``, ``backends.nvidia.compiler.get_ptxas``). Compiling runs in a fresh
Python process: Triton's interpreter replaces the compiler's language builders in a process
that imported triton with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator

from shira_dist.kernels import triton_kernels

KERNELS = ("_scatter_merge_kernel", "_scatter_restore_kernel", "_sddmm_kernel", "_sddmm_blocked_kernel",
           "_csr_spmm_kernel")
_INTERPRETER_ONLY = {"UPCAST": False}  # constexpr -> its value on a GPU


@dataclass(frozen=True)
class Launch:
    """One kernel specialization as a CUDA launch would compile it."""

    kernel: str
    signature: dict  # argument name -> Triton type ("*fp32", "i32", "constexpr", ...)
    constexprs: dict  # (argument index,) -> value
    attrs: dict  # (argument index,) -> [["tt.divisibility", 16]] or []
    options: dict  # launch options, e.g. {"num_warps": 8}

    def key(self) -> str:
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))

    def dtypes(self) -> str:
        """The pointer arguments' element types, e.g. "fp32,i64,i16"."""
        return ",".join(t[1:] for t in self.signature.values() if t.startswith("*"))


@dataclass(frozen=True)
class Report:
    kernel: str
    dtypes: str
    arch: int
    num_warps: int
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    tensor_cores: bool  # mma.sync (sm_80+) or wgmma (sm_90a) in the PTX
    tf32: bool
    widest_load_bits: int  # ld.global or cp.async, 0 if none
    constexprs: dict  # name -> value

    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def _specialize(kernel_name: str, fn, args: tuple, kwargs: dict) -> Launch:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = JITFunction(fn)  # fn: the kernel's Python function
    backend = make_backend(GPUTarget("cuda", 90, 32))  # the specialization rules are the CUDA backend's
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, spec, parsed = binder(*args, **kwargs)
    _, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, parsed)
    names = jit.arg_names
    constexprs = {k: _INTERPRETER_ONLY.get(names[k[0]], v) for k, v in constexprs.items()}
    return Launch(kernel_name, dict(signature), constexprs, dict(attrs), options)


def exercise(model, ids, steps: int = 2, lr: float = 0.1) -> None:
    """Make the kernel launches of a training run on a SHiRA causal LM (``get_peft_model``'s
    result): ``steps`` SGD steps on the LM loss of ``ids`` (B, S), an inference forward, a merge
    and an unmerge."""
    import torch

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        model(ids)
        model.merge_adapter()
        model.unmerge_adapter()


class _Recorder:
    def __init__(self, name: str, launcher, sink: dict):
        self.name, self.launcher, self.sink = name, launcher, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            spec = _specialize(self.name, self.launcher.fn, args, dict(kwargs))
            self.sink.setdefault(spec.key(), spec)
            return self.launcher[grid](*args, **kwargs)

        return launch


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Record the CUDA specialization of every kernel launch made inside the block (distinct
    ones, in first-seen order); the launches themselves still run."""
    seen: dict[str, Launch] = {}
    originals = {n: getattr(triton_kernels, n) for n in KERNELS}
    launches: list[Launch] = []
    for n, k in originals.items():
        setattr(triton_kernels, n, _Recorder(n, k, seen))
    try:
        yield launches
    finally:
        for n, k in originals.items():
            setattr(triton_kernels, n, k)
        launches.extend(seen.values())


def compile_launches(launches: list[Launch], archs: tuple[int, ...] = (80, 90)) -> list[Report]:
    """Compile every launch for every ``sm_<arch>`` target (no GPU needed); one report each.

    Raises RuntimeError with the compiler's message if any of them fails to compile.
    """
    for a in archs:
        if not isinstance(a, int) or a < 75:
            raise ValueError(f"archs={archs!r}: each must be an int compute capability >= 75 (e.g. 80, 90)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          input=pickle.dumps(([vars(x) for x in launches], archs)))
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the Triton kernels for sm_{archs} failed:\n{proc.stderr.decode()[-4000:]}")
    return [Report(**r) for r in json.loads(proc.stdout.decode().splitlines()[-1])]


_PTXAS_USE = re.compile(r"Used (\d+) registers")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_LD_GLOBAL = re.compile(r"ld\.global(?:\.[a-z0-9]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\s")
_CP_ASYNC = re.compile(r"cp\.async\.c[ag]\.shared\.global\S*\s+\[[^]]+\],\s*\[[^]]+\],\s*(0x[0-9a-fA-F]+|\d+)")


def _widest_load_bits(ptx: str) -> int:
    widths = [int(v or 1) * int(b) for v, b in _LD_GLOBAL.findall(ptx)]
    widths += [8 * int(n, 0) for n in _CP_ASYNC.findall(ptx)]
    return max(widths, default=0)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int, int]:
    """(registers, stack frame, spill stores, spill loads) from ``ptxas -v`` on the PTX, with the
    ptxas Triton itself uses for ``arch``, for the PTX's own target (e.g. sm_90a)."""
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch).path
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"-arch={target}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas -arch={target} failed: {out.stderr[-2000:]}")
    text = out.stdout + out.stderr
    regs, stack = _PTXAS_USE.search(text), _PTXAS_STACK.search(text)
    return int(regs.group(1)), int(stack.group(1)), int(stack.group(2)), int(stack.group(3))


def _compile_one(launch: Launch, arch: int) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(triton_kernels, launch.kernel)
    src = ASTSource(fn, launch.signature, launch.constexprs, launch.attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    if not k.asm.get("cubin"):
        raise RuntimeError(f"{launch.kernel}: no cubin for sm_{arch}")
    ptx = k.asm["ptx"]
    regs, stack, spill_st, spill_ld = _ptxas_usage(ptx, arch)
    names = fn.arg_names
    return Report(kernel=launch.kernel, dtypes=launch.dtypes(), arch=arch, num_warps=k.metadata.num_warps,
                  registers=regs, stack_bytes=stack, spill_store_bytes=spill_st, spill_load_bytes=spill_ld,
                  shared_bytes=int(k.metadata.shared), tensor_cores=bool(re.search(r"\b(w?gmma|mma)\.", ptx)),
                  tf32=".tf32" in ptx, widest_load_bits=_widest_load_bits(ptx),
                  constexprs={names[i[0]]: v for i, v in launch.constexprs.items()})


def _main() -> None:
    launches, archs = pickle.loads(sys.stdin.buffer.read())
    reports = [_compile_one(Launch(**launch), a) for launch in launches for a in archs]
    print(json.dumps([r.__dict__ for r in reports]))


if __name__ == "__main__":
    _main()
