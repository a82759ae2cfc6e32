"""``shira_dist.PeftModel``: what ``get_peft_model`` returns, a real ``peft.PeftModel``.

    PeftModel                      (isinstance(model, peft.PeftModel): Trainer, TRL, Accelerate)
    └─ base_model: ShiraModel      shira_dist's tuner: adapters, masks, merge, fuse modes
       └─ model: the transformers model, its nn.Linear targets wrapped in ShiraLinear

Transformers' Trainer, TRL and Accelerate recognise a PEFT model only by
``isinstance(model, peft.PeftModel)``, then save adapter-only checkpoints, resume with
``load_adapter``, patch the inner model (``get_base_model()``) and take reference outputs
with the adapter disabled. Subclassing is the one way to be recognised without replacing
PEFT's own SHiRA (which a process comparing the two would still want). Only the class is
PEFT's: every method that reaches adapters, files or layers is defined here and runs
shira_dist's code (PEFT's versions assume its own tuner and layer classes); attributes not
found here fall through to the ShiraModel, then to the transformers model, as in PEFT.
Parameter and ``state_dict()`` names are PEFT's: ``base_model.model.<module path>...``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterable, Optional, Union

import peft
from peft.peft_model import TunerLayerStatus, TunerModelStatus
from torch import nn

from .config import ShiraConfig
from .masks import LossFn
from .model import ShiraModel

_LORA_ONLY = ("path_initial_model_for_weight_conversion", "convert_pissa_to_lora")


class PeftModel(peft.PeftModel):
    """A model with SHiRA adapters (drop-in for ``peft.PeftModel`` / ``get_peft_model``'s result).

    Args:
        model: the base model (e.g. a transformers ``PreTrainedModel``).
        peft_config: a ``shira_dist.ShiraConfig``.
        adapter_name: name of the first adapter.
        autocast_adapter_dtype: fp16/bf16 adapter values are kept in fp32, as in PEFT.
        low_cpu_mem_usage: accepted for PEFT's signature; means nothing here.
        calibration_data, loss_fn: batches for the data-driven masks ("gradient", "snip").
    """

    def __init__(self, model: nn.Module, peft_config: ShiraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
                 calibration_data: Optional[Iterable[dict]] = None, loss_fn: Optional[LossFn] = None) -> None:
        nn.Module.__init__(self)  # not peft.PeftModel.__init__: it would build PEFT's own SHiRA tuner
        if isinstance(model, (PeftModel, ShiraModel)):
            raise TypeError("model already has SHiRA adapters; use add_adapter() to add another")
        self._init_peft_fields()
        self.base_model = ShiraModel(model, peft_config, adapter_name, calibration_data=calibration_data,
                                     loss_fn=loss_fn)
        self.base_model._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def _init_peft_fields(self) -> None:
        """What peft.PeftModel's inherited properties read."""
        self.peft_type = "SHIRA"
        self.special_peft_forward_args = {"adapter_names"}
        self._is_prompt_learning = False
        self._peft_config = None
        self._adapters_disabled = False

    @classmethod
    def _around(cls, tuner: ShiraModel) -> "PeftModel":
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._init_peft_fields()
        obj.base_model = tuner
        return obj

    # ---- attributes ------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name == "base_model":
                raise
        try:
            return getattr(self.base_model, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} (shira_dist, around a {type(self.get_base_model()).__name__}) "
                                 f"has no attribute {name!r}") from None

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    @active_adapter.setter
    def active_adapter(self, name: str) -> None:
        self.base_model.set_adapter(name)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any):
        """The base model's forward; ``adapter_names``: one adapter per batch row ("__base__":
        none), inference only. Other keywords (``labels``, TRL's ``fused_lm_head`` ...) pass
        through to the base model."""
        return self.base_model(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any):
        return self.base_model.generate(*args, adapter_names=adapter_names, **kwargs)

    # ---- adapters ----------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: ShiraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True, calibration_data: Optional[Iterable[dict]] = None,
                    loss_fn: Optional[LossFn] = None) -> None:
        """Add an adapter; it is inactive and frozen until ``set_adapter``."""
        self.base_model.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
                                    autocast_adapter_dtype=autocast_adapter_dtype,
                                    calibration_data=calibration_data, loss_fn=loss_fn)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    @contextmanager
    def disable_adapter(self):
        """Base-model outputs inside (merged adapters unmerged, and merged again on exit)."""
        was_disabled = self._adapters_disabled
        try:
            with self.base_model.disable_adapter():
                self._adapters_disabled = True
                yield
        finally:
            self._adapters_disabled = was_disabled

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return self.base_model.get_nb_trainable_parameters()

    def print_trainable_parameters(self) -> None:
        self.base_model.print_trainable_parameters()

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """One PEFT ``TunerLayerStatus`` per SHiRA layer (named from the tuner, as PEFT does)."""
        out = []
        for name, layer in self.base_model.shira_layers():
            values = dict(layer.shira_weight.items())
            out.append(TunerLayerStatus(
                name=f"model.{name}", module_type=type(layer).__name__,
                enabled=not layer.disable_adapters, active_adapters=layer.active_adapters,
                merged_adapters=layer.merged_adapters,
                requires_grad={n: v.requires_grad for n, v in values.items()},
                available_adapters=sorted(values),
                devices={n: [v.device.type] for n, v in values.items()}, quantization_backend=None))
        return out

    def get_model_status(self) -> TunerModelStatus:
        """PEFT's ``TunerModelStatus`` over all SHiRA layers ("irregular" where layers differ)."""
        layers = self.get_layer_status()
        trainable, total = self.get_nb_trainable_parameters()

        def agree(values: list):
            return values[0] if values and all(v == values[0] for v in values) else "irregular"

        names = sorted({n for s in layers for n in s.available_adapters})
        return TunerModelStatus(
            base_model_type=type(self.get_base_model()).__name__, adapter_model_type=type(self.base_model).__name__,
            peft_types={n: "SHIRA" for n in self.peft_config}, trainable_params=trainable, total_params=total,
            num_adapter_layers=len(layers), enabled=agree([s.enabled for s in layers]),
            active_adapters=agree([s.active_adapters for s in layers]),
            merged_adapters=sorted({n for s in layers for n in s.merged_adapters}),
            requires_grad={n: agree([s.requires_grad[n] for s in layers if n in s.requires_grad]) for n in names},
            available_adapters=names,
            devices={n: sorted({d for s in layers for d in s.devices.get(n, [])}) for n in names},
            quantization_backend=None)

    # ---- checkpoints -------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: Union[str, bool] = "auto",
                        is_main_process: bool = True, state_dict: Optional[dict] = None, **kwargs: Any) -> None:
        """Write adapters in PEFT's format ("default" in ``save_directory``, others in subfolders).

        ``state_dict``: a full state dict of this model (what the Trainer passes from a
        DeepSpeed/FSDP gather), whose adapter tensors are saved instead of the live ones.
        ``is_main_process``: only the main process writes. ``safe_serialization=False`` writes
        ``adapter_model.bin`` as PEFT does. Meaning nothing here, and ignored:
        ``save_embedding_layers`` (embeddings are saved only as modules_to_save), and hub or
        sharding keywords (``save_function``, ``max_shard_size``, ``push_to_hub``, ``token``).
        PEFT's LoRA weight conversions (``path_initial_model_for_weight_conversion``) are refused.
        """
        for key in _LORA_ONLY:
            if kwargs.get(key):
                raise ValueError(f"{key}={kwargs[key]!r}: a LoRA weight conversion, which SHiRA adapters do not have")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is a file; give a directory")
        if not is_main_process:
            return
        self.base_model.save_pretrained(save_directory, selected_adapters=selected_adapters,
                                        safe_serialization=safe_serialization, state_dict=state_dict)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[ShiraConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: Optional[dict[str, str]] = None,
                        torch_device: Optional[str] = None, allow_non_finite: bool = False,
                        subfolder: Optional[str] = None, **kwargs: Any) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (a local directory).

        The whole checkpoint is checked first: on any error ``model`` is left exactly as it was.
        ``config`` replaces the saved config; ``key_mapping`` ({regex: replacement}) renames
        stored keys; ``subfolder`` is a folder inside ``model_id``. ``torch_device``,
        ``ephemeral_gpu_offload`` and ``low_cpu_mem_usage`` mean nothing here (values load onto
        each layer's own device) and are ignored, as are hub keywords (``revision``, ``token``).
        """
        if isinstance(model, (PeftModel, ShiraModel)):
            raise TypeError("model already has SHiRA adapters; use load_adapter() to add another")
        tuner = ShiraModel.__new__(ShiraModel)
        nn.Module.__init__(tuner)
        tuner._setup(model)
        tuner.load_adapter(str(model_id), adapter_name, is_trainable=is_trainable, allow_non_finite=allow_non_finite,
                           key_mapping=key_mapping, config=config, subfolder=subfolder)
        tuner._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        tuner.set_adapter(adapter_name)
        return cls._around(tuner)

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: Optional[dict[str, str]] = None, hotswap: bool = False,
                     allow_non_finite: bool = False, subfolder: Optional[str] = None, **kwargs: Any) -> None:
        """Load a saved adapter as ``adapter_name`` (not activated); an existing adapter of that
        name is replaced in place (the Trainer's resume). Keywords as in :meth:`from_pretrained`."""
        self.base_model.load_adapter(str(model_id), adapter_name, is_trainable=is_trainable,
                                     allow_non_finite=allow_non_finite, hotswap=hotswap, key_mapping=key_mapping,
                                     subfolder=subfolder)
        self.base_model._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if is_trainable:  # as PEFT: trainable even before set_adapter makes it active
            self.base_model.set_requires_grad(adapter_name, True)
        else:
            self.eval()  # as PEFT: an adapter loaded for inference puts the model in eval mode

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()


def get_peft_model(model: nn.Module, peft_config: ShiraConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False, calibration_data: Optional[Iterable[dict]] = None,
                   loss_fn: Optional[LossFn] = None) -> PeftModel:
    """Wrap ``model`` with a SHiRA adapter (drop-in for ``peft.get_peft_model``).

    ``calibration_data`` (batches passed as ``model(**batch)``) and ``loss_fn(model, batch)``
    feed the data-driven masks ``mask_type="gradient"`` and ``"snip"``; see calibrate_masks.
    ``mixed=True`` (PEFT's mixed adapter types) is refused: every adapter here is SHiRA.
    ``revision`` is recorded in the config, as PEFT does; ``low_cpu_mem_usage`` means nothing here.
    """
    if mixed:
        raise ValueError("mixed=True mixes PEFT adapter types; shira_dist models hold SHiRA adapters only")
    if revision is not None and isinstance(peft_config, ShiraConfig):
        peft_config.revision = revision
    return PeftModel(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                     low_cpu_mem_usage=low_cpu_mem_usage, calibration_data=calibration_data, loss_fn=loss_fn)
