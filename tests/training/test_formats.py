"""task.format: every example format loads into the token ids and loss targets built by hand.

The tokenizer is built here (no download): byte-level BPE whose ids are the UTF-8 bytes 0..255,
one merge ("hi" -> 256, so ids come from tokenizing the whole rendered text), and the chat
tokens <|im_start|> 257, <|im_end|> 258, <pad> 259; the chat templates are jinja strings set on
it (a ChatML one, SmolLM2-135M-Instruct's own, one with {% generation %} markers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from shira_dist.train import main
from shira_dist.training.batches import ExampleEncoder
from shira_dist.training.config import ConfigError, config_from_dict
from shira_dist.training.data import check_file, load_examples, tokenize
from shira_dist.training.errors import DataError
from shira_dist.training.formats import IGNORE, detect_format, resolve_format
from shira_dist.training.models import ByteTokenizer, HFTokenizer
from shira_dist.training.schema import TaskConfig

S, E, PAD = 257, 258, 259  # <|im_start|>, <|im_end|>, <pad>
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MARKED = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# SmolLM2-135M-Instruct's chat template, as its tokenizer ships it
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# "END" after the last turn: a conversation's prefix is not a prefix of its whole rendering
UNSTABLE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}END"

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "this is it"}, {"role": "user", "content": "ok?"},
                {"role": "assistant", "content": "yes"}]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenization produces)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in bs]
    return {b: chr(c) for b, c in zip(bs + extra, bs + [256 + i for i in range(len(extra))])}


def _hf_tokenizer(template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    u = _bytes_to_unicode()
    vocab = {u[b]: b for b in range(256)} | {u[ord("h")] + u[ord("i")]: 256}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[(u[ord("h")], u[ord("i")])]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    core.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<pad>")
    if template is not None:
        hf.chat_template = template
    return hf


def _tok(template=CHATML) -> HFTokenizer:
    return HFTokenizer(_hf_tokenizer(template))


def b(text: str) -> list[int]:
    """Hand-tokenized text: its UTF-8 bytes, each "hi" one token (256)."""
    out, data, i = [], text.encode(), 0
    while i < len(data):
        if data[i:i + 2] == b"hi":
            out.append(256)
            i += 2
        else:
            out.append(data[i])
            i += 1
    return out


def chatml(turns: list[tuple[str, str]], trained: set[str] = frozenset({"assistant"})) -> tuple[list, list]:
    """The ChatML rendering built by hand: <|im_start|>role\\n content <|im_end|>\\n per turn; a trained
    turn's loss on its content, <|im_end|> and the newline after it."""
    ids, targets = [], []
    for role, content in turns:
        head, body = [S] + b(f"{role}\n"), b(content) + [E] + b("\n")
        ids += head + body
        targets += [IGNORE] * len(head) + (body if role in trained else [IGNORE] * len(body))
    return ids, targets


def encode(row: dict, tokenizer, max_length: int = 512, **task) -> tuple[list, list]:
    enc = ExampleEncoder(TaskConfig(max_length=max_length, **task), tokenizer)
    out = enc({k: [v] for k, v in row.items()}, [0])
    return out["input_ids"][0], out["targets"][0]


def pairs(turns: list[dict]) -> list[tuple[str, str]]:
    return [(t["role"], t["content"]) for t in turns]


# ---- each format -> the hand-built ids and targets ---------------------------------------------------
def test_messages_take_the_loss_on_assistant_turns_only():
    ids, targets = encode({"messages": CONVERSATION}, _tok())
    assert (ids, targets) == chatml(pairs(CONVERSATION))
    short_ids, short_targets = encode({"messages": CONVERSATION[1:3]}, _tok())  # spelled out in full
    assert short_ids == [S, 117, 115, 101, 114, 10, 256, 32, 116, 104, 101, 114, 101, E, 10,
                         S, 97, 115, 115, 105, 115, 116, 97, 110, 116, 10, 116, 256, 115, 32, 105, 115, 32, 105, 116, E, 10]
    assert short_targets == [IGNORE] * 26 + [116, 256, 115, 32, 105, 115, 32, 105, 116, E, 10]
    assert ids == _hf_tokenizer(CHATML).apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]


