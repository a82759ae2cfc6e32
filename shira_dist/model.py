"""ShiraModel: injects SHiRA layers into a model and manages adapters (PEFT's API).

``get_peft_model(model, config)`` wraps ``model``; ``model.base_model.model.<path>``
reaches the original modules, anything else falls through to the wrapped model.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .config import ShiraConfig
from .layer import ShiraLinear
from .masks import (CALIBRATED_MASKS, MASK_FUNCTIONS, LossFn, calibrate_masks, layer_seed, layer_shape, mask_device,
                    random_csr, random_mask, shira_budget)
from .modules_to_save import ModulesToSave
from .partitioned import full_numel, full_shape
from .patterns import make_pattern
from .targeting import find_modules_to_save, find_targets, get_submodule_parent


def _call_mask_fn(mask_fn, base_layer: nn.Module, r: int, random_seed: Optional[int],
                  exclude: Optional[Tensor] = None) -> Tensor:
    params = inspect.signature(mask_fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {"random_seed": random_seed} if "random_seed" in params or takes_any else {}
    if exclude is not None:
        if not ("exclude" in params or takes_any):
            raise TypeError(f"config.disjoint_from needs a mask_fn that takes exclude= (flat positions to avoid); "
                            f"{getattr(mask_fn, '__name__', mask_fn)!r} does not")
        kwargs["exclude"] = exclude
    return mask_fn(base_layer, r, **kwargs)


def _forward_with_signature_of(model: nn.Module, owner: nn.Module) -> types.MethodType:
    """A bound ``forward`` for ``owner`` that calls ``owner.model`` and shows ``model.forward``'s
    signature (Trainer drops dataset columns by it). A bound method deep-copies correctly."""

    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        with self._adapter_names(adapter_names):
            return self.model(*args, **kwargs)

    sig = inspect.signature(model.forward)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    return types.MethodType(forward, owner)


class ShiraModel(nn.Module):
    """A model with SHiRA adapters. Args: model, config (ShiraConfig), adapter_name."""

    prefix: str = "shira_"

    def __init__(self, model: nn.Module, config: ShiraConfig, adapter_name: str = "default",
                 calibration_data: Optional[Iterable[dict]] = None, loss_fn: Optional[LossFn] = None) -> None:
        super().__init__()
        self._setup(model)
        exclude = self._exclusions(config) if isinstance(config, ShiraConfig) else None  # errors: no adapters yet
        self._inject(adapter_name, config, indices=self._calibrate(config, calibration_data, loss_fn, exclude))
        self._active_adapters = [adapter_name]
        self._apply_active()

    def _setup(self, model: nn.Module) -> None:
        if isinstance(model, ShiraModel):
            raise TypeError("model is already a ShiraModel; use add_adapter() to add another adapter")
        self.model = model
        # forward() advertises the wrapped model's signature (Trainer drops dataset columns by it).
        self.forward = _forward_with_signature_of(model, self)
        self.peft_config: dict[str, ShiraConfig] = {}
        self._active_adapters: list[str] = []

    # ---- fall-through ------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
        try:
            return getattr(self.model, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} (around a {type(self.model).__name__}) has no attribute "
                                 f"{name!r}") from None

    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """The wrapped model's forward (replaced per instance in _setup: same call, the model's
        signature). ``adapter_names``: one adapter name per batch row ("__base__": no adapter),
        all rows in one batch (inference only)."""
        with self._adapter_names(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """The wrapped model's ``generate``; ``adapter_names`` as in :meth:`forward` (repeated per
        beam under beam search)."""
        if adapter_names is not None and isinstance(kwargs.get("num_beams"), int) and kwargs["num_beams"] > 1:
            adapter_names = [n for n in adapter_names for _ in range(kwargs["num_beams"])]
        with self._adapter_names(adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def _adapter_names(self, adapter_names: Optional[list[str]]) -> Iterator[None]:
        """Hand ``adapter_names`` to every SHiRA layer and modules_to_save wrapper for one call."""
        if adapter_names is None:
            yield
            return
        if self.model.training:
            raise ValueError("adapter_names= is for inference: call model.eval() first (training runs the active "
                             "adapters)")
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapter(s) {unknown}; adapters: {list(self.peft_config)}, "
                             "or '__base__' for the base model")
        names = list(adapter_names)

        def inject(module, args, kwargs):
            return args, {**kwargs, "adapter_names": names}

        handles = [m.register_forward_pre_hook(inject, with_kwargs=True) for m in self.model.modules()
                   if isinstance(m, (ShiraLinear, ModulesToSave))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def get_base_model(self) -> nn.Module:
        return self.model

    # ---- layers ------------------------------------------------------------------------
    def shira_layers(self) -> Iterator[tuple[str, ShiraLinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ShiraLinear):
                yield name, module

    def _saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSave):
                yield name, module

    def _exclusions(self, config: ShiraConfig) -> Optional[dict[str, Tensor]]:
        """Per module path, the flat positions of the ``config.disjoint_from`` adapters' entries."""
        if not config.disjoint_from:
            return None
        self._check_adapters(config.disjoint_from)
        out = {}
        for name, layer in self.shira_layers():
            held = [layer.shira_indices[a].long() for a in config.disjoint_from if a in layer.shira_weight]
            if held:
                out[name] = torch.cat([i[0] * layer.in_features + i[1] for i in held])
        return out

    def _calibrate(self, config: ShiraConfig, calibration_data: Optional[Iterable[dict]],
                   loss_fn: Optional[LossFn], exclude: Optional[dict[str, Tensor]]) -> Optional[dict[str, Tensor]]:
        """Indices of data-driven masks (gradient, SNIP) from calibration batches, else None."""
        data_driven = config.mask_type in CALIBRATED_MASKS and config.mask_fn is MASK_FUNCTIONS[config.mask_type]
        if calibration_data is None:
            if data_driven:
                raise ValueError(f"mask_type={config.mask_type!r} chooses entries from gradients: pass "
                                 "calibration batches, e.g. get_peft_model(model, config, calibration_data=batches)")
            return None
        if not data_driven:
            raise ValueError(f"calibration_data was given but mask_type={config.mask_type!r} does not use it "
                             f"(data-driven mask types: {sorted(CALIBRATED_MASKS)})")
        return calibrate_masks(self.model, config, calibration_data, loss_fn=loss_fn, exclude=exclude)

    def _inject(self, adapter_name: str, config: ShiraConfig, indices: Optional[dict[str, Tensor]] = None,
                exclude: Optional[dict[str, Tensor]] = None) -> None:
        """Add adapter ``adapter_name`` to every target; all checks run before anything changes."""
        self._apply_plan(self._plan(adapter_name, config, indices, exclude))

    def _plan(self, adapter_name: str, config: ShiraConfig, indices: Optional[dict[str, Tensor]] = None,
              exclude: Optional[dict[str, Tensor]] = None) -> "_AdapterPlan":
        """Everything adding the adapter needs, checked, without changing the model.

        ``indices`` (module path -> (2, nnz) int) gives every target's pattern (loaded or
        calibrated); without it ``config.mask_fn`` draws one per target, avoiding the flat
        positions ``exclude[path]`` (``config.disjoint_from``).
        """
        if not isinstance(config, ShiraConfig):
            raise TypeError(f"config must be a shira_dist.ShiraConfig, got {type(config).__name__}")
        ckpt.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {list(self.peft_config)}")
        targets = find_targets(self.model, config.target_modules)
        for name, module in targets:
            if not isinstance(module, (nn.Linear, ShiraLinear)):
                raise TypeError(f"target {name!r} is a {type(module).__name__}, which SHiRA does not support; "
                                "supported module types: torch.nn.Linear")
        if indices is not None:
            extra = sorted(set(indices) - {n for n, _ in targets})
            if extra:
                raise ValueError(f"SHiRA tensors given for {extra[0]!r}, which is not a target of this "
                                 f"adapter's target_modules in this model ({len(extra)} such modules)")
            missing = [name for name, _ in targets if name not in indices]
            if missing:
                raise ValueError(f"no SHiRA tensors for targeted module {missing[0]!r}")
        elif config.mask_fn is None:
            raise ValueError(f"mask_type={config.mask_type!r} is unknown and config.mask_fn is not set; "
                             f"built-in mask types: {sorted(MASK_FUNCTIONS)}")
        layers = []
        for name, module in targets:
            base = module.base_layer if isinstance(module, ShiraLinear) else module
            shape = layer_shape(base)
            nnz = shira_budget(*shape, config.r, where=name)
            source: dict = {}
            if indices is not None:
                source["indices"] = indices[name]
            else:
                seed = None if config.random_seed is None else layer_seed(config.random_seed, name)
                avoid = (exclude or {}).get(name)
                if config.mask_fn is random_mask:  # the built-in: its pattern made directly in CSR form
                    source["csr"] = random_csr(shape, config.r, seed, mask_device(base.weight), exclude=avoid)
                else:
                    source["mask"] = _call_mask_fn(config.mask_fn, base, config.r, seed, avoid)
            pattern = make_pattern(shape, nnz, f"{name} {shape} adapter {adapter_name!r}", **source)
            avoid = (exclude or {}).get(name)
            if avoid is not None:
                idx = pattern.indices().long()
                if bool(torch.isin(idx[0] * shape[1] + idx[1], avoid.to(idx.device)).any()):
                    raise ValueError(f"{name}: the mask shares entries with {config.disjoint_from} although "
                                     "config.disjoint_from asks to avoid them (a mask_fn that ignores exclude=?)")
            layers.append((name, module, pattern))
        saved = find_modules_to_save(self.model, config.modules_to_save)
        return _AdapterPlan(adapter_name, config, layers, saved)

    def _apply_plan(self, plan: "_AdapterPlan") -> None:
        if not self.peft_config:
            self.model.requires_grad_(False)  # the base is frozen; adapters set their own flags
        config, name_ = plan.config, plan.adapter_name
        for name, module, pattern in plan.layers:
            if isinstance(module, ShiraLinear):
                module.update_layer(name_, None, config.r, init_weights=config.init_weights, pattern=pattern)
            else:
                layer = ShiraLinear(module, adapter_name=name_, r=config.r, init_weights=config.init_weights,
                                    layer_name=name, fan_in_fan_out=config.fan_in_fan_out, pattern=pattern)
                layer.set_adapter(self._active_adapters or [name_])
                parent, child = get_submodule_parent(self.model, name)
                setattr(parent, child, layer)
        for name, module in plan.saved:
            if isinstance(module, ModulesToSave):
                module.add(name_)
            else:
                parent, child = get_submodule_parent(self.model, name)
                setattr(parent, child, ModulesToSave(module, name_))
        self.peft_config[name_] = config
        self._mark_tied_weights()

    def _mark_tied_weights(self) -> None:
        """A weight shared with another module (tied embeddings) must never be fused in place."""
        uses = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        for _, layer in self.shira_layers():
            layer.fusable = uses[id(layer.base_layer.weight)] == 1

    def set_fuse_mode(self, mode: str) -> None:
        """Execution mode of every SHiRA layer: "auto" (default), "fused", "unfused".

        Every mode computes with the values as they are now. "auto": training forwards (autograd
        on) write W0 + deltas into each plain fp32/fp64 base weight and run the base model's own
        forward, adding only the values' SDDMM to the backward; other layers, and forwards
        without autograd, run the base forward plus a sparse product. "fused": also fuse other
        float weights (error for a layer that cannot). "unfused": never write into weights.
        """
        layers = [layer for _, layer in self.shira_layers()]
        if mode == "fused":
            for layer in layers:  # all checked before any changes
                layer._check_fusable()
        for layer in layers:
            layer.set_fuse_mode(mode)

    def unfuse(self) -> None:
        """Put W0 back into every base weight a training forward fused (bit-exact); the next
        training forward writes the deltas again. Call it before handing a model that has run
        training forwards to something that copies its weights (sharding, quantizing)."""
        for _, layer in self.shira_layers():
            layer.unfuse()

    def _check_adapters(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"unknown adapter {n!r}; adapters: {list(self.peft_config)}")
        return names

    def _apply_active(self, inference_mode: bool = False) -> None:
        trainable = not inference_mode and any(not self.peft_config[a].inference_mode for a in self._active_adapters)
        for _, layer in self.shira_layers():
            layer.set_adapter(self._active_adapters, inference_mode=not trainable)
        for _, module in self._saved_modules():
            module.set_adapter(self._active_adapters, trainable=trainable)

    # ---- adapter management ------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str:
        if not self._active_adapters:
            raise ValueError("no adapter is active")
        return self._active_adapters[0]

    def add_adapter(self, adapter_name: str, peft_config: ShiraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True, calibration_data: Optional[Iterable[dict]] = None,
                    loss_fn: Optional[LossFn] = None) -> None:
        """Add a new adapter; it is not active (nor trainable) until ``set_adapter``.
        ``low_cpu_mem_usage`` means nothing here (values are created directly, r*(in+out) per layer)."""
        exclude = self._exclusions(peft_config) if isinstance(peft_config, ShiraConfig) else None
        indices = self._calibrate(peft_config, calibration_data, loss_fn, exclude)
        self._inject(adapter_name, peft_config, indices=indices, exclude=exclude)
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        self._apply_active()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """As PEFT: fp16/bf16 adapter values become fp32 (the base stays as it is), so small
        updates are not rounded away; the delta is computed in fp32 and added in the base's dtype."""
        if not autocast_adapter_dtype:
            return
        for _, layer in self.shira_layers():
            values = layer.shira_weight[adapter_name] if adapter_name in layer.shira_weight else None
            if values is not None and values.dtype in (torch.float16, torch.bfloat16):
                values.data = values.data.float()

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate adapter(s); they train unless ``inference_mode`` (or loaded for inference)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._active_adapters = self._check_adapters(names)
        self._apply_active(inference_mode)

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Make the named adapters' values (and modules_to_save copies) trainable or frozen."""
        names = self._check_adapters([adapter_names] if isinstance(adapter_names, str) else adapter_names)
        for _, layer in self.shira_layers():
            for n in names:
                if n in layer.shira_weight:
                    layer.shira_weight[n].requires_grad_(requires_grad)
        for _, module in self._saved_modules():
            for n in names:
                if n in module.modules_to_save:
                    module.modules_to_save[n].requires_grad_(requires_grad)

    def enable_adapter_layers(self) -> None:
        for _, layer in self.shira_layers():
            layer.enable_adapters(True)
        for _, module in self._saved_modules():
            module.disabled = False

    def disable_adapter_layers(self) -> None:
        """Base-model outputs until ``enable_adapter_layers`` (merged adapters are unmerged)."""
        for _, layer in self.shira_layers():
            layer.enable_adapters(False)
        for _, module in self._saved_modules():
            module.disabled = True

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_adapters([adapter_name])
        merged_in = [n for n, layer in self.shira_layers() if adapter_name in layer.merged_adapters]
        if merged_in:
            raise ValueError(f"adapter {adapter_name!r} is merged (e.g. in {merged_in[0]!r}); unmerge it first")
        for name, layer in list(self.shira_layers()):
            if adapter_name in layer.shira_weight:
                layer.delete_adapter(adapter_name)
            if len(layer.shira_weight) == 0:
                parent, child = get_submodule_parent(self.model, name)
                setattr(parent, child, layer.base_layer)
        for name, module in list(self._saved_modules()):
            module.delete(adapter_name)
            if len(module.modules_to_save) == 0:
                parent, child = get_submodule_parent(self.model, name)
                setattr(parent, child, module.original_module)
        del self.peft_config[adapter_name]
        remaining = [a for a in self._active_adapters if a != adapter_name]
        self._active_adapters = remaining or list(self.peft_config)[:1]
        self._apply_active()

    @contextmanager
    def disable_adapter(self):
        """Base-model outputs inside; merges and active state are restored on exit."""
        layers = [layer for _, layer in self.shira_layers()]
        merged = {id(layer): list(layer.merged_adapters) for layer in layers}
        saved = [m for _, m in self._saved_modules()]
        try:
            for layer in layers:
                if layer.merged:
                    layer.unmerge()
                layer.enable_adapters(False)
            for m in saved:
                m.disabled = True
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
                if merged[id(layer)]:
                    layer.merge(adapter_names=merged[id(layer)])
            for m in saved:
                m.disabled = False

    def _hotswap(self, adapter_name: str, config: ShiraConfig, loaded, source: str) -> None:
        _check_hotswap(self, adapter_name, config, loaded, source)
        with torch.no_grad():
            for path, layer in self.shira_layers():
                if path in loaded.shira:
                    values, indices = loaded.shira[path]
                    layer.unfuse()
                    layer.shira_indices.pattern(adapter_name).copy_(indices.to(layer.shira_indices.pattern(
                        adapter_name).col.device), f"{path} adapter {adapter_name!r}")
                    layer.shira_weight[adapter_name].copy_(values.to(layer.shira_weight[adapter_name].dtype))
            for name, module in self._saved_modules():
                if adapter_name in module.modules_to_save:
                    module.modules_to_save[adapter_name].load_state_dict(loaded.saved[name], strict=True)
        self.peft_config[adapter_name] = config
        self._apply_active()

    # ---- combining adapters --------------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear", density: Optional[float] = None,
                             majority_sign_method: str = "total", seed: int = 0) -> None:
        """Add ``adapter_name``: the ``adapters`` combined with ``weights`` (PEFT's method, for
        SHiRA's sparse deltas; see :mod:`shira_dist.combine` for each ``combination_type``).

        Each layer's result lives on the union of the adapters' entries (minus those pruned by
        every adapter). It is an ordinary adapter, not active until ``set_adapter``: saved,
        loaded, merged and switched like any other. Every layer is given the same budget
        r' = the smallest r that holds its entries, the rest filled with zero-valued entries at
        the lowest free positions, so the result is a plain SHiRA adapter of rank budget r'
        and PEFT loads it too. ``seed`` drives DARE's random drops.
        """
        from .combine import COMBINATIONS, SIGN_METHODS, combine, pad_positions, union_layout

        names = self._check_adapters(adapters)
        if len(weights) != len(names) or not names:
            raise ValueError(f"weights has {len(weights)} entries for {len(names)} adapters; give one weight per adapter")
        if combination_type not in COMBINATIONS:
            raise ValueError(f"combination_type={combination_type!r} is invalid; allowed: {COMBINATIONS}")
        pruned = combination_type != "linear"
        if pruned and (density is None or not 0 < density <= 1):
            raise ValueError(f"combination_type={combination_type!r} needs density in (0, 1], got {density!r}")
        if majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"majority_sign_method={majority_sign_method!r} is invalid; allowed: {SIGN_METHODS}")
        saving = [n for n in names if self.peft_config[n].modules_to_save]
        if saving:
            raise ValueError(f"adapter(s) {saving} train modules_to_save copies, which have no sparse delta to "
                             "combine; combine adapters without modules_to_save")
        ckpt.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {list(self.peft_config)}")
        generator = torch.Generator().manual_seed(seed)
        combined: dict[str, tuple[Tensor, Tensor, tuple[int, int]]] = {}
        for path, layer in self.shira_layers():
            held = [n for n in names if n in layer.shira_weight]
            if not held:
                continue
            shape = (layer.out_features, layer.in_features)
            deltas = [(layer.shira_weight[n] * layer.scaling[n]).detach().cpu() for n in held]
            union, d = union_layout([layer.shira_indices[n].cpu() for n in held], deltas, shape)
            _, present = union_layout([layer.shira_indices[n].cpu() for n in held],
                                      [torch.ones(len(v)) for v in deltas], shape)
            w = torch.tensor([weights[names.index(n)] for n in held], dtype=torch.float32)
            values = combine(d, present.bool(), w, combination_type, density, majority_sign_method, generator)
            keep = values != 0 if pruned else torch.ones_like(values, dtype=torch.bool)
            combined[path] = (union[keep], values[keep], shape)
        r = max(1, max(-(-flat.numel() // sum(shape)) for flat, _, shape in combined.values()))
        indices, values_of = {}, {}
        for path, (flat, values, shape) in combined.items():
            need = r * sum(shape)
            pad = pad_positions(flat, shape[0] * shape[1], need - flat.numel())
            order = torch.argsort(torch.cat([flat, pad]))
            flat = torch.cat([flat, pad])[order]
            indices[path] = torch.stack([flat // shape[1], flat % shape[1]]).to(torch.int32)
            values_of[path] = torch.cat([values, torch.zeros(pad.numel())])[order]
        first = self.peft_config[names[0]]
        config = dataclasses.replace(first, r=r, target_modules=sorted(combined), modules_to_save=None,
                                     disjoint_from=None, init_weights=True, mask_fn=first.mask_fn)
        self._inject(adapter_name, config, indices=indices)
        with torch.no_grad():
            for path, layer in self.shira_layers():
                if path in values_of:
                    target = layer.shira_weight[adapter_name]
                    target.copy_(values_of[path].to(target.dtype))
        self._apply_active()

    # ---- merge / unload ----------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        names = self._check_adapters(adapter_names) if adapter_names is not None else self.active_adapters
        for _, layer in self.shira_layers():  # every layer checked before any is written
            layer.check_mergeable("merge")
        for _, layer in self.shira_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=[n for n in names if n in layer.shira_weight])

    def unmerge_adapter(self) -> None:
        for _, layer in self.shira_layers():
            if layer.merged:
                layer.unmerge()

    def switch_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Serve other adapters (one, or a set such as separately trained task adapters) from a
        merged model: each layer puts W0 back at the entries merged now and writes the new
        adapters' entries, nothing dense is computed or copied, and switching back gives the
        same weights bit for bit. The new adapters become the active ones, for inference."""
        names = self._check_adapters([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        layers = [layer for _, layer in self.shira_layers()]
        for layer in layers:  # every layer checked before any is written
            layer.check_mergeable("switch")
        with torch.no_grad():
            for layer in layers:
                layer.switch([n for n in names if n in layer.shira_weight])
        self._active_adapters = names
        self._apply_active(inference_mode=True)

    def _replace_wrappers(self) -> nn.Module:
        for name, layer in list(self.shira_layers()):
            layer.unfuse()
            parent, child = get_submodule_parent(self.model, name)
            setattr(parent, child, layer.base_layer)
        for name, module in list(self._saved_modules()):
            parent, child = get_submodule_parent(self.model, name)
            setattr(parent, child, module.current)
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge adapters into the weights and return the plain model (no SHiRA modules).
        ``progressbar`` is accepted for PEFT's signature; a scatter per layer needs none."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._replace_wrappers()

    def unload(self) -> nn.Module:
        """Return the untouched base model (merged adapters are unmerged first)."""
        self.unmerge_adapter()
        for _, module in self._saved_modules():
            module.disabled = True
        return self._replace_wrappers()

    # ---- parameters --------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        # full_numel: a ZeRO-3 partitioned parameter counts whole (its numel() is this rank's part).
        trainable = sum(full_numel(p) for p in self.parameters() if p.requires_grad)
        return trainable, sum(full_numel(p) for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ---- checkpoints -------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, Tensor]:
        """One adapter's tensors under PEFT's checkpoint keys."""
        return {key: t for key, _, t in self._adapter_entries(adapter_name)}

    def _adapter_entries(self, adapter_name: str) -> Iterator[tuple[str, Optional[str], Tensor]]:
        """(PEFT checkpoint key, the key in this module's state_dict or None for the indices,
        the live tensor: engines gather it) for each tensor of one adapter."""
        self._check_adapters([adapter_name])
        for name, layer in self.shira_layers():
            if adapter_name in layer.shira_weight:
                yield (f"{ckpt.KEY_PREFIX}{name}{ckpt.WEIGHT_SUFFIX}", f"model.{name}.shira_weight.{adapter_name}",
                       layer.shira_weight[adapter_name])
                yield (f"{ckpt.KEY_PREFIX}{name}{ckpt.INDICES_SUFFIX}", None,
                       layer.shira_indices[adapter_name].to(torch.int32))
        for name, module in self._saved_modules():
            if adapter_name in module.modules_to_save:
                for k, v in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    yield f"{ckpt.KEY_PREFIX}{name}.{k}", f"model.{name}.modules_to_save.{adapter_name}.{k}", v

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        safe_serialization: bool = True, state_dict: Optional[dict[str, Tensor]] = None) -> None:
        """Write each (selected) adapter in PEFT's format: "default" in ``save_directory``, the
        others in subfolders. ``state_dict``: this model's full state dict (an engine's gathered
        copy, keys as ``self.state_dict()``), to save its adapter tensors instead of the live ones
        (indices come from the model: they never change)."""
        names = self._check_adapters(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        for name in names:
            tensors = {key: t if own is None or state_dict is None else _entry_of(state_dict, own)
                       for key, own, t in self._adapter_entries(name)}
            ckpt.write_adapter(save_directory, name, tensors, self.peft_config[name], safe_serialization)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     allow_non_finite: bool = False, hotswap: bool = False,
                     key_mapping: Optional[dict[str, str]] = None, config: Optional[ShiraConfig] = None,
                     subfolder: Optional[str] = None) -> None:
        """Load a saved adapter (PEFT's format) as ``adapter_name``; not activated.

        All-or-nothing: the config, every tensor (finite values unless ``allow_non_finite``,
        integral indices, shapes) and the modules_to_save state are checked against the model
        before anything changes. Errors name the file. An adapter of that name already present
        (or ``hotswap=True``) is replaced in place (same layers and budget; its tensors keep
        their identity, so an optimizer or a compiled model over them stays valid), as a
        Trainer resuming from a checkpoint expects. ``key_mapping``: {regex: replacement}
        applied to the stored keys (a model whose module paths were renamed). ``config``: use
        this config instead of the saved one.
        """
        ckpt.check_adapter_name(adapter_name)
        directory = os.path.join(model_id, subfolder) if subfolder else model_id
        saved_config = config if config is not None else ShiraConfig.from_pretrained(directory)
        config = dataclasses.replace(saved_config, inference_mode=not is_trainable)
        source = ckpt.weights_path(directory)
        tensors = ckpt.read_adapter_tensors(directory)
        if key_mapping:
            tensors = {_map_key(k, key_mapping): v for k, v in tensors.items()}
        saved_paths = [n for n, _ in find_modules_to_save(self.model, config.modules_to_save)]
        loaded = ckpt.split_adapter_tensors(tensors, saved_paths, source, allow_non_finite=allow_non_finite)
        if hotswap or adapter_name in self.peft_config:
            self._hotswap(adapter_name, config, loaded, source)
            return
        try:
            plan = self._plan(adapter_name, config, indices={path: idx for path, (_, idx) in loaded.shira.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
        for name, module in plan.saved:
            _check_saved_state(module.original_module if isinstance(module, ModulesToSave) else module,
                               loaded.saved.get(name, {}), f"{source}: modules_to_save {name!r}")
        self._apply_plan(plan)
        with torch.no_grad():
            for name, layer in self.shira_layers():
                if name in loaded.shira:
                    values = layer.shira_weight[adapter_name]
                    values.copy_(loaded.shira[name][0].to(values.dtype))
            for name, module in self._saved_modules():
                if name in loaded.saved:
                    module.modules_to_save[adapter_name].load_state_dict(loaded.saved[name], strict=True)
        self._apply_active()


def _map_key(key: str, key_mapping: dict[str, str]) -> str:
    """The first matching pattern of ``key_mapping`` rewrites the key (transformers' convention)."""
    for pattern, replacement in key_mapping.items():
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


def _entry_of(state_dict: dict[str, Tensor], own_key: str) -> Tensor:
    """``own_key``'s tensor in ``state_dict``, whatever prefix an engine or a wrapper added
    (e.g. ``base_model.``)."""
    hits = [k for k in state_dict if k == own_key or k.endswith("." + own_key)]
    if len(hits) != 1:
        raise ValueError(f"state_dict has {len(hits)} entries for {own_key!r} (expected exactly one)")
    return state_dict[hits[0]]


def _check_hotswap(model: "ShiraModel", adapter_name: str, config: ShiraConfig, loaded, source: str) -> None:
    """The new adapter must sit exactly where the old one does, with the same budget."""
    model._check_adapters([adapter_name])
    held = {path: layer for path, layer in model.shira_layers() if adapter_name in layer.shira_weight}
    if set(loaded.shira) != set(held):
        raise ValueError(f"{source}: hotswap needs the same layers as adapter {adapter_name!r}; differs at "
                         f"{sorted(set(loaded.shira) ^ set(held))[:3]}")
    for path, layer in held.items():
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"{path}: adapter {adapter_name!r} is merged; unmerge it before hot-swapping")
        if loaded.shira[path][0].numel() != layer.shira_weight[adapter_name].numel():
            raise ValueError(f"{source}: {path} has {loaded.shira[path][0].numel()} entries, adapter "
                             f"{adapter_name!r} {layer.shira_weight[adapter_name].numel()}; hotswap needs the same budget")
    for name, module in model._saved_modules():
        if adapter_name in module.modules_to_save:
            _check_saved_state(module.original_module, loaded.saved.get(name, {}), f"{source}: modules_to_save {name!r}")


class _AdapterPlan:
    """A checked adapter, ready to add: (path, module, pattern) per target, modules_to_save."""

    def __init__(self, adapter_name: str, config: ShiraConfig, layers: list, saved: list) -> None:
        self.adapter_name, self.config, self.layers, self.saved = adapter_name, config, layers, saved


def _check_saved_state(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """A modules_to_save checkpoint must hold exactly the module's tensors, in its shapes."""
    # keep_vars: the parameters themselves, whose whole shape a ZeRO-3 partition still knows
    expected = {k: full_shape(v) for k, v in module.state_dict(keep_vars=True).items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected.keys() != got.keys():
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        raise ValueError(f"{where}: does not fit the model (missing {missing}, unexpected {extra})")
    for key, shape in expected.items():
        if got[key] != shape:
            raise ValueError(f"{where}: {key} has shape {got[key]}, the model's is {shape}")
