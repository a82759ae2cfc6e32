"""``shira-dist merge``: a saved adapter merged into its base, written as a plain Hugging Face model.

    check --out (absent or empty, or --overwrite) ─► resolve the base ─► refuse a quantized base
        ─► load base + adapter (shapes checked) ─► merge_and_unload ─► save into <out's parent>/.tmp-merge-*
        ─► rename onto --out (an old --out, with --overwrite, is moved aside first, then removed)

Everything that can fail on bad input fails before the first file is written, and a failure
while writing removes the temporary directory: --out is the whole model or absent (or, with
--overwrite, the previous content), never a partial one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

from .common import CommandError, check_adapter_dir, load_adapted, load_base, load_hf_tokenizer, quantization_of, \
    resolve_base


@dataclass
class MergeArgs:
    adapter: str
    out: str
    base: Optional[str] = None  # None: the adapter's base_model_name_or_path
    overwrite: bool = False
    dtype: str = "auto"  # common.DTYPES key; auto: the base's stored dtype


def check_out(out: str, overwrite: bool) -> None:
    """--out must be absent or an empty directory, unless --overwrite replaces an existing one."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise CommandError(f"--out={out!r} exists and is not a directory; give a new directory path")
    if os.listdir(out) and not overwrite:
        raise CommandError(f"--out={out!r} exists and is not empty; pass --overwrite to replace it, or give a new "
                           "directory path")


def merge(args: MergeArgs) -> str:
    """Write the merged model to ``args.out``; returns its path."""
    out = os.path.abspath(args.out)
    check_out(out, args.overwrite)
    adapter_config = check_adapter_dir(args.adapter)
    base_dir = resolve_base(args.adapter, adapter_config, args.base)
    quantized = quantization_of(base_dir)
    if quantized is not None:
        raise CommandError(f"base model {base_dir!r} is quantized (config.json quantization_config.quant_method="
                           f"{quantized!r}); merging writes the adapter into the base weights, which a quantized "
                           "weight cannot hold exactly. Merge into the unquantized base (--base DIR of the float "
                           "model), then quantize the merged model if you need to")
    model = load_adapted(load_base(base_dir, args.dtype, torch.device("cpu")), base_dir, args.adapter, adapter_config)
    try:
        merged = model.merge_and_unload()
    except TypeError as e:  # a weight quantized or sharded in memory (the core names the layer and type)
        raise CommandError(f"base model {base_dir!r} cannot take the merge: {e}. Merge into the unquantized base "
                           "(--base DIR of the float model)") from None
    tokenizer = load_hf_tokenizer(base_dir)
    if tokenizer is None:
        print(f"shira-dist merge: note: {base_dir!r} has no tokenizer files; the merged model has none either",
              file=sys.stderr)
    write_model_dir(merged, tokenizer, out)
    return out


def write_model_dir(model: torch.nn.Module, tokenizer, out: str) -> None:
    """``model`` (and ``tokenizer``) saved into a temporary directory beside ``out``, then renamed onto it."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-merge-", dir=parent)
    old = None
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        if os.path.isdir(out) and os.listdir(out):  # --overwrite: keep the old one until the new one is in place
            old = tempfile.mkdtemp(prefix=".old-merge-", dir=parent)
            os.rename(out, os.path.join(old, "previous"))
        os.replace(tmp, out)  # an empty directory at ``out`` is replaced too
    except BaseException:
        if old is not None and not os.path.exists(out):
            os.rename(os.path.join(old, "previous"), out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