def test_messages_with_assistant_only_loss_false_take_it_on_every_token():
    ids, targets = encode({"messages": CONVERSATION}, _tok(), assistant_only_loss=False)
    assert ids == chatml(pairs(CONVERSATION))[0] and targets == ids


def test_smollm2_template_adds_its_system_prompt_untrained_even_before_an_assistant_first_turn():
    ids, targets = encode({"messages": CONVERSATION[1:]}, _tok(SMOLLM2))
    assert (ids, targets) == chatml([("system", SMOLLM2_SYSTEM)] + pairs(CONVERSATION[1:]))
    opening = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hey"},
               {"role": "assistant", "content": "yo"}]  # the header render is no prefix here: found by content
    ids, targets = encode({"messages": opening}, _tok(SMOLLM2))
    assert (ids, targets) == chatml([("system", SMOLLM2_SYSTEM)] + pairs(opening))


def test_generation_markers_give_the_same_mask_as_prefix_rendering_and_serve_unstable_templates():
    assert encode({"messages": CONVERSATION}, _tok(MARKED)) == chatml(pairs(CONVERSATION))
    ids, targets = chatml(pairs(CONVERSATION))
    assert encode({"messages": CONVERSATION}, _tok(MARKED + "END")) == (ids + b("END"), targets + [IGNORE] * 3)


def test_a_template_that_is_not_prefix_stable_is_a_clear_error_unless_every_token_trains():
    with pytest.raises(ConfigError, match=r"renders turn 2 of a conversation differently .* \{% generation %\} "
                                          r"markers .* task.assistant_only_loss=false"):
        encode({"messages": CONVERSATION}, _tok(UNSTABLE))
    ids, targets = encode({"messages": CONVERSATION}, _tok(UNSTABLE), assistant_only_loss=False)
    assert ids == chatml(pairs(CONVERSATION))[0] + b("END") and targets == ids


def test_sharegpt_maps_its_roles_onto_messages():
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    row = {"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in CONVERSATION]}
    assert encode(row, _tok(), format="sharegpt") == chatml(pairs(CONVERSATION))
    assert encode(row, _tok()) == chatml(pairs(CONVERSATION))  # auto


def test_alpaca_is_a_chat_exchange_with_a_chat_template_else_the_alpaca_prompt():
    row = {"instruction": "add", "input": "2 and 3", "output": "5"}
    assert encode(row, _tok()) == chatml([("user", "add\n\n2 and 3"), ("assistant", "5")])
    no_input = {"instruction": "say hi", "input": None, "output": "hi"}
    ids, targets = encode(no_input, ByteTokenizer(), format="alpaca")
    prompt = list(b"Below is an instruction that describes a task. Write a response that appropriately completes "
                  b"the request.\n\n### Instruction:\nsay hi\n\n### Response:\n")
    assert ids == prompt + list(b"hi") + [ByteTokenizer.eos_id]
    assert targets == [IGNORE] * len(prompt) + list(b"hi") + [ByteTokenizer.eos_id]
    ids, _ = encode(row, ByteTokenizer())
    assert bytes(ids[:-1]).decode().endswith("### Instruction:\nadd\n\n### Input:\n2 and 3\n\n### Response:\n5")


def test_prompt_completion_as_text_and_as_message_lists():
    ids, targets = encode({"prompt": "2+2=", "completion": "4"}, ByteTokenizer())
    assert ids == list(b"2+2=4") + [ByteTokenizer.eos_id] and targets == [IGNORE] * 4 + [ord("4"), ByteTokenizer.eos_id]
    assert encode({"prompt": "hi ", "completion": "this"}, _tok()) == (b("hi this") + [E], [IGNORE] * 2 + b("this") + [E])
    row = {"prompt": CONVERSATION[:2], "completion": [{"role": "assistant", "content": "this is it"}]}
    assert encode(row, _tok()) == chatml(pairs(CONVERSATION[:3]))


def test_template_rows_are_unchanged_and_a_set_template_wins_over_detection():
    row = {"prompt": "hi", "completion": "yo"}
    ids, targets = encode(row, _tok(), prompt_template="Q: {prompt}\nA:", response_template="{completion}")
    assert ids == b("Q: hi\nA:") + b("yo") + [E] and targets == [IGNORE] * len(b("Q: hi\nA:")) + b("yo") + [E]


def test_auto_detects_the_format_from_the_columns():
    assert detect_format(["messages", "id"]) == "messages"
    assert detect_format(["conversations"]) == "sharegpt"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["text"]) == detect_format(["instruction", "input"]) == "template"
    assert resolve_format(TaskConfig(), ["messages"]) == "messages"
    assert resolve_format(TaskConfig(format="alpaca"), ["messages"]) == "alpaca"
    assert resolve_format(TaskConfig(response_template="{a}"), ["messages"]) == "template"
    classify = TaskConfig(type="lm_classification", labels=["a", "b"], label_words=["a", "b"])
    assert resolve_format(classify, ["messages"]) == "template"


