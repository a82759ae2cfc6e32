"""``shira-dist merge | generate | eval`` on a tiny job's final adapter.

The base: a random-init 2-layer Llama saved as a local Hugging Face directory with a character
tokenizer that has a chat template (built with ``tokenizers``; nothing is downloaded). The tiny
job (configs/tiny.yaml, 8 steps) trains on it through model.path, so its adapter records that
directory as base_model_name_or_path and every command finds the base without --base.

Tolerances (fp32): the merged directory, loaded with plain transformers, gives the logits of
``PeftModel.from_pretrained(...).merge_and_unload()`` to atol 1e-5; ``generate`` prints exactly the
text of greedy ``model.generate`` on the same model; ``eval`` reports the job's metrics.json
eval_after to rel 1e-6 (the same code on the same data; only summation order could differ).
Bad inputs exit 2 with a message naming the argument and what to do, and leave no output
directory (nor a temporary one) behind.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shira_dist import PeftModel
from shira_dist.cli import main
from tests.training.tiny_job import metrics, run_tiny

SHIRA_DIST = Path(sys.executable).parent / "shira-dist"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _char_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """One token per character (printable ASCII and newline) plus <pad> <s> </s> <unk>: 100 tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=chat_template)


def _llama(hidden: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def _cli(*argv: str) -> int:
    """shira-dist in this process (the commands may set torch's thread count; the session keeps its own)."""
    threads = torch.get_num_threads()
    try:
        return main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base")
    _llama().save_pretrained(directory)
    _char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def run(base, tmp_path_factory) -> Path:
    """The tiny job (8 steps, lm_classification with the label words n/p) on the local base."""
    out = tmp_path_factory.mktemp("run")
    assert run_tiny(out, f"model.path={base}", "model.inline_config=null", "model.tokenizer=null") == 0
    return out


def _left_behind(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-merge", ".old-merge")))


# ---- the command line ------------------------------------------------------------------------------
def test_help_lists_every_command_and_each_command_has_help(capsys):
    top = subprocess.run([str(SHIRA_DIST), "--help"], capture_output=True, text=True, timeout=300)
    assert top.returncode == 0
    for name in ("train", "merge", "generate", "eval"):
        assert f"\n  {name} " in top.stdout, top.stdout
    for name, options in {"merge": ["--adapter", "--base", "--out", "--overwrite"],
                          "generate": ["--prompt", "--chat", "--chat-template", "--max-new-tokens", "--temperature"],
                          "eval": ["--adapter", "--config", "key=value"]}.items():
        assert _cli(name, "--help") == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: shira-dist {name}") and all(o in text for o in options), text


def test_the_job_records_its_base_directory(run, base):
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert config["modules_to_save"] == ["lm_head"]


# ---- merge -------------------------------------------------------------------------------------------
def test_merge_writes_a_plain_model_equal_to_the_merged_one(run, base, tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.run([str(SHIRA_DIST), "merge", "--adapter", str(run / "final"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"merged model written to {out}" in proc.stdout
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= written, written
    assert _left_behind(tmp_path) == []

    ids = torch.tensor([[5, 17, 40, 77, 3, 9, 60, 61, 62, 99]])
    reference = PeftModel.from_pretrained(_load(base), str(run / "final"))
    with torch.no_grad():
        unmerged = reference(input_ids=ids).logits
        expected = reference.merge_and_unload()(input_ids=ids).logits
        merged = _load(out)(input_ids=ids).logits
        plain = _load(base)(input_ids=ids).logits
    assert type(_load(out)).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
    assert (merged - plain).abs().max() > 1e-2  # the adapter (values and the trained lm_head) is in there
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHAT_TEMPLATE


def test_merge_refuses_an_existing_out_unless_overwrite(run, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _cli("merge", "--adapter", run / "final", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"--out='{out}' exists and is not empty; pass --overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert _cli("merge", "--adapter", run / "final", "--out", out, "--overwrite") == 0
    assert "keep.txt" not in {p.name for p in out.iterdir()} and (out / "model.safetensors").is_file()
    assert _left_behind(tmp_path) == []


@pytest.fixture(scope="module")
def wrong_bases(tmp_path_factory, base) -> dict[str, Path]:
    """A wider Llama (hidden 96), and the tiny base quantized by torchao (int8 weight-only) and saved."""
    from transformers import AutoModelForCausalLM, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    wide = tmp_path_factory.mktemp("wide")
    _llama(hidden=96).save_pretrained(wide)
    quantized = tmp_path_factory.mktemp("quantized")
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    model.save_pretrained(quantized)
    return {"wide": wide, "quantized": quantized}


def _adapter_recording(run: Path, tmp_path: Path, base_name) -> Path:
    """A copy of the final adapter whose config records ``base_name`` (None: no base recorded)."""
    copy = tmp_path / "adapter"
    shutil.copytree(run / "final", copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("case", ["missing_adapter", "wrong_shape_base", "quantized_base", "inline_base",
                                  "hub_id_base", "no_recorded_base", "not_an_adapter"])
def test_merge_bad_input_exits_2_with_a_clear_error_and_writes_nothing(case, run, wrong_bases, tmp_path, capsys):
    adapter, extra = run / "final", []
    if case == "missing_adapter":
        adapter = tmp_path / "nope"
    elif case == "wrong_shape_base":
        extra = ["--base", wrong_bases["wide"]]
    elif case == "quantized_base":
        extra = ["--base", wrong_bases["quantized"]]
    elif case == "inline_base":
        adapter = _adapter_recording(run, tmp_path, "inline:llama")
    elif case == "hub_id_base":
        adapter = _adapter_recording(run, tmp_path, "HuggingFaceTB/SmolLM2-135M")
    elif case == "no_recorded_base":
        adapter = _adapter_recording(run, tmp_path, None)
    elif case == "not_an_adapter":
        adapter = tmp_path / "empty"
        adapter.mkdir()
    out = tmp_path / "out" / "merged"
    assert _cli("merge", "--adapter", adapter, "--out", out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress, if any
    assert err.startswith("shira-dist merge: error: "), err
    expected = {
        "missing_adapter": [f"--adapter='{adapter}' is not a directory"],
        "wrong_shape_base": ["does not fit the base model", "layer model.layers.0.mlp.down_proj is (96, 128) (out, in)",
                             "trained on a (64, 128) weight", "pass that model as --base"],
        "quantized_base": ["is quantized", "quant_method='torchao'", "Merge into the unquantized base"],
        "inline_base": ["base_model_name_or_path='inline:llama'", "no weights to load", "Pass --base DIR"],
        "hub_id_base": ["base_model_name_or_path='HuggingFaceTB/SmolLM2-135M'", "nothing is downloaded",
                        "Pass --base DIR"],
        "no_recorded_base": ["base_model_name_or_path=None", "names no base model; pass --base DIR"],
        "not_an_adapter": [f"--adapter='{adapter}' has no adapter_config.json: not a saved adapter"],
    }[case]
    assert all(fragment in err for fragment in expected), err
    assert not (tmp_path / "out").exists()  # not even the parent of --out


# ---- generate ---------------------------------------------------------------------------------------
def _greedy(model, tokenizer, inputs: dict, n: int) -> str:
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = ids[0, inputs["input_ids"].shape[1]:]
    assert len(new) >= 4  # enough text for the comparison to mean something
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generate_streams_the_greedy_output_of_model_generate(run, base, capsys):
    prompt = "review: a fine and warm film\nsentiment:"
    assert _cli("generate", "--adapter", run / "final", "--prompt", prompt, "--max-new-tokens", 12) == 0
    printed = capsys.readouterr().out
    tokenizer = _char_tokenizer()
    model = PeftModel.from_pretrained(_load(base), str(run / "final"))
    expected = _greedy(model, tokenizer, dict(tokenizer(prompt, return_tensors="pt")), 12)
    assert printed == expected + "\n"


def test_generate_chat_keeps_the_history_through_the_chat_template(run, base, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n\nwhat is new\n/exit\nnever read\n"))
    assert _cli("generate", "--adapter", run / "final", "--chat", "--system", "be brief", "--max-new-tokens", 8) == 0
    printed = capsys.readouterr().out
    tokenizer = _char_tokenizer()
    model = PeftModel.from_pretrained(_load(base), str(run / "final"))
    history, replies = [{"role": "system", "content": "be brief"}], []
    for turn in ("hello there", "what is new"):
        history.append({"role": "user", "content": turn})
        inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")
        replies.append(_greedy(model, tokenizer, {k: inputs[k] for k in ("input_ids", "attention_mask")}, 8))
        history.append({"role": "assistant", "content": replies[-1]})
    assert printed == "".join(r + "\n" for r in replies)


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "argument --max-new-tokens: '0' is not a positive integer"),
    (["--temperature", "-1"], "argument --temperature: '-1' is not a number >= 0"),
    (["--top-p", "1.5"], "argument --top-p: '1.5' is not a number in (0, 1]"),
])
def test_generate_bad_settings_exit_2_naming_the_argument(run, argv, message, capsys):
    assert _cli("generate", "--adapter", run / "final", "--prompt", "hi", *argv) == 2
    assert message in capsys.readouterr().err


def test_generate_chat_needs_a_chat_template(run, tmp_path, capsys):
    plain = tmp_path / "tokenizer"
    _char_tokenizer(chat_template=None).save_pretrained(plain)
    assert _cli("generate", "--adapter", run / "final", "--chat", "--tokenizer", plain) == 2
    assert "--chat renders turns with the tokenizer's chat template, and this tokenizer has none" in \
        capsys.readouterr().err


# ---- eval -------------------------------------------------------------------------------------------
def test_eval_reports_the_jobs_own_held_out_numbers(run, tmp_path, capsys):
    result_file = tmp_path / "eval.json"
    assert _cli("eval", "--adapter", run / "final", "--output", result_file) == 0
    printed = capsys.readouterr().out
    job = metrics(run)["eval_after"]
    ours = json.loads(result_file.read_text())
    assert ours["config"] == str(run / "resolved_config.yaml")
    assert set(ours["eval"]) == set(job) == {"loss", "accuracy", "examples"}
    assert ours["eval"]["examples"] == job["examples"] == 200
    assert ours["eval"]["accuracy"] == job["accuracy"]
    assert ours["eval"]["loss"] == pytest.approx(job["loss"], rel=1e-6)
    assert json.loads(printed.strip().splitlines()[-1]) == ours["eval"]


def test_eval_quantizes_the_base_as_the_job_did(tmp_path, capsys):
    """model.quantization: the job trains and scores on a torchao int8 base; eval does the same (configs/tiny.yaml's
    inline model), so its numbers are the job's eval_after, not the float base's."""
    out = tmp_path / "run"
    assert run_tiny(out, "model.quantization=int8_weight_only") == 0
    assert _cli("eval", "--adapter", out / "final", "--output", tmp_path / "eval.json") == 0
    job, ours = metrics(out), json.loads((tmp_path / "eval.json").read_text())["eval"]
    assert ours["accuracy"] == job["eval_after"]["accuracy"]
    assert ours["loss"] == pytest.approx(job["eval_after"]["loss"], rel=1e-6)
    assert job["quantization"]["eval_float_base"]["loss"] != job["eval_after"]["loss"]  # the check can tell them apart


def test_eval_without_a_config_to_find_says_to_pass_one(run, tmp_path, capsys):
    lone = tmp_path / "a" / "b" / "adapter"
    shutil.copytree(run / "final", lone)
    assert _cli("eval", "--adapter", lone) == 2
    assert "no --config given, and no resolved_config.yaml of a run beside --adapter" in capsys.readouterr().err


def test_eval_on_a_base_of_another_shape_names_the_layer(run, base, wrong_bases, capsys):
    assert _cli("eval", "--adapter", run / "final", "--config", run / "resolved_config.yaml",
                f"model.path={wrong_bases['wide']}", f"model.tokenizer={base}") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("shira-dist eval: error: the adapter in"), err
    assert "layer model.layers.0.mlp.down_proj is (96, 128) (out, in) in this base model, but the adapter was " \
        "trained on a (64, 128) weight" in err and "pass the run config it was trained with" in err, err
