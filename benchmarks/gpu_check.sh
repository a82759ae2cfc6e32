#!/usr/bin/env bash
# The GPU check, prepared for one short session on a borrowed GPU (the device tool's H100/H200):
# the Triton kernels' tests compiled on CUDA, the kernel micro-benchmark and the training
# benchmark in bf16 on a larger Llama (again with the tensor-core SDDMM for the values'
# gradient: SHIRA_DIST_TRITON_SDDMM=blocked), and the registers/spills the driver reports for the
# kernels. About 8 minutes on an H200; run from the repo root:
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (the device tool's folder) or ./gpu_out
#
# It uses the machine's own torch/triton/transformers/peft (nothing can be downloaded there) and
# installs shira_dist itself editable, without dependencies. Wheels in .whl/ (e.g. a newer peft,
# fetched here with `pip download --no-deps -d .whl peft==0.21.2` and carried) are installed first.
# SMOKE=1 runs the same steps on this machine's CPU at toy sizes (Triton interpreted), to check
# the script itself before spending device time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
py=${PYTHON:-python3}
status=0
step() {  # step NAME CMD...: run, log to $out/NAME.txt, remember a failure, go on
    local name=$1; shift
    echo "== $name: $*" | tee "$out/$name.txt"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/$name.txt"
    [ "$rc" = 0 ] || status=1
}

if [ "${SMOKE:-0}" = 1 ]; then
    device=cpu; export TRITON_INTERPRET=1
    sddmm_args=(--tokens 64 --shapes 96x64 --steps 2 --repeats 1 --no-inductor --gpu-set)
    train_args=(--hidden 64 --inter 128 --layers 2 --vocab 100 --batch 2 --seq 32 --steps 2 --infer-steps 1
                --infer-rounds 1 --infer-tokens 16)
    res_sizes="32 48 2 16"  # kernel_resources: hidden, intermediate, batch, sequence
else
    device=cuda; export TRITON_INTERPRET=0
    if [ -z "${SKIP_INSTALL:-}" ]; then
        if compgen -G ".whl/*.whl" >/dev/null; then
            $py -m pip install -q --no-deps --no-index --no-cache-dir .whl/*.whl || status=1
        fi
        $py -m pip install -q --no-deps --no-build-isolation --no-index --no-cache-dir -e . || exit 1
    fi
    sddmm_args=(--tokens 8192 --shapes 11008x4096 4096x11008 4096x4096 --steps 20 --repeats 3 --no-inductor)
    train_args=(--hidden 4096 --inter 11008 --layers 4 --vocab 32000 --batch 8 --seq 1024 --steps 10
                --infer-steps 5 --infer-rounds 5 --infer-tokens 1024)
    res_sizes="256 688 4 100"
fi

step versions $py -c "
import torch, triton, transformers, peft, shira_dist
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'shira_dist', shira_dist.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
print('peft has ShiraConfig:', hasattr(peft, 'ShiraConfig'))"
configs=(floor peft_lora full_ft shira_dist_default shira_dist_unfused shira_dist_struct)
if $py -c "import peft, sys; sys.exit(not hasattr(peft, 'ShiraConfig'))"; then
    configs=(floor peft_lora peft_shira full_ft shira_dist_default shira_dist_unfused shira_dist_struct)
fi
step triton_tests $py -m pytest -q -p no:cacheprovider tests/kernels/test_triton_kernels.py
# What the driver reports for the kernels a small bf16 and fp32 training run compiled on this GPU
# (registers, spills, shared memory), beside the static report CI checks
# (benchmarks/triton_compile_report.py: sm_80/sm_90 without a GPU).
step kernel_resources $py -c "
import os, torch
from transformers import LlamaConfig, LlamaForCausalLM
from shira_dist import ShiraConfig, get_peft_model
from shira_dist.kernels import triton_kernels as tk
from tools.cuda_compile import KERNELS, exercise
os.environ['SHIRA_DIST_KERNEL_BACKEND'] = 'triton'
dev = torch.device('$device')
hidden, inter, batch, seq = (int(v) for v in '$res_sizes'.split())
cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=seq)
for dtype in (torch.float32, torch.bfloat16):
    for mode, sddmm in (('fused', 'gather'), ('unfused', 'gather'), ('unfused', 'blocked')):
        os.environ['SHIRA_DIST_TRITON_SDDMM'] = sddmm
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM(cfg).to(dtype), ShiraConfig(r=4, target_modules='all-linear',
                               random_seed=0)).to(dev)
        model.set_fuse_mode(mode)
        exercise(model, torch.randint(0, 512, (batch, seq), device=dev))
for name in KERNELS:
    for cache in getattr(getattr(tk, name), 'device_caches', {}).values():
        for k in cache[0].values():
            sig = ','.join(v[1:] for v in getattr(getattr(k, 'src', None), 'signature', {}).values()
                           if str(v).startswith('*'))
            print(name, sig, 'warps', k.metadata.num_warps, 'regs', k.n_regs, 'spills', k.n_spills,
                  'shared', k.metadata.shared)
print('(interpreted: nothing compiled)' if os.environ.get('TRITON_INTERPRET') == '1' else 'done')
"
step bench_sddmm $py benchmarks/bench_sddmm.py --device "$device" --dtype bf16 "${sddmm_args[@]}"
step bench_sddmm_fp32 $py benchmarks/bench_sddmm.py --device "$device" --dtype fp32 "${sddmm_args[@]}"
step bench_train $py benchmarks/bench_train.py --device "$device" --dtype bf16 "${train_args[@]}" \
    --configs "${configs[@]}"
SHIRA_DIST_TRITON_SDDMM=blocked step bench_train_blocked $py benchmarks/bench_train.py --device "$device" \
    --dtype bf16 "${train_args[@]}" --configs floor peft_lora shira_dist_unfused
exit $status