def test_truncation_keeps_ids_and_targets_aligned(tmp_path):
    full_ids, full_targets = chatml(pairs(CONVERSATION))
    for cut in (20, 37, 45):  # before, inside and after the first assistant turn
        assert encode({"messages": CONVERSATION}, _tok(), max_length=cut) == (full_ids[:cut], full_targets[:cut])
    path = tmp_path / "chat.jsonl"
    long_user = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "yes"}]
    path.write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n" + json.dumps({"messages": long_user}) + "\n")
    ds = tokenize(load_examples([str(path)], None, str(tmp_path / "cache"), None),
                  ExampleEncoder(TaskConfig(max_length=40), _tok()), [str(path)], "train")
    assert len(ds) == 1 and ds[0]["input_ids"] == chatml(pairs(CONVERSATION[1:3]))[0]  # nothing left to learn: dropped


# ---- bad inputs ---------------------------------------------------------------------------------------
def _cfg(**task) -> dict:
    return {"model": {"inline_config": {"model_type": "llama"}, "tokenizer": "bytes"}, "task": task,
            "data": {"train_files": ["x.jsonl"]}}


@pytest.mark.parametrize("task, message", [
    ({"format": "chatml"}, "task.format='chatml' is invalid; allowed: ['auto', 'template', 'messages', 'alpaca', "
                           "'sharegpt', 'prompt_completion']"),
    ({"format": "messages", "type": "lm_classification", "labels": ["a", "b"], "label_words": ["a", "b"]},
     "task.format='messages' is for task.type='causal_lm'; task.type='lm_classification' reads template rows"),
    ({"format": "messages", "prompt_template": "Q: {q}"}, "task.prompt_template/response_template are read by "
                                                          "task.format 'template' only"),
    ({"assistant_only_loss": "yes"}, "task.assistant_only_loss='yes' is invalid: expected true or false"),
], ids=["unknown-format", "classification", "template-with-messages", "assistant-only-loss-type"])
def test_config_errors_name_the_key_and_what_is_allowed(task, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_cfg(**task))
    assert message in str(e.value)


def test_a_chat_format_on_a_tokenizer_without_a_chat_template_is_a_config_error():
    for tokenizer, whose in ((ByteTokenizer(), "the built-in byte tokenizer (model.tokenizer: bytes) has none"),
                             (_tok(None), "this tokenizer (no chat_template")):
        with pytest.raises(ConfigError) as e:
            ExampleEncoder(TaskConfig(format="messages"), tokenizer)
        assert f"task.format='messages' renders each conversation with the tokenizer's own chat template, but {whose}" \
            in str(e.value)
    with pytest.raises(ConfigError, match="task.format='sharegpt' renders each conversation"):  # auto-detected
        encode({"conversations": [{"from": "gpt", "value": "x"}]}, ByteTokenizer())


GOOD = {"messages": CONVERSATION[1:3]}


