"""Pieces of the training job with hand-checked values: batch plan, LR schedule, padding,
prompt encoding and truncation, launcher environments, data formats, packaged data splits."""

from __future__ import annotations

import dataclasses
import json

import pytest

from shira_dist.training.batches import IGNORE, BatchPlan, ExampleEncoder, collate, label_token_ids
from shira_dist.training.data import check_data_files, infer_format, load_examples, tokenize
from shira_dist.training.dist_env import read_dist_env
from shira_dist.training.loop import LrFactor
from shira_dist.training.models import ByteTokenizer
from shira_dist.training.prepare import prepare_data
from shira_dist.training.schema import DataConfig, TaskConfig

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID")


def test_batch_plan_splits_each_global_batch_over_ranks_and_micro_batches():
    single = BatchPlan(num_examples=20, micro_batch_size=2, accumulation=2, world_size=1, seed=3)
    double = BatchPlan(num_examples=20, micro_batch_size=2, accumulation=1, world_size=2, seed=3)
    assert single.global_batch == double.global_batch == 4 and single.steps_per_epoch == 5
    for step in range(12):  # past an epoch boundary
        one = single.micro_batches(step, rank=0)
        two = double.micro_batches(step, rank=0) + double.micro_batches(step, rank=1)
        assert one == two and len(one) == 2 and all(len(m) == 2 for m in one)
    epoch0 = sorted(i for s in range(5) for m in single.micro_batches(s, 0) for i in m)
    assert epoch0 == list(range(20))  # each epoch visits every example once
    assert single.micro_batches(5, 0) != single.micro_batches(0, 0)  # new order per epoch
    assert single.micro_batches(7, 0) == BatchPlan(20, 2, 2, 1, 3).micro_batches(7, 0)  # a pure function of step
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        BatchPlan(5, 2, 2, 2, 0).check()


def test_lr_factor_warmup_cosine_linear_constant():
    cos = LrFactor("cosine", warmup_steps=2, total_steps=10, min_ratio=0.1)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0) and cos(6) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos(10) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)
    lin = LrFactor("linear", warmup_steps=0, total_steps=4, min_ratio=0.0)
    assert [lin(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert LrFactor("constant", 1, 10, 0.0)(7) == 1.0


def test_collate_pads_left_for_label_words_and_right_for_causal_lm():
    left = collate([{"input_ids": [5, 6, 7], "class_index": 1}, {"input_ids": [8], "class_index": 0}], pad_id=0, left_pad=True)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]] and left["label"].tolist() == [1, 0]
    right = collate([{"input_ids": [5, 6], "targets": [5, 6]}, {"input_ids": [8], "targets": [IGNORE]}],
                    pad_id=9, left_pad=False)
    assert right["input_ids"].tolist() == [[5, 6], [8, 9]]
    assert right["targets"].tolist() == [[5, 6], [IGNORE, IGNORE]]


def test_lm_classification_encoding_keeps_the_template_end_when_truncating():
    task = TaskConfig(type="lm_classification", prompt_template="r: {text}\ns:", labels=["neg", "pos"],
                      label_words=["n", "p"], max_length=20)
    enc = ExampleEncoder(task, ByteTokenizer())
    out = enc({"text": ["ok", "x" * 100], "label": ["pos", "neg"]})
    assert out["input_ids"][0] == list(b"r: ok\ns:") and out["class_index"] == [1, 0]
    long = bytes(out["input_ids"][1])
    assert len(long) <= 20 and long.startswith(b"r: xxx") and long.endswith(b"\ns:")
    assert label_token_ids(task, ByteTokenizer()) == [ord("n"), ord("p")]
    with pytest.raises(ValueError, match=r"row 8: label=.maybe. is not one of task.labels=\['neg', 'pos'\]"):
        enc({"text": ["a"], "label": ["maybe"]}, [7])
    with pytest.raises(ValueError, match=r"row 1: field 'text' \(read by task.prompt_template\) is empty \(null\)"):
        enc({"text": [None], "label": ["neg"]})
    with pytest.raises(ValueError, match=r"is 6 tokens before any example text, but task.max_length=6"):
        ExampleEncoder(dataclasses.replace(task, max_length=6), ByteTokenizer())
    multi = TaskConfig(type="lm_classification", labels=["a", "b"], label_words=["no", "yes"])
    with pytest.raises(ValueError, match=r"label_words\[0\]='no' is 2 tokens"):
        label_token_ids(multi, ByteTokenizer())


