"""The ``shira-dist`` console command.

    shira-dist train --config configs/tiny.yaml [key=value ...]      same as python -m shira_dist.train
    shira-dist merge --adapter DIR [--base MODEL] --out DIR          a plain Hugging Face model directory
    shira-dist generate --adapter DIR [--base MODEL] --prompt TEXT   streamed text (or --chat)
    shira-dist eval --adapter DIR [--config CONFIG] [key=value ...]  the job's held-out metrics

The parsers live here; what each command does is in shira_dist/training/commands/. Exit status:
0 done, 2 bad input (the message names the argument, the value and what is allowed; nothing is
written), 1 a failure while running (a bug keeps its traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from .train import quiet_import_noise  # importing the job's entry also keeps everything offline

EXIT_BAD_INPUT = 2

SUMMARIES = {
    "train": "fine-tune a SHiRA adapter from a run config",
    "merge": "merge a saved adapter into its base; write a plain Hugging Face model directory",
    "generate": "generate text with a saved adapter (streamed; --prompt TEXT or an interactive --chat)",
    "eval": "score a saved adapter on the run config's held-out data (the job's metrics)",
}


# ---- argument types: each error names the value and what is allowed ------------------------------
def _number(kind: type, allowed: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
        return value

    return parse


positive_int = _number(int, "a positive integer (1, 2, ...)", lambda v: v >= 1)
non_negative_int = _number(int, "a non-negative integer (0 turns it off)", lambda v: v >= 0)
non_negative_float = _number(float, "a number >= 0 (0: greedy)", lambda v: v >= 0)
probability = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
positive_float = _number(float, "a number > 0", lambda v: v > 0)


def device_name(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; allowed: auto, cpu, cuda, cuda:<index>")


def _base_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="a saved SHiRA adapter (adapter_config.json + adapter_model.safetensors), e.g. "
                             "<output_dir>/final")
    parser.add_argument("--base", metavar="MODEL",
                        help="the base model: a local Hugging Face model directory or a built-in model name "
                             "(default: the adapter's base_model_name_or_path, as PEFT does)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype the base loads in (default: auto, as stored)")


# ---- the parsers -----------------------------------------------------------------------------------
def merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shira-dist merge", description="Merge a saved adapter into its base model and write a plain "
        "Hugging Face model directory (config.json, model.safetensors, the base's tokenizer) that "
        "AutoModelForCausalLM.from_pretrained loads. Written to a temporary directory beside --out, then renamed.",
        epilog="example: %(prog)s --adapter runs/chat/final --out runs/chat/merged")
    _base_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="the model directory to write (absent or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    return parser


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shira-dist generate", description="Generate text with a saved adapter on its base model, streamed to "
        "stdout as it is produced. Greedy unless --temperature > 0.",
        epilog="examples: %(prog)s --adapter runs/chat/final --prompt 'Hello' --max-new-tokens 32\n"
               "          %(prog)s --adapter runs/chat/final --chat        (one message per line; /exit ends)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _base_arguments(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="complete TEXT once")
    what.add_argument("--chat", action="store_true",
                      help="interactive: user turns from stdin, one per line, until EOF or /exit; the conversation "
                           "is rendered with the tokenizer's chat template")
    parser.add_argument("--chat-template", action="store_true",
                        help="with --prompt: send TEXT as one user turn through the chat template")
    parser.add_argument("--system", metavar="TEXT", help="a system message first (chat template only)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="a local tokenizer directory (default: the adapter's, else the base model's)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N",
                        help="tokens to generate at most (default: 128)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                        help="0: greedy (default); > 0: sample at this temperature")
    parser.add_argument("--top-p", type=probability, metavar="P", help="sampling: nucleus probability mass")
    parser.add_argument("--top-k", type=non_negative_int, metavar="K", help="sampling: keep the K likeliest tokens")
    parser.add_argument("--repetition-penalty", type=positive_float, metavar="X", help="e.g. 1.1 (1: none)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--device", type=device_name, default="auto", help="auto (CUDA if present), cpu, cuda[:i]")
    return parser


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shira-dist eval", description="Score a saved adapter on the run config's held-out data with the "
        "training job's own evaluation: the numbers metrics.json reports as eval_after for that adapter.",
        epilog="example: %(prog)s --adapter runs/tiny/final   (the run's resolved_config.yaml is found)\n"
               "         %(prog)s --adapter runs/tiny/final --config configs/tiny.yaml output_dir=runs/tiny",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="a saved adapter, e.g. <output_dir>/final")
    parser.add_argument("--config", metavar="CONFIG",
                        help="the run config (default: resolved_config.yaml of the run the adapter is in)")
    parser.add_argument("--output", metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides, as for train")
    return parser


# ---- the commands --------------------------------------------------------------------------------
def _merge(argv: list[str]) -> None:
    from .training.commands.merge import MergeArgs, merge

    out = merge(MergeArgs(**vars(merge_parser().parse_args(argv))))
    print(f"[shira_dist] merged model written to {out}", flush=True)


def _generate(argv: list[str]) -> None:
    from .training.commands.generate import GenerateArgs, generate

    generate(GenerateArgs(**vars(generate_parser().parse_args(argv))), sys.stdin, sys.stderr)


def _eval(argv: list[str]) -> None:
    import json

    from .training.commands.evaluate import EvalArgs, evaluate_adapter
    from .training.report import eval_line

    result = evaluate_adapter(EvalArgs(**vars(eval_parser().parse_args(argv))))
    print(eval_line(f"held-out ({result['adapter']})", result["eval"]), flush=True)
    print(json.dumps(result["eval"]), flush=True)


HANDLERS = {"merge": _merge, "generate": _generate, "eval": _eval}


def _usage() -> str:
    width = max(map(len, SUMMARIES))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in SUMMARIES.items()]
    return (f"usage: shira-dist {{{','.join(SUMMARIES)}}} ...\n\ncommands:\n" + "\n".join(lines) +
            "\n\nshira-dist <command> --help describes each command.")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_BAD_INPUT
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        return train_main(rest, prog="shira-dist train")
    if command not in HANDLERS:
        print(f"shira-dist: error: unknown command {command!r}; commands: {list(SUMMARIES)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    quiet_import_noise()
    from .training.commands import CommandError
    from .training.errors import ConfigError

    try:
        HANDLERS[command](rest)
    except (CommandError, ConfigError, FileNotFoundError) as e:
        print(f"shira-dist {command}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:  # argparse: --help (0) or a bad argument (2, its message already printed)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
