"""The default execution mode is correct under real engines applied directly (2 ranks, CPU, gloo).

A user takes ``get_peft_model(...)`` as returned (default mode: set_fuse_mode is never
called) and hands it to an engine themselves -- no shira_dist.distributed helper wraps it.
Each cell (engine x update path, see tests/distributed/dist/matrix_cells.py) trains a fresh model for
harness.STEPS steps, each rank on its half of the same global batch, and must train exactly
like one process running the pure reference ("unfused" mode) on the whole batch with the
same optimizer:

    engines        DDP(model); FSDP2 fully_shard per decoder layer + root; FSDP1
                   (use_orig_params, LlamaDecoderLayer auto-wrap); Accelerate
                   (Accelerator(cpu=True).prepare); DeepSpeed ZeRO-1/2/3 via
                   deepspeed.initialize(model=..., optimizer=<client torch optimizer>)
    update paths   AdamW foreach and AdamW fused=True on every engine (ZeRO: as the client
                   optimizer); on DDP also SGD(fused=True, momentum=0.9) and a hand-written
                   ``p.add_(p.grad, alpha=-lr)`` loop

Two launched jobs run all cells, each process running its cells one after the other:

    torchrun            DDP, FSDP2, FSDP1, Accelerate cells
    deepspeed launcher  ZeRO-1, ZeRO-2, ZeRO-3 cells

Checks per cell (tolerances):
    ran            no rank raised (else the test shows the cell's traceback)
    losses         global-mean loss of every step vs one process        rtol 1e-5, atol 0
    values         final full values (gathered by the test itself)      atol 1e-5, rtol 0
                   and they trained: max |value| > 1e-4 (values start at zero)
    ranks          the two ranks hold bit-identical values
    next forward   one more forward under torch.no_grad() after training, global-mean loss
                   vs one process                                        rtol 1e-5, atol 0
    engine         the engine holds the weights as claimed (e.g. FSDP2: DTensor, half the rows
                   per rank; ZeRO-3: weights partitioned), so no cell passes by not sharding

Each job's wall time is printed (pytest -s) and written to <job dir>/wall.json (no timing
assertion). The DeepSpeed shared-memory op compiles once into <repo>/.cache/torch_extensions.

Run: .venv/bin/pytest tests/distributed/test_engine_matrix.py -s   (both jobs; a job is launched only
when one of its cells is selected, e.g. -k zero runs the DeepSpeed job alone)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.distributed.dist import harness, matrix_cells
from tests.distributed.dist.launch import REPO, run_job

WORKER = REPO / "tests" / "distributed" / "dist" / "matrix_worker.py"
JOB_TIMEOUT_S = 300
LOSS_RTOL = 1e-5
VALUE_ATOL = 1e-5
TRAINED = 1e-4

JOBS = {"torchrun": matrix_cells.TORCH_CELLS, "deepspeed": matrix_cells.DEEPSPEED_CELLS}
CELLS = [(kind, engine, path) for kind, cells in JOBS.items() for engine, path in cells]
CELL_IDS = [matrix_cells.cell_id(engine, path) for _, engine, path in CELLS]


@dataclass
class Job:
    kind: str
    out: Path
    returncode: int | None
    timed_out: bool
    wall_s: float
    output: str


def _launch(kind: str, out: Path) -> Job:
    """Run one job to its end (or JOB_TIMEOUT_S); never fails here, each cell's test reports."""
    out.mkdir(parents=True, exist_ok=True)
    cells = ",".join(matrix_cells.cell_id(e, p) for e, p in JOBS[kind])
    began = time.perf_counter()
    returncode, timed_out, output = run_job(kind, WORKER, ["--out", str(out), "--cells", cells], JOB_TIMEOUT_S)
    wall = time.perf_counter() - began
    (out / "wall.json").write_text(json.dumps({"kind": kind, "wall_s": round(wall, 1), "cells": len(JOBS[kind])}))
    print(f"\n[engine matrix] {kind} job: {len(JOBS[kind])} cells, {wall:.1f} s wall, exit {returncode}")
    return Job(kind, out, returncode, timed_out, wall, output)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """kind -> Job, each launched once (on first use) for all of its cells."""
    cache: dict[str, Job] = {}

    def get(kind: str) -> Job:
        if kind not in cache:
            cache[kind] = _launch(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def references():
    """update path -> the single-process "unfused" run (matrix_cells.reference), computed once."""
    cache: dict[str, dict] = {}

    def get(path: str) -> dict:
        if path not in cache:
            cache[path] = matrix_cells.reference(path)
        return cache[path]

    return get


def _cell(job: Job, engine: str, path: str) -> tuple[list[dict], list[dict]]:
    """Both ranks' (records, values) of a cell; fails naming the cell if it has no result or raised."""
    name = matrix_cells.cell_id(engine, path)
    records, values = [], []
    for rank in (0, 1):
        record_file = job.out / f"{name}.rank{rank}.json"
        if not record_file.exists():
            why = f"timed out after {JOB_TIMEOUT_S} s" if job.timed_out else f"exit code {job.returncode}"
            pytest.fail(f"cell {name}: rank {rank} wrote no result ({job.kind} job {why}); "
                        f"job output tail:\n{job.output[-6000:]}")
        records.append(json.loads(record_file.read_text()))
        values.append(torch.load(job.out / f"{name}.rank{rank}.pt"))
    errors = [f"--- rank {r['rank']} ---\n{r['error']}" for r in records if "error" in r]
    if errors:
        pytest.fail(f"cell {name} did not complete:\n" + "\n".join(errors), pytrace=False)
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records), records
    return records, values