def test_causal_lm_encoding_takes_loss_on_the_response_only():
    task = TaskConfig(type="causal_lm", prompt_template="Q:{q}\nA:", response_template="{a}", max_length=64)
    out = ExampleEncoder(task, ByteTokenizer())({"q": ["hi"], "a": ["yo"]})
    ids, targets = out["input_ids"][0], out["targets"][0]
    assert ids == list(b"Q:hi\nA:yo") + [ByteTokenizer.eos_id]
    assert targets == [IGNORE] * len(b"Q:hi\nA:") + list(b"yo") + [ByteTokenizer.eos_id]


def test_launcher_environments(monkeypatch):
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    env = read_dist_env()
    assert (env.rank, env.world_size, env.distributed) == (0, 1, False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        read_dist_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    env = read_dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.source) == (3, 4, 1, "SLURM_PROCID/SLURM_NTASKS")
    monkeypatch.setenv("RANK", "1")  # torchrun's variables win over SLURM's (srun torchrun ...)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert (read_dist_env().rank, read_dist_env().world_size, read_dist_env().local_rank) == (1, 2, 0)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        read_dist_env()


def test_data_formats_and_missing_files(tmp_path):
    assert infer_format(["a.jsonl", "b.json.gz"], None) == "json"
    assert infer_format(["a.txt"], None) == "text" and infer_format(["a.dat"], "csv") == "csv"
    with pytest.raises(ValueError, match="cannot tell its format"):
        infer_format(["a.dat"], None)
    with pytest.raises(ValueError, match="mix formats"):
        infer_format(["a.csv", "b.jsonl"], None)
    with pytest.raises(FileNotFoundError, match="data.train_files: '/nope/train.csv' does not exist"):
        check_data_files(DataConfig(train_files=["/nope/train.csv"]))


def test_csv_and_text_files_load_tokenize_and_cache(tmp_path):
    (tmp_path / "d.csv").write_text("review,label\ngreat fun,pos\nawful,neg\n")
    (tmp_path / "t.txt").write_text("line one\nline two\n")
    cache = str(tmp_path / "cache")
    task = TaskConfig(type="lm_classification", prompt_template="{review} =", labels=["neg", "pos"],
                      label_words=["-", "+"])
    ds = tokenize(load_examples([str(tmp_path / "d.csv")], None, cache, None), ExampleEncoder(task, ByteTokenizer()),
                  ["d.csv"], "train")
    assert ds[0]["input_ids"] == list(b"great fun =") and list(ds["class_index"]) == [1, 0]
    again = tokenize(load_examples([str(tmp_path / "d.csv")], None, cache, None),
                     ExampleEncoder(task, ByteTokenizer()), ["d.csv"], "train")
    assert again.cache_files and again.cache_files[0]["filename"] == ds.cache_files[0]["filename"]  # reused
    text_task = TaskConfig(type="causal_lm", prompt_template="{text}")
    lines = tokenize(load_examples([str(tmp_path / "t.txt")], None, cache, 1), ExampleEncoder(text_task, ByteTokenizer()),
                     ["t.txt"], "train")
    assert len(lines) == 1 and lines[0]["input_ids"] == list(b"line one") + [ByteTokenizer.eos_id]
    wrong = TaskConfig(type="causal_lm", prompt_template="{body}")
    with pytest.raises(ValueError, match=r"no column\(s\) \['body'\].*its columns: \['review', 'label'\]"):
        tokenize(load_examples([str(tmp_path / "d.csv")], None, cache, None), ExampleEncoder(wrong, ByteTokenizer()),
                 ["d.csv"], "train")


def test_packaged_rotten_tomatoes_split_is_deterministic_and_disjoint(tmp_path):
    train, held_out = prepare_data("rotten_tomatoes", str(tmp_path / "a"))
    rows = [json.loads(line) for line in open(train)]
    evals = [json.loads(line) for line in open(held_out)]
    assert len(evals) == 500 and len(rows) > 4000
    assert {r["label"] for r in rows} == {"positive", "negative"}
    assert not {r["text"] for r in rows} & {r["text"] for r in evals}
    share = sum(r["label"] == "positive" for r in evals) / len(evals)
    assert 0.4 < share < 0.6  # the corpus is balanced
    train_b, held_out_b = prepare_data("rotten_tomatoes", str(tmp_path / "b"))
    assert open(held_out).read() == open(held_out_b).read() and open(train).read() == open(train_b).read()
    qa, _ = prepare_data("chatterbot", str(tmp_path / "c"))
    first = json.loads(open(qa).readline())
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"] and all(m["content"] for m in first["messages"])
