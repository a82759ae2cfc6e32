"""ShiraConfig: PEFT's SHiRA configuration, same fields, defaults and JSON format."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Optional, Union

from .io import atomic_write_bytes
from .masks import MASK_FUNCTIONS

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "SHIRA"


@dataclass
class ShiraConfig:
    """Configuration of a SHiRA adapter (drop-in for ``peft.ShiraConfig``).

    The adapter of an (out, in) linear layer trains r*(in+out) entries of its weight,
    the parameter count of a rank-r LoRA, at up to full rank.
    """

    r: int = 32  # budget: r*(in+out) trainable entries per layer (LoRA rank-r equivalent)
    mask_type: str = "random"  # which entries: see shira_dist.masks.MASK_FUNCTIONS
    random_seed: Optional[int] = None  # None: a fresh mask every run; int: reproducible per layer
    target_modules: Optional[Union[list[str], str]] = None  # names (exact/suffix), a regex, or "all-linear"
    fan_in_fan_out: bool = False  # weights stored (in, out); only nn.Linear (False) is supported
    init_weights: bool = True  # True: values start at zero (adapter = identity); False: randn (tests)
    modules_to_save: Optional[list[str]] = None  # extra modules trained in full and saved per adapter
    # Adapters (of the same model) whose entries this adapter's mask avoids: SHiRA's
    # non-overlapping masks, which fuse with less interference. Every mask type honours it.
    disjoint_from: Optional[list[str]] = None
    # PeftConfig fields kept for checkpoint compatibility.
    peft_type: str = PEFT_TYPE
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    mask_fn: Optional[Callable] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"peft_type={self.peft_type!r} is not supported: shira_dist loads only '{PEFT_TYPE}'")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r={self.r!r} is invalid: r must be a positive integer")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.modules_to_save is not None and isinstance(self.modules_to_save, (list, tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        self._check_types()

    def _check_types(self) -> None:
        """Every field has the type PEFT writes (a hand-edited or foreign file fails here, by name)."""
        def names(v) -> bool:
            return isinstance(v, list) and all(isinstance(x, str) for x in v)

        def optional(kind):
            return lambda v: v is None or (isinstance(v, kind) and not (kind is int and isinstance(v, bool)))

        rules = {"mask_type": (lambda v: isinstance(v, str), "a string"),
                 "random_seed": (optional(int), "an integer or null"),
                 "target_modules": (lambda v: v is None or isinstance(v, str) or names(v),
                                    "a list of module names, a regex string or null"),
                 "modules_to_save": (lambda v: v is None or names(v), "a list of module names or null"),
                 "disjoint_from": (lambda v: v is None or names(v), "a list of adapter names or null"),
                 "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
                 "init_weights": (lambda v: isinstance(v, bool), "true or false"),
                 "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
                 "task_type": (optional(str), "a string or null"),
                 "base_model_name_or_path": (optional(str), "a string or null"),
                 "revision": (optional(str), "a string or null")}
        for name, (ok, allowed) in rules.items():
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"{name}={value!r} is invalid: expected {allowed}")
        if self.mask_fn is None:
            self.mask_fn = MASK_FUNCTIONS.get(self.mask_type)
            if self.mask_fn is None and not self.inference_mode:
                warnings.warn(
                    f"mask_type={self.mask_type!r} is not built in (allowed: {sorted(MASK_FUNCTIONS)}); "
                    "set `config.mask_fn = my_mask_fn` before creating the model"
                )

    # peft.PeftModel's methods ask these of every config
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("mask_fn")
        if d["disjoint_from"] is None:  # shira_dist's own field: absent unless used, so peft reads the file silently
            d.pop("disjoint_from")
        return d

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        data = json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), data)

    @classmethod
    def from_dict(cls, data: dict) -> "ShiraConfig":
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config is a JSON object of fields, got a {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"mask_fn"}
        # PEFT writes bookkeeping keys (auto_mapping, peft_version, ...) and adds new ones over
        # time; they do not change SHiRA's behaviour, so they are dropped with a note.
        unknown = sorted(map(str, set(data) - known - {"auto_mapping", "peft_version"}))
        if unknown:
            warnings.warn(f"ignoring unknown adapter_config keys {unknown} (known: {sorted(known)})")
        kwargs = {k: v for k, v in data.items() if k in known}
        if "peft_type" in kwargs and kwargs["peft_type"] != PEFT_TYPE:
            raise ValueError(f"peft_type={kwargs['peft_type']!r} is not supported: shira_dist loads only '{PEFT_TYPE}'")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, subfolder: str | None = None) -> "ShiraConfig":
        directory = os.path.join(pretrained_path, subfolder) if subfolder else str(pretrained_path)
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: not a saved SHiRA adapter")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
