"""``shira-dist generate``: text from a base model with a saved adapter, streamed to stdout.

    --prompt TEXT                   one completion of TEXT (as is, or with --chat-template as one
                                    user turn through the tokenizer's chat template)
    --chat                          user turns from stdin, one per line, until EOF or "/exit"; the
                                    whole conversation goes through the chat template every turn

Decoding is greedy unless --temperature > 0 (then sampling, with --top-p / --top-k, seeded by
--seed). The adapter runs unmerged (the base forward plus the sparse product), so a quantized
base works too. Tokens are printed as transformers' TextStreamer decodes them (whole words).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, TextIO

import torch

from .common import CommandError, check_adapter_dir, load_adapted, load_base, load_hf_tokenizer, pick_device, \
    resolve_base

EXIT_WORDS = ("/exit",)


@dataclass
class GenerateArgs:
    adapter: str
    base: Optional[str] = None  # None: the adapter's base_model_name_or_path
    prompt: Optional[str] = None  # None: --chat
    chat: bool = False
    chat_template: bool = False  # --prompt as one user turn through the chat template
    system: Optional[str] = None  # a system turn first (chat template only)
    tokenizer: Optional[str] = None  # None: the adapter's directory, else the base's
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"


def generation_settings(model: torch.nn.Module, args: GenerateArgs):
    """The model's own generation config with the command's decoding settings on top."""
    settings = copy.deepcopy(model.generation_config)
    settings.max_new_tokens = args.max_new_tokens
    if args.temperature > 0:
        settings.do_sample, settings.temperature = True, args.temperature
        settings.top_p = args.top_p if args.top_p is not None else settings.top_p
        settings.top_k = args.top_k if args.top_k is not None else settings.top_k
    else:  # greedy: the base's sampling defaults (temperature, top_p, top_k) do not apply
        settings.do_sample, settings.temperature, settings.top_p, settings.top_k = False, None, None, None
    if args.repetition_penalty is not None:
        settings.repetition_penalty = args.repetition_penalty
    return settings


class Generator:
    """The adapted model, its tokenizer and the decoding settings; :meth:`reply` streams one answer."""

    def __init__(self, args: GenerateArgs) -> None:
        from transformers import TextStreamer

        adapter_config = check_adapter_dir(args.adapter)
        base_dir = resolve_base(args.adapter, adapter_config, args.base)
        self.tokenizer = load_hf_tokenizer(args.tokenizer, args.adapter, base_dir)
        if self.tokenizer is None:
            where = f"--tokenizer={args.tokenizer!r}" if args.tokenizer else f"the adapter and the base {base_dir!r}"
            raise CommandError(f"no Hugging Face tokenizer in {where}; pass --tokenizer DIR (a local tokenizer "
                               "directory)")
        if (args.chat or args.chat_template) and not self.tokenizer.chat_template:
            flag = "--chat" if args.chat else "--chat-template"
            raise CommandError(f"{flag} renders turns with the tokenizer's chat template, and this tokenizer has "
                               "none; pass --tokenizer DIR with a chat template, or --prompt without --chat-template")
        self.device = pick_device(args.device)
        self.model = load_adapted(load_base(base_dir, args.dtype, self.device), base_dir, args.adapter, adapter_config)
        self.settings = generation_settings(self.model, args)
        if self.settings.pad_token_id is None:
            self.settings.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
                else self.tokenizer.eos_token_id
        self.streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.seed = args.seed

    def encode_text(self, text: str) -> dict:
        return self.tokenizer(text, return_tensors="pt")

    def encode_turns(self, messages: list[dict]) -> dict:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")

    def reply(self, inputs: dict) -> str:
        """Generate from ``inputs`` (token ids), streaming the new text to stdout; returns that text."""
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        torch.manual_seed(self.seed)
        with torch.no_grad():  # the streamer prints as tokens arrive, and a newline at the end
            ids = self.model.generate(**inputs, generation_config=self.settings, streamer=self.streamer)
        return self.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def generate(args: GenerateArgs, stdin: TextIO, stderr: TextIO) -> None:
    """Run --prompt once, or the --chat conversation over ``stdin``; the text goes to sys.stdout."""
    generator = Generator(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if not args.chat:
        if args.chat_template:
            generator.reply(generator.encode_turns(system + [{"role": "user", "content": args.prompt}]))
        else:
            generator.reply(generator.encode_text(args.prompt))
        return
    history = list(system)
    interactive = stdin.isatty()
    if interactive:
        stderr.write("chat: one message per line; /exit or Ctrl-D ends\n")
    while True:
        if interactive:
            stderr.write("you> ")
            stderr.flush()
        line = stdin.readline()
        if not line or line.strip() in EXIT_WORDS:
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        answer = generator.reply(generator.encode_turns(history))
        history.append({"role": "assistant", "content": answer})