@pytest.mark.parametrize("row, message", [
    ({"text": "x"}, "field 'messages' (read by task.format='messages') is missing"),
    ({"messages": None}, "field 'messages' (read by task.format='messages') is empty (null)"),
    ({"messages": "hi"}, "field 'messages' is a str; expected a list of {'role', 'content'} objects"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "field 'messages'[0]['role']='bot' is not one of "
                                                      "['system', 'user', 'assistant', 'tool']"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "field 'messages'[1] has no 'content'"),
    ({"messages": [{"role": "assistant", "content": ["x"]}]}, "field 'messages'[0]['content'] is a list; "
                                                              "expected text"),
    ({"messages": [{"role": "user", "content": "x"}]}, "field 'messages' has no 'assistant' turn, and "
                                                       "task.assistant_only_loss=true"),
], ids=["missing", "null", "not-a-list", "bad-role", "no-content", "content-not-text", "no-assistant"])
def test_a_malformed_messages_row_names_the_file_the_line_and_the_field(tmp_path, row, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        check_file(str(path), "json", TaskConfig(format="messages"), "data.train_files")
    assert f"{path} line 2: {message}" in str(e.value)


@pytest.mark.parametrize("fmt, lines, message", [
    ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
                  {"conversations": [{"from": "bot", "value": "a"}]}],
     "line 2: field 'conversations'[0]['from']='bot' is not one of ['human', 'gpt', 'system']"),
    ("alpaca", [{"instruction": "a", "output": "b"}, {"instruction": "a", "input": "c"}],
     "line 2: field 'output' (read by task.format='alpaca') is missing"),
    ("prompt_completion", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": [{"role": "assistant",
                                                                                             "content": "b"}]}],
     "line 2: fields 'prompt' and 'completion' must both be text or both be message lists; got a str and a list"),
], ids=["sharegpt-role", "alpaca-output", "prompt-completion-mixed"])
def test_malformed_rows_of_the_other_formats(tmp_path, fmt, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataError) as e:
        check_file(str(path), "json", TaskConfig(), "data.train_files")  # auto finds fmt from the first row
    assert f"{path} {message}" in str(e.value)


def test_a_csv_without_a_column_of_its_format_names_the_column(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("instruction,input\na,b\n")
    with pytest.raises(DataError, match=r"has no column 'output' \(task.format='alpaca'\)"):
        check_file(str(csv), "csv", TaskConfig(format="alpaca"), "data.train_files")


# ---- the job ---------------------------------------------------------------------------------------------
QUESTIONS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "rose": "red",
             "sea": "blue", "night": "dark"}


