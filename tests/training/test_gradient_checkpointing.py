"""Activation checkpointing (training.gradient_checkpointing) changes memory, never the numbers.

    layer level   a tiny Llama with a SHiRA adapter, set up by the single strategy: every decoder
                  layer's attention runs twice per micro-batch (once more in backward), and the adapter's
                  gradients equal those without checkpointing, in the fused ("auto") and unfused
                  modes (atol 1e-6; observed identical)
    job level     configs/tiny.yaml (2 micro-batches per step, modules_to_save head) trained with
                  and without checkpointing under single (in this process) and ddp, fsdp (FSDP2),
                  deepspeed ZeRO-2 and ZeRO-3 (one `torchrun --nproc_per_node 2` job, gloo: this
                  file run as a worker, running each cell's two jobs one after the other):
                  per-step losses rtol 1e-5, final adapters atol 1e-6, and a spy on
                  torch.utils.checkpoint shows it ran only where switched on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
COMMON = ["training.progress_bar=false", "training.max_steps=4", "training.eval_before_training=false",
          "training.save_every=0", "training.log_every=2",
          "training.gradient_accumulation_steps=2"]
CELLS = {
    "ddp": ["distributed.strategy=ddp"],
    "fsdp": ["distributed.strategy=fsdp"],
    "zero2": ["distributed.strategy=deepspeed", "distributed.zero_stage=2"],
    "zero3": ["distributed.strategy=deepspeed",
              f"distributed.deepspeed_config={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}"],
}
LOSS_RTOL, VALUE_ATOL, GRAD_ATOL = 1e-5, 1e-6, 1e-6
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


# ---- the layer level ----------------------------------------------------------------------------------
def _shira_model(mode: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from shira_dist import ShiraConfig, get_peft_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
    model = get_peft_model(base, ShiraConfig(r=2, target_modules="all-linear", random_seed=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # non-zero values, so the fused write matters
    model.set_fuse_mode(mode)
    return model


def _grads_and_layer_calls(mode: str, checkpointing: bool) -> tuple[dict, int]:
    from shira_dist.training.config import load_run_config
    from shira_dist.training.dist_env import DistEnv
    from shira_dist.training.strategies import SingleStrategy

    cfg = load_run_config(TINY, [f"training.gradient_checkpointing={str(checkpointing).lower()}"])
    model = _shira_model(mode)
    strategy = SingleStrategy(DistEnv(), torch.device("cpu"), cfg)
    strategy.setup(model, lambda params: torch.optim.SGD(params, lr=0.0))
    # a module inside each decoder layer (the layer's own hooks stay outside its checkpoint)
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
    assert len(layers) == 2
    calls = []
    for layer in layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    ids = torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # two micro-batches accumulate, as the loop's accumulation does
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, len(calls) // len(layers)


@pytest.mark.parametrize("mode", ["auto", "unfused"])
def test_checkpointed_layers_recompute_and_give_the_same_gradients(mode):
    plain, plain_calls = _grads_and_layer_calls(mode, False)
    ckpt, ckpt_calls = _grads_and_layer_calls(mode, True)
    assert (plain_calls, ckpt_calls) == (2, 4)  # per layer: 2 forwards, plus 2 recomputations in backward
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], atol=GRAD_ATOL, rtol=0, msg=name)


def test_a_model_without_checkpointing_support_is_a_clear_error():
    from shira_dist.training.strategies.common import enable_gradient_checkpointing

    with pytest.raises(ValueError, match="training.gradient_checkpointing=true: Sequential does not support"):
        enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---- the job level ---------------------------------------------------------------------------------------
def _spy_on_checkpoint(counter: list) -> None:
    """Count torch.utils.checkpoint calls made through transformers' layers (the real function runs)."""
    import transformers.modeling_utils as mu

    real = mu.checkpoint

    def counted(*args, **kwargs):
        counter.append(1)
        return real(*args, **kwargs)

    mu.checkpoint = counted


def _run_job(out: Path, overrides: list[str], checkpointing: bool) -> int:
    from shira_dist.train import main

    counter: list = []
    _spy_on_checkpoint(counter)
    threads = torch.get_num_threads()
    try:
        rc = main(["--config", TINY, f"output_dir={out}", *COMMON, *overrides,
                   f"training.gradient_checkpointing={str(checkpointing).lower()}"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    (out / "checkpoint_calls.json").write_text(json.dumps(len(counter)))
    return len(counter)


def _worker(base: Path, ports: list[str]) -> None:
    """Under torchrun: every distributed cell's two jobs, one after the other, in these 2 processes.

    Each job starts its process group on a fresh store (rank 0 serves it on its own port): a
    group started again on torchrun's store finds the previous group's keys there."""
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    jobs = [(name, overrides, checkpointing) for name, overrides in CELLS.items() for checkpointing in (False, True)]
    for (name, overrides, checkpointing), port in zip(jobs, ports, strict=True):
        os.environ["MASTER_PORT"] = port
        _run_job(base / f"{name}-{'ckpt' if checkpointing else 'plain'}", overrides, checkpointing)


def _free_ports(n: int) -> list[str]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _assert_same_training(plain: Path, ckpt: Path) -> None:
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (plain, ckpt))
    assert a["status"] == b["status"] == "completed"
    assert len(a["train"]["losses"]) == 4
    torch.testing.assert_close(torch.tensor(b["train"]["losses"]), torch.tensor(a["train"]["losses"]),
                               rtol=LOSS_RTOL, atol=0)
    va, vb = (load_file(d / "final" / "adapter_model.safetensors") for d in (plain, ckpt))
    assert va.keys() == vb.keys()
    assert max(float(v.abs().max()) for k, v in va.items() if "shira_weight" in k) > 1e-4  # it trained
    for key in va:
        torch.testing.assert_close(vb[key], va[key], atol=VALUE_ATOL, rtol=0, msg=key)
    assert json.loads((plain / "checkpoint_calls.json").read_text()) == 0
    assert json.loads((ckpt / "checkpoint_calls.json").read_text()) > 0


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("gc")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(base),
           *_free_ports(2 * len(CELLS))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return base


def test_single_process_losses_and_adapter_equal_with_and_without_checkpointing(tmp_path):
    _run_job(tmp_path / "plain", [], False)
    _run_job(tmp_path / "ckpt", [], True)
    _assert_same_training(tmp_path / "plain", tmp_path / "ckpt")


@pytest.mark.parametrize("cell", list(CELLS))
def test_two_ranks_losses_and_adapter_equal_with_and_without_checkpointing(distributed_runs, cell):
    _assert_same_training(distributed_runs / f"{cell}-plain", distributed_runs / f"{cell}-ckpt")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2:])
