"""The job fails safely, in one process (configs/tiny.yaml, a few steps, fp32):

- a diverging run stops at the first non-finite loss or gradient norm (or skips up to
  training.max_nonfinite_steps in a row), never saves a non-finite adapter, and ends "failed";
- data and config errors are one line and exit 2, found before anything starts (also by
  ``shira-launch --dry-run``) or, for a bad row deep in a file, when it is tokenized;
- a resume takes the newest checkpoint that loads, naming and setting aside a broken one, and
  logs the same averages as an uninterrupted run; a completed run is not trained again by
  accident, and metrics.json describes what this process did.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.tiny_job import ROOT, TINY, metrics as _metrics, run_tiny as _main



def _one_line_error(capsys) -> str:
    """The job's error: one line, no traceback (progress bars of the data loading may precede it)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("python -m shira_dist.train: error: ") and "Traceback" not in err, err
    return errors[0]


def _same_log(a: list[dict], b: list[dict]) -> None:
    keys = ("step", "train/loss", "train/grad_norm", "train/accuracy", "train/lr", "train/tokens", "train/epoch")
    assert [{k: p[k] for k in keys} for p in a] == [{k: p[k] for k in keys} for p in b]


def _same_adapter(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run the resumed ones must equal."""
    out = tmp_path_factory.mktemp("reference")
    assert _main(out) == 0
    return {"dir": out, **_metrics(out)}


# ---- 1. non-finite guard -------------------------------------------------------------------
def test_divergence_stops_at_the_first_nonfinite_step_and_saves_nothing_nonfinite(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(out, "training.learning_rate=1e30", "training.save_every=1", "training.keep_checkpoints=null") == 1
    err = _one_line_error(capsys)
    assert "non-finite loss at step 2 (loss nan" in err and "training.max_nonfinite_steps" in err, err
    m = _metrics(out)
    assert m["status"] == "failed" and "non-finite loss at step 2" in m["reason"]
    assert m["train"]["steps"] == 2 and m["train"]["losses"][1] is None and m["train"]["skipped_steps"][0]["step"] == 2
    assert not (out / "final").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]  # saved before the divergence
    assert all(bool(torch.isfinite(v.float()).all()) for v in
               load_file(out / "checkpoints" / "step-1" / "adapter_model.safetensors").values())


def test_nonfinite_steps_are_skipped_up_to_the_limit(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(out, "training.learning_rate=1e30", "training.max_nonfinite_steps=2") == 1
    captured = capsys.readouterr()
    assert captured.out.count("step skipped, no update") == 2  # steps 2 and 3
    assert "non-finite loss at step 4" in captured.err and "3 such steps in a row" in captured.err
    assert [s["step"] for s in _metrics(out)["train"]["skipped_steps"]] == [2, 3, 4]


def test_a_skipped_step_takes_no_update_and_the_run_goes_on(tmp_path, monkeypatch, reference):
    """A non-finite gradient norm at step 3 only (its loss is finite): step 3 leaves the adapter as it was."""
    from shira_dist.training.strategies import SingleStrategy

    calls = {"n": 0}
    real = SingleStrategy.clip_grad_norm

    def third_is_inf(self, max_norm):
        calls["n"] += 1
        norm = real(self, max_norm)
        return math.inf if calls["n"] == 3 else norm

    monkeypatch.setattr(SingleStrategy, "clip_grad_norm", third_is_inf)
    out = tmp_path / "run"
    assert _main(out, "training.max_nonfinite_steps=1", "training.max_steps=4", "training.save_every=1",
                 "training.keep_checkpoints=null") == 0
    m = _metrics(out)
    assert m["status"] == "completed" and [s["step"] for s in m["train"]["skipped_steps"]] == [3]
    assert m["train"]["skipped_steps"][0]["grad_norm"] == "inf"
    losses = m["train"]["losses"]
    assert losses[:2] == reference["train"]["losses"][:2] and losses[2] is None and math.isfinite(losses[3])
    step = {k: load_file(out / "checkpoints" / f"step-{k}" / "adapter_model.safetensors") for k in (2, 3, 4)}
    assert all(torch.equal(step[2][k], step[3][k]) for k in step[2])  # no update at step 3
    assert not all(torch.equal(step[3][k], step[4][k]) for k in step[3])  # step 4 trained again


# ---- 2. data and config errors: one line, exit 2 ----------------------------------------------
def _bad_files(d: Path) -> dict:
    ok = '{"text": "good fun", "label": "positive"}\n'
    (d / "empty.jsonl").write_text("")
    (d / "header.csv").write_text("text,label\n")
    (d / "nolabel.csv").write_text("text,sentiment\ngood fun,positive\n" * 1)
    (d / "nofield.jsonl").write_text(ok + '{"txt": "b", "label": "negative"}\n')
    (d / "badlabel.jsonl").write_text(ok + '{"text": "b", "label": "meh"}\n')
    (d / "malformed.jsonl").write_text(ok + '{"text": "b", "label"\n')
    (d / "few.jsonl").write_text(ok * 3)
    (d / "ok.jsonl").write_text(ok * 20)
    (d / "ds_list.json").write_text("[1, 2]")
    (d / "ds_stage7.json").write_text('{"zero_optimization": {"stage": 7}}')
    (d / "ds_two.json").write_text('{"zero_optimization": {"stage": "two"}}')
    (d / "ds_optimizer.json").write_text('{"optimizer": {"type": "Adam"}}')
    return {p.name: str(p) for p in d.iterdir()}


DATA = ["data.prepare=null", "training.micro_batch_size=4"]


def _fill(text: str, files: dict) -> str:
    """<name> -> the path of the file ``name`` made by _bad_files."""
    for name, path in files.items():
        text = text.replace(f"<{name}>", path)
    return text


@pytest.mark.parametrize("overrides, message", [
    (["data.train_files=[<empty.jsonl>]"], "data.train_files: <empty.jsonl> is empty (0 bytes)"),
    (["data.train_files=[<header.csv>]"], "data.train_files: <header.csv> has a header but no rows"),
    (["data.train_files=[<nolabel.csv>]"], "<nolabel.csv> has no column 'label' (task.label_field); its columns: "
                                           "['text', 'sentiment']"),
    (["data.train_files=[<nofield.jsonl>]"], "<nofield.jsonl> line 2: field 'text' (read by task.prompt_template) "
                                             "is missing"),
    (["data.train_files=[<badlabel.jsonl>]", "task.labels=[negative, positive]"],
     "<badlabel.jsonl> line 2: label='meh' is not one of task.labels=['negative', 'positive']"),
    (["data.train_files=[<malformed.jsonl>]"], "<malformed.jsonl> line 2: not valid JSON (Expecting ':' delimiter"),
    (["data.train_files=[<few.jsonl>]"], "hold 3 examples, fewer than one global batch of 4"),
    (["data.train_files=[<ok.jsonl>]", "task.label_words=[ab, cd]"], "task.label_words[0]='ab' is 2 tokens"),
    (["data.train_files=[<ok.jsonl>]", "task.max_length=12"],
     "task.prompt_template='review: {text}\\nsentiment:' is 19 tokens before any example text, but "
     "task.max_length=12"),
    (["data.train_files=[<ok.jsonl>]", "shira.r=100000"],
     "shira.r=100000 does not fit the model: r=100000 too large for model.layers.0.self_attn.q_proj (64x64)"),
    (["data.train_files=[<ok.jsonl>]", "training.learning_rate=.inf"],
     "training.learning_rate=inf is invalid: expected a finite number"),
    (["data.train_files=[<ok.jsonl>]", "distributed.strategy=deepspeed", "distributed.deepspeed_config=<ds_list.json>"],
     "deepspeed_config='<ds_list.json>' holds a JSON list; expected an object"),
    (["data.train_files=[<ok.jsonl>]", "distributed.strategy=deepspeed",
      "distributed.deepspeed_config=<ds_stage7.json>"], "zero_optimization.stage=7 is invalid; allowed: 0, 1, 2, 3"),
    (["data.train_files=[<ok.jsonl>]", "distributed.strategy=deepspeed", "distributed.deepspeed_config=<ds_two.json>"],
     "zero_optimization.stage='two' is invalid; allowed: 0, 1, 2, 3"),
    (["data.train_files=[<ok.jsonl>]", "distributed.strategy=deepspeed",
      "distributed.deepspeed_config=<ds_optimizer.json>"], "has ['optimizer'] section(s); the training job builds"),
], ids=["empty", "header-only", "no-label-column", "no-field", "bad-label", "malformed-json", "too-few",
        "label-words", "template-too-long", "r-too-large", "inf", "ds-list", "ds-stage-7", "ds-stage-two",
        "ds-optimizer"])
def test_data_and_config_errors_are_one_line_before_anything_starts(tmp_path, capsys, overrides, message):
    files = _bad_files(tmp_path)
    out = tmp_path / "out"
    rc = _main(out, *DATA, *[_fill(o, files) for o in overrides])
    err = _one_line_error(capsys)
    assert rc == 2 and _fill(message, files) in err, err
    assert not out.exists()  # preflight: nothing written


def test_a_bad_row_deep_in_a_file_is_one_line_with_its_row(tmp_path, capsys):
    data = tmp_path / "deep.csv"
    data.write_text("text,label\n" + "good fun,positive\n" * 1500 + "great,maybe\n")
    out = tmp_path / "out"
    assert _main(out, *DATA, f"data.train_files=[{data}]") == 2
    err = _one_line_error(capsys)
    assert f"train data {data} row 1501: label='maybe' is not one of task.labels" in err, err
    m = _metrics(out)
    assert m["status"] == "failed" and "row 1501" in m["reason"]


def test_a_genuine_crash_keeps_its_traceback(tmp_path, monkeypatch):
    from shira_dist.training import loop

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(loop, "train_step", bug)
    with pytest.raises(ZeroDivisionError):  # not turned into one line: main() lets it through
        _main(tmp_path / "out")
    m = _metrics(tmp_path / "out")
    assert m["status"] == "failed" and m["reason"] == "ZeroDivisionError: a bug"


@pytest.mark.parametrize("overrides, message", [
    (["distributed.strategy=deepspeed", "distributed.deepspeed_config=<ds_stage7.json>"],
     "zero_optimization.stage=7 is invalid"),
    (["data.prepare=null", "data.train_files=[<nolabel.csv>]"], "<nolabel.csv> has no column 'label'"),
], ids=["deepspeed-json", "csv-without-label"])
def test_shira_launch_dry_run_runs_the_same_checks(tmp_path, overrides, message):
    files = _bad_files(tmp_path)
    launcher = Path(sys.executable).parent / "shira-launch"
    proc = subprocess.run([str(launcher), "local", "--config", TINY, "--runs-dir", str(tmp_path / "runs"),
                           "--dry-run", *[_fill(o, files) for o in overrides]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and _fill(message, files) in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


# ---- 3, 5. resume: the newest whole checkpoint, the same logged averages ----------------------
def test_resume_skips_a_truncated_checkpoint_and_logs_like_an_uninterrupted_run(tmp_path, capsys, reference):
    out = tmp_path / "run"
    assert _main(out, "training.stop_after_step=6") == 0  # stops inside the log window 5-8
    state = out / "checkpoints" / "step-6" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    (out / "checkpoints" / ".tmp-step-8-x").mkdir()  # what a kill during a save leaves
    (out / "checkpoints" / "step-7").mkdir()  # a half-deleted checkpoint (no trainer_state.pt)
    capsys.readouterr()
    assert _main(out) == 0
    log = capsys.readouterr().out
    assert f"warning: skipping checkpoint {out}/checkpoints/step-6: {state} is unreadable" in log, log
    assert f"moved it to {out}/checkpoints/broken-step-6" in log
    assert "removed what an interrupted save or prune left behind: checkpoints/.tmp-step-8-x, checkpoints/step-7" in log
    assert f"resumed from {out}/checkpoints/step-4 at step 4" in log
    m = _metrics(out)
    assert m["train"]["losses"] == reference["train"]["losses"]
    _same_log(m["log"], reference["log"])
    _same_adapter(out / "final", reference["dir"] / "final")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["broken-step-6", "step-6", "step-8"]


def test_logged_averages_after_a_resume_inside_a_log_window_match(tmp_path, reference):
    out = tmp_path / "run"
    assert _main(out, "training.stop_after_step=6") == 0
    assert _main(out) == 0
    _same_log(_metrics(out)["log"], reference["log"])  # step 8 averages steps 5-8, not 7-8


# ---- 6. a finished run is not a new run; metrics.json describes this process -----------------
def test_a_completed_run_is_not_trained_again_by_accident(tmp_path, capsys, reference):
    out = tmp_path / "run"
    assert _main(out, "training.max_steps=4") == 0
    before = _metrics(out)
    capsys.readouterr()
    assert _main(out, "training.max_steps=4") == 2
    err = _one_line_error(capsys)
    assert f"output_dir='{out}' holds a completed run (4 steps" in err and "training.resume=never" in err
    assert _metrics(out) == before  # untouched
    step4 = out / "checkpoints" / "step-4"
    assert _main(out, "training.max_steps=4", f"training.resume={step4}") == 2
    assert "is at step 4, training.max_steps=4: nothing to train" in _one_line_error(capsys)
    # asked to: train it further from its last checkpoint, as another strategy
    assert _main(out, "training.max_steps=8", f"training.resume={step4}", "distributed.strategy=ddp") == 0
    assert "what changes: strategy single -> ddp" in capsys.readouterr().out
    m = _metrics(out)
    assert (m["status"], m["strategy"], m["resumed_from"], m["start_step"], m["steps_this_run"]) == \
        ("completed", "ddp", str(step4), 4, 4)
    assert [(s["strategy"], s["start_step"], s["end_step"]) for s in m["segments"]] == [("single", 0, 4),
                                                                                         ("ddp", 4, 8)]
    # asked to: start over
    assert _main(out, "training.max_steps=4", "training.resume=never") == 0
    again = _metrics(out)
    assert again["train"]["losses"] == before["train"]["losses"] and again["resumed_from"] is None
    assert len(again["segments"]) == 1 and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2",
                                                                                                      "step-4"]


def test_collective_timeout_default_is_minutes():
    from shira_dist.training import load_run_config

    cfg = load_run_config(TINY)
    assert cfg.distributed.timeout_minutes == 5 and cfg.training.max_nonfinite_steps == 0
