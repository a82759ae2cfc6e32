"""SHiRA under real engines (CPU, gloo, 2 processes) against the single-process run.

Two launched jobs, each checked by many tests (tests/distributed/dist/worker.py does the training):

    torchrun            ddp, fsdp2, fsdp2 + CPU offload, fsdp1 (use_orig_params) + mask-mismatch checks
    deepspeed launcher  ZeRO-2, ZeRO-2 + optimizer offload, ZeRO-3, ZeRO-3 + optimizer offload

Each run trains the tiny Llama (hidden 64, 2 layers, vocab 128; SHiRA r=2 on all 7
projections) for harness.STEPS AdamW steps (lr 5e-3) on the same global batch of 4 rows
(2 per rank), from scratch or resuming a single-process adapter. Tolerances:
  losses (global mean per step)     rtol 1e-5 against one process
  final adapter values              atol 1e-5 (one AdamW step moves a value by up to 5e-3)
  indices, base outside the mask    bit-identical (on every rank, its own shards)
  ranks                             bit-identical adapter values after every step
  logits of the saved adapter       atol 1e-5 (shira_dist vs PEFT vs the single-process model)
The DeepSpeed shared-memory op compiles once into <repo>/.cache/torch_extensions.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

from shira_dist import PeftModel
from tests.distributed.dist import harness
from tests.distributed.dist.launch import REPO, run_job

WORKER = REPO / "tests" / "distributed" / "dist" / "worker.py"
JOB_TIMEOUT_S = 420

TORCHRUN_RUNS = ["ddp:scratch", "ddp:resume", "fsdp2:scratch", "fsdp2:resume", "fsdp2_offload:scratch",
                 "fsdp1:scratch"]
DEEPSPEED_RUNS = ["zero2:scratch", "zero2:resume", "zero2_offload:scratch", "zero3:scratch", "zero3:resume",
                  "zero3_offload:scratch", "zero3_offload:resume"]
RUNS = [("torchrun", r) for r in TORCHRUN_RUNS] + [("deepspeed", r) for r in DEEPSPEED_RUNS]
RUN_IDS = [r.replace(":", "-") for _, r in RUNS]


def _probe_ids() -> torch.Tensor:
    return torch.randint(0, harness.HF_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(99))


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_probe_ids()).logits


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process runs: the start adapter, then per start its losses, adapter, logits."""
    root = tmp_path_factory.mktemp("reference")
    warm = harness.shira_model("scratch")
    harness.train_single(warm, harness.WARMUP_STEPS, seed=7)
    warm.save_pretrained(str(root / "start"))
    out = {"start_dir": str(root / "start")}
    for start in ("scratch", "resume"):
        model = harness.shira_model(start, out["start_dir"])
        losses = harness.train_single(model)
        out[start] = {"losses": losses, "adapter": {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()},
                      "logits": _logits(model)}
    return out


