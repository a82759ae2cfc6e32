"""Sample packing (task.packing, shira_dist/training/packing.py) on a tiny random-init Llama.

A packed row must give every example exactly what it gets alone: the same logits at its
tokens (block-diagonal attention from the restarting position_ids, under sdpa and eager) and
the same summed loss and target count through the job's Objective (no example's first token
is predicted from the previous one's last). Tolerances: logits atol 1e-5, losses rtol 1e-5
(fp32; only the attention's summation order differs). A control shows the same row without
the restarts differs, so the comparison can fail. Then the packed job runs end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shira_dist.training.batches import IGNORE, Objective, collate
from shira_dist.training.config import ConfigError, load_run_config
from shira_dist.training.packing import pack_bins, pack_examples, packed_row
from shira_dist.train import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
LOGITS_ATOL, LOSS_RTOL = 1e-5, 1e-5
LENGTHS = [5, 9, 3, 7, 12, 4, 6, 2]
MAX_LENGTH = 16


def _model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, max_position_embeddings=64)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def _examples() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        prompt = n // 2 if i % 2 else 0  # every other example takes loss on its second half only
        out.append({"input_ids": ids, "targets": [IGNORE] * prompt + ids[prompt:]})
    return out


def test_best_fit_decreasing_bins_by_hand():
    # longest first: 5 -> new bin (room 3); 4 -> new bin (room 4); 3 -> the bin with room 3; 2 -> room 4
    assert pack_bins([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert pack_bins([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="example 1 has 9 tokens; packing needs 1..max_length=8"):
        pack_bins([3, 9], 8)


def test_packed_row_restarts_positions_and_cuts_labels_at_boundaries():
    row = packed_row([{"input_ids": [7, 8, 9], "targets": [7, 8, 9]},
                      {"input_ids": [4, 5], "targets": [IGNORE, 5]}])
    assert row == {"input_ids": [7, 8, 9, 4, 5], "targets": [IGNORE, 8, 9, IGNORE, 5],
                   "position_ids": [0, 1, 2, 0, 1]}
    batch = collate([row, packed_row([{"input_ids": [3], "targets": [3]}])], pad_id=0, left_pad=False)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]  # padding: a segment of its own
    assert batch["targets"][1].tolist() == [IGNORE] * 5
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_each_example_its_own_logits_and_loss(attn):
    model, examples = _model(attn), _examples()
    rows = pack_examples(examples, MAX_LENGTH)
    assert len(rows) < len(examples) and all(len(r["input_ids"]) <= MAX_LENGTH for r in rows)
    assert sorted(n for r in rows for n in _segments(r["position_ids"])) == sorted(LENGTHS)
    packed = collate(rows, pad_id=0, left_pad=False)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        alone = {}
        for e in examples:
            alone[tuple(e["input_ids"])] = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
        # the control: the same rows with one running position (plain causal attention across examples)
        flat = model(input_ids=packed["input_ids"], use_cache=False).logits
    worst, control = 0.0, 0.0
    for r, row in enumerate(rows):
        start = 0
        for n in _segments(row["position_ids"]):
            ids = tuple(row["input_ids"][start:start + n])
            worst = max(worst, float((logits[r, start:start + n] - alone[ids]).abs().max()))
            control = max(control, float((flat[r, start:start + n] - alone[ids]).abs().max()))
            start += n
    assert worst <= LOGITS_ATOL, worst
    assert control > 1e-2, control

    objective = Objective.for_model("causal_lm", model, None)
    unpacked = collate(examples, pad_id=0, left_pad=False)
    with torch.no_grad():
        loss_packed, _ = objective(model, packed)
        loss_unpacked, _ = objective(model, unpacked)
    assert objective.num_targets(packed) == objective.num_targets(unpacked)
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=LOSS_RTOL, atol=0)
    # per example: each packed row's loss is the sum of its examples' losses alone
    for row in rows:
        members, start = [], 0
        for n in _segments(row["position_ids"]):
            members.append(next(e for e in examples if e["input_ids"] == row["input_ids"][start:start + n]))
            start += n
        with torch.no_grad():
            one, _ = objective(model, collate([row], pad_id=0, left_pad=False))
            separate = sum(float(objective(model, collate([e], 0, False))[0]) for e in members)
        assert abs(float(one) - separate) <= LOSS_RTOL * abs(separate), (float(one), separate)


def _segments(positions: list[int]) -> list[int]:
    """Segment lengths of a row's position ids (a restart at 0 starts a new one)."""
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [b - a for a, b in zip(starts, starts[1:])]


def test_packing_is_for_causal_lm_only():
    with pytest.raises(ConfigError, match=r"task.packing=true is for task.type='causal_lm'.*'lm_classification'"):
        load_run_config(TINY, ["task.packing=true"])


def test_a_packed_tiny_job_trains(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = main(["--config", TINY, f"output_dir={tmp_path}", "task.type=causal_lm", "task.labels=null",
                   "task.label_words=null", 'task.prompt_template="review: {text}\\nsentiment:"',
                   'task.response_template=" {label}"', "task.packing=true", "task.max_length=256",
                   "training.micro_batch_size=4", "training.max_steps=12", "training.save_every=0",
                   "training.progress_bar=false"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    assert "task.packing packed 1000 examples into 250 rows" in out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "completed"
    assert m["eval_after"]["loss"] < 0.5 * m["eval_before"]["loss"], (m["eval_before"], m["eval_after"])
    assert m["eval_after"]["examples"] == 200  # held out: unpacked, one example per row