def _chat_rows(n: int, offset: int = 0) -> str:
    items = sorted(QUESTIONS.items())
    rows = []
    for i in range(n):
        thing, color = items[(i + offset) % len(items)]
        rows.append({"messages": [{"role": "user", "content": f"what color is the {thing}?"},
                                  {"role": "assistant", "content": color}]})
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """A job directory: the tiny chat tokenizer, messages data, a config of a 2-layer random-init Llama."""
    d = tmp_path_factory.mktemp("job")
    _hf_tokenizer(CHATML).save_pretrained(d / "tokenizer")
    (d / "train.jsonl").write_text(_chat_rows(48))
    (d / "eval.jsonl").write_text(_chat_rows(16, offset=3))
    config = {
        "model": {"inline_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "vocab_size": 260, "max_position_embeddings": 128},
                  "tokenizer": str(d / "tokenizer")},
        "task": {"type": "causal_lm", "format": "messages", "max_length": 64},
        "data": {"train_files": [str(d / "train.jsonl")], "eval_files": [str(d / "eval.jsonl")]},
        "shira": {"r": 8, "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
        "training": {"max_steps": 30, "micro_batch_size": 8, "learning_rate": 0.02, "warmup_steps": 3,
                     "precision": "fp32", "log_every": 10, "eval_batch_size": 16, "num_threads": 1,
                     "progress_bar": False},
        "tracking": "none",
    }
    (d / "chat.yaml").write_text(yaml.safe_dump(config))
    return d


def _run(job: Path, out: Path, *overrides: str) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return main(["--config", str(job / "chat.yaml"), f"output_dir={out}", *overrides])
    finally:
        torch.set_num_threads(threads)


def test_a_tiny_job_on_messages_data_learns(job, tmp_path):
    out = tmp_path / "run"
    assert _run(job, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert metrics["status"] == "completed" and before["tokens"] == after["tokens"] > 0
    assert after["loss"] < 0.5 * before["loss"]  # 5.6 -> 0.5 when written: the answers and <|im_end|> are learned


def test_sample_prompts_are_answered_before_and_after_training_as_the_saved_adapter_does(job, tmp_path, capsys):
    """task.sample_prompts: samples.json holds the untrained model's and the trained model's greedy
    answers to each prompt as a user turn of the chat template; the "after" answers equal greedy
    generation with the saved adapter loaded onto the same base, "before" those of the base alone."""
    from transformers import AutoTokenizer

    from shira_dist import PeftModel
    from shira_dist.training.config import load_run_config
    from shira_dist.training.models import load_base_model

    out = tmp_path / "run"
    prompts = ["what color is the sky?", "what color is the coal?"]
    assert _run(job, out, f"task.sample_prompts={json.dumps(prompts)}", "task.sample_max_new_tokens=6") == 0
    samples = json.loads((out / "samples.json").read_text())
    assert samples["prompts"] == prompts and samples["rendered_with_chat_template"] is True
    assert samples["after"] != samples["before"]
    logged = capsys.readouterr().out
    assert f"sample after: {prompts[0]!r} -> {samples['after'][0]!r}" in logged

    cfg = load_run_config(str(out / "resolved_config.yaml"))
    hf = AutoTokenizer.from_pretrained(job / "tokenizer")

    def greedy(model) -> list[str]:
        answers = []
        for p in prompts:
            ids = hf.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]
            new = model.generate(input_ids=ids, do_sample=False, max_new_tokens=6,
                                 pad_token_id=hf.pad_token_id or hf.eos_token_id)[0, ids.shape[1]:]
            answers.append(hf.decode(new, skip_special_tokens=True).strip())
        return answers

    assert greedy(load_base_model(cfg, None)[0]) == samples["before"]
    assert greedy(PeftModel.from_pretrained(load_base_model(cfg, None)[0], str(out / "final")).eval()) == \
        samples["after"]


def test_sample_prompts_are_refused_where_they_cannot_run():
    with pytest.raises(ConfigError, match="task.sample_prompts needs distributed.strategy single or ddp"):
        config_from_dict(_cfg(sample_prompts=["hi"]) | {"distributed": {"strategy": "fsdp"}})
    with pytest.raises(ConfigError, match="task.sample_prompts is for task.type='causal_lm'"):
        config_from_dict({**_cfg(), "task": {"type": "lm_classification", "labels": ["a", "b"],
                                             "label_words": ["a", "b"], "sample_prompts": ["hi"]}})


@pytest.mark.parametrize("data, overrides, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     '{"messages": [{"role": "user", "content": "hi"}, {"content": "yo"}]}\n' * 8, [],
     "<data> line 2: field 'messages'[1] has no 'role'; allowed: ['system', 'user', 'assistant', 'tool']"),
    ('{"text": "hi"}\n' * 16, [], "<data> line 1: field 'messages' (read by task.format='messages') is missing"),
    ("", ["task.format=chatml"], "task.format='chatml' is invalid; allowed: ['auto', 'template', 'messages'"),
    ("", ["model.tokenizer=bytes", "model.inline_config.vocab_size=258"],
     "task.format='messages' renders each conversation with the tokenizer's own chat template, but the built-in "
     "byte tokenizer (model.tokenizer: bytes) has none"),
], ids=["row-without-role", "no-messages-field", "unknown-format", "bytes-tokenizer"])
def test_a_job_with_bad_chat_data_or_format_exits_2_and_writes_nothing(job, tmp_path, capsys, data, overrides,
                                                                       message):
    path = tmp_path / "bad.jsonl"
    path.write_text(data or _chat_rows(16))
    out = tmp_path / "run"
    assert _run(job, out, f"data.train_files=[{path}]", "data.eval_files=[]", *overrides) == 2
    err = capsys.readouterr().err
    assert message.replace("<data>", str(path)) in err and "Traceback" not in err, err
    assert not out.exists()