@pytest.mark.parametrize("kind", list(JOBS))
def test_job_ran_to_the_end(jobs, kind):
    """The launched job exited cleanly (cell errors are caught per cell and reported below)."""
    job = jobs(kind)
    assert not job.timed_out and job.returncode == 0, \
        f"{kind} job: exit {job.returncode}, timed out {job.timed_out}, {job.wall_s:.1f} s:\n{job.output[-6000:]}"
    for rank in (0, 1):
        assert (job.out / f"done.rank{rank}.json").exists(), f"{kind} rank {rank} did not finish"


@pytest.mark.parametrize("kind,engine,path", CELLS, ids=CELL_IDS)
def test_cell_ran(jobs, kind, engine, path):
    _cell(jobs(kind), engine, path)


@pytest.mark.parametrize("kind,engine,path", CELLS, ids=CELL_IDS)
def test_losses_match_single_process(jobs, references, kind, engine, path):
    """Global-mean loss of every step; a stale fused weight shows from the second step on."""
    (rank0, _), _ = _cell(jobs(kind), engine, path)
    expected = references(path)["losses"]
    name = matrix_cells.cell_id(engine, path)
    assert len(rank0["losses"]) == harness.STEPS
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(expected), rtol=LOSS_RTOL, atol=0,
                               msg=lambda m: f"cell {name}: losses {rank0['losses']} vs single process "
                                             f"{expected}: {m}")


@pytest.mark.parametrize("kind,engine,path", CELLS, ids=CELL_IDS)
def test_values_match_single_process(jobs, references, kind, engine, path):
    """Final full values of every adapter tensor (rank 0's copy) against one process."""
    _, (values, _) = _cell(jobs(kind), engine, path)
    expected = references(path)["values"]
    name = matrix_cells.cell_id(engine, path)
    assert values.keys() == expected.keys(), f"cell {name}: {sorted(values)} vs {sorted(expected)}"
    biggest = max(v.abs().max().item() for v in values.values())
    assert biggest > TRAINED, f"cell {name} did not train: max |value| = {biggest}"
    for key, value in expected.items():
        torch.testing.assert_close(values[key], value, atol=VALUE_ATOL, rtol=0,
                                   msg=lambda m: f"cell {name}, {key}: {m}")


@pytest.mark.parametrize("kind,engine,path", CELLS, ids=CELL_IDS)
def test_ranks_hold_bit_identical_values(jobs, kind, engine, path):
    _, (values0, values1) = _cell(jobs(kind), engine, path)
    name = matrix_cells.cell_id(engine, path)
    assert values0.keys() == values1.keys() and len(values0) == 14, f"cell {name}"
    differing = [k for k in values0 if not torch.equal(values0[k], values1[k])]
    assert not differing, f"cell {name}: ranks differ in {differing}"


@pytest.mark.parametrize("kind,engine,path", CELLS, ids=CELL_IDS)
def test_forward_after_training_matches_single_process(jobs, references, kind, engine, path):
    """One more forward (torch.no_grad()) of the trained engine on a new batch: the model
    computes with the values it holds now."""
    (rank0, _), _ = _cell(jobs(kind), engine, path)
    expected = references(path)["probe_loss"]
    name = matrix_cells.cell_id(engine, path)
    torch.testing.assert_close(torch.tensor(rank0["probe_loss"]), torch.tensor(expected), rtol=LOSS_RTOL, atol=0,
                               msg=lambda m: f"cell {name}: loss after training {rank0['probe_loss']} vs single "
                                             f"process {expected}: {m}")


@pytest.mark.parametrize("kind,engine,path", CELLS, ids=CELL_IDS)
def test_engine_applied_as_claimed(jobs, kind, engine, path):
    """How the engine held the weights right after it was applied (recorded by every rank)."""
    records, _ = _cell(jobs(kind), engine, path)
    name = matrix_cells.cell_id(engine, path)
    for rec in records:
        facts = rec["facts"]
        if engine == "ddp":
            assert facts == {"wrapper": "DistributedDataParallel"}, (name, facts)
        elif engine == "accelerate":  # Accelerate's multi-CPU data parallel: DDP around the model
            assert facts == {"distributed_type": "DistributedType.MULTI_CPU", "wrapper": "DistributedDataParallel",
                             "optimizer": "AcceleratedOptimizer"}, (name, facts)
        elif engine == "fsdp2":  # base weights and values are DTensors, each rank holding half
            assert facts["base_weight_type"] == "DTensor" and facts["value_type"] == "DTensor", (name, facts)
            assert facts["base_weight_rows"] == [32, 64], (name, facts)
            local, whole = facts["value_numel"]
            assert local * 2 == whole, (name, facts)
        elif engine == "fsdp1":  # root + one unit per decoder layer; each rank holds about half the values
            assert facts["fsdp_units"] == 3 and facts["value_tensors"] == 14, (name, facts)
            assert 0 < facts["value_numel_held"] < 4096, (name, facts)  # 4096 values in all
        else:
            stage = int(engine[-1])
            assert facts["zero_stage"] == stage and facts["client_optimizer"] == "AdamW", (name, facts)
            assert facts["client_optimizer_fused"] == (path == "adamw_fused"), (name, facts)
            if stage == 3:  # every weight partitioned: empty outside forward, half of it in ds_tensor
                assert facts["base_weight_numel"] == 0 and facts["value_numel"] == 0, (name, facts)
                assert facts["base_weight_partition"] == 64 * 64 // 2, (name, facts)
                assert facts["value_partition"] == 2 * (64 + 64) // 2, (name, facts)
            else:  # ZeRO-1/2 partition optimizer state (and gradients), not the weights
                assert facts["base_weight_numel"] == 64 * 64 and facts["value_numel"] == 256, (name, facts)