def _launch(kind: str, runs: list[str], out: Path, start_dir: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    args = ["--out", str(out), "--start-dir", start_dir, "--runs", ",".join(runs)]
    returncode, timed_out, output = run_job(kind, WORKER, args, JOB_TIMEOUT_S)
    if timed_out:
        pytest.fail(f"{kind} job did not finish in {JOB_TIMEOUT_S} s:\n{output[-6000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1) if (out / f"rank{r}.json").exists()]
    if returncode != 0 or len(ranks) != 2 or any("error" in r for r in ranks):
        errors = "\n".join(r.get("error", "") for r in ranks)
        pytest.fail(f"{kind} job failed (exit {returncode}):\n{errors}\n--- output tail ---\n{output[-6000:]}")
    return {"out": out, "ranks": ranks}


@pytest.fixture(scope="module")
def jobs(reference, tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            runs = TORCHRUN_RUNS + ["mismatch"] if kind == "torchrun" else DEEPSPEED_RUNS
            cache[kind] = _launch(kind, runs, tmp_path_factory.mktemp(kind), reference["start_dir"])
        return cache[kind]

    return get


def _run_records(job: dict, run: str) -> list[dict]:
    strategy, start = run.split(":")
    found = [next(x for x in rank["runs"] if x["strategy"] == strategy and x["start"] == start) for rank in job["ranks"]]
    assert [r["rank"] for r in job["ranks"]] == [0, 1] and all(r["world_size"] == 2 for r in job["ranks"])
    return found


@pytest.mark.parametrize("kind,run", RUNS, ids=RUN_IDS)
def test_losses_match_single_process(jobs, reference, kind, run):
    records = _run_records(jobs(kind), run)
    expected = reference[run.split(":")[1]]["losses"]
    for rec in records:
        assert len(rec["losses"]) == harness.STEPS
        torch.testing.assert_close(torch.tensor(rec["losses"]), torch.tensor(expected), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind,run", RUNS, ids=RUN_IDS)
def test_final_adapter_matches_single_process(jobs, reference, kind, run):
    job = jobs(kind)
    saved = load_file(job["out"] / run.replace(":", "-") / "adapter_model.safetensors")
    expected = reference[run.split(":")[1]]["adapter"]
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith(".shira_indices"):
            assert torch.equal(saved[key], value), key
        else:
            torch.testing.assert_close(saved[key], value, atol=1e-5, rtol=0, msg=lambda m: f"{key}: {m}")
    assert any(v.abs().max() > 1e-3 for k, v in saved.items() if k.endswith(".shira_weight"))  # it trained


@pytest.mark.parametrize("kind,run", RUNS, ids=RUN_IDS)
def test_ranks_never_diverge(jobs, kind, run):
    rank0, rank1 = _run_records(jobs(kind), run)
    assert len(rank0["value_digests"]) == harness.STEPS
    assert rank0["value_digests"] == rank1["value_digests"]
    assert len(set(rank0["value_digests"])) == harness.STEPS  # the values changed every step


@pytest.mark.parametrize("kind,run", RUNS, ids=RUN_IDS)
def test_base_weights_outside_mask_bit_identical_on_every_rank(jobs, kind, run):
    records = _run_records(jobs(kind), run)
    strategy = run.split(":")[0]
    for rec in records:
        assert rec["outside_mask_compared"] > 0 and rec["outside_mask_differing"] == 0, rec
        if strategy.startswith("fsdp2"):  # the frozen base is a sharded DTensor: half the rows per rank
            assert rec["weight_type"] == "DTensor"
            assert all(rows * 2 == total for _, rows, total in rec["local_rows"])
        if strategy.startswith("zero3"):  # frozen weights are partitioned too
            assert set(rec["numel_outside_forward"]) == {0}
    if strategy.startswith(("fsdp2", "zero3")):  # each rank checked its own half
        assert sum(r["outside_mask_compared"] for r in records) > records[0]["outside_mask_compared"]


@pytest.mark.parametrize("kind,run", RUNS, ids=RUN_IDS)
def test_saved_adapter_loads_in_shira_dist_and_peft(jobs, reference, kind, run):
    directory = str(jobs(kind)["out"] / run.replace(":", "-"))
    ours = _logits(PeftModel.from_pretrained(harness.base_model(), directory))
    theirs = _logits(peft.PeftModel.from_pretrained(harness.base_model(), directory))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, reference[run.split(":")[1]]["logits"], atol=1e-5, rtol=0)


def test_zero3_run_resumes_as_single_process(jobs, reference, tmp_path):
    """A ZeRO-3 run's adapter continues training in one process exactly like the reference's."""
    zero3_dir = str(jobs("deepspeed")["out"] / "zero3-resume")
    PeftModel.from_pretrained(harness.base_model(), zero3_dir)  # loads
    ref_dir = tmp_path / "ref"
    ref_model = harness.shira_model("resume", reference["start_dir"])
    harness.train_single(ref_model)
    ref_model.save_pretrained(str(ref_dir))
    continued = [harness.train_single(harness.shira_model("resume", d), steps=2, seed=5) for d in (zero3_dir, str(ref_dir))]
    torch.testing.assert_close(torch.tensor(continued[0]), torch.tensor(continued[1]), rtol=1e-5, atol=0)


def test_mask_mismatch_across_ranks_is_a_clear_error(jobs):
    rank0, rank1 = (r["mismatch"] for r in jobs("torchrun")["ranks"])
    for m in (rank0, rank1):  # raised on every rank (no rank left hanging in a collective)
        err = m["unseeded_error"]
        assert err is not None and err.startswith("model.layers.0.self_attn.q_proj.shira_indices['default'] differs")
        assert "random_seed" in err and "broadcast_adapters" in err
        err = m["diverged_values_error"]
        assert err is not None and "layers.0.self_attn.q_proj.shira_weight" in err and "diverged" in err
    assert rank0["after_sync_indices"] == rank1["after_sync_indices"]

