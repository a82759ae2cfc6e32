"""The SHiRA linear layer: a frozen nn.Linear plus sparse trainable entries of its weight.

    x ──► base_layer (W0, frozen; its hooks fire) ───────────────┐
    │                                                             (+) ──► y
    └──► Σ_active  x @ (scale_a · S_a)^T   (sparse, no dense S) ──┘

    S_a: (out, in) with r*(in+out) non-zeros at shira_indices[a], values shira_weight[a]

Every forward computes ``base(x) + Σ s·x·Sᵀ`` from the values as they are now, whoever
changed them and however. Two ways, same result (``set_fuse_mode``):
  unfused  the picture above: the base forward plus a CSR sparse product per adapter (with
           autograd off, the kernel adds into the base output in place).
  fused    with autograd on, the weight this layer wrapped is re-written in place to
           W0 + Σ deltas (from the saved W0 entries and the current values: one scatter of
           the nnz entries per forward), the base layer runs on it, and the backward adds only
           the values' SDDMM. The default ("auto") for plain fp32/fp64 weights. Any other
           weight (quantized, sharded, gathered per forward by an engine, tied) runs unfused,
           and so does every forward without autograd: the weight holds W0 again before it.

Under ``torch.compile`` every kernel is one custom op (kernels/ops.py), so the forward and
backward trace without graph breaks and give the eager results. "auto" runs unfused there:
the first fused forward keeps W0's entries as Python state, a side effect that compiled
activation checkpointing refuses. "fused" compiles too (the write is an op that mutates the
weight), except inside activation checkpointing, where dynamo runs those layers eagerly.

Merging writes ``W0[idx] + scale·values`` into a plain weight at the indices only and keeps
``W0[idx]``, so unmerging restores the weight bit-exactly. Values are parameters and
patterns buffers, so ``state_dict()`` and ``.to()`` see them; ``state_dict()`` reports the
base weight as W0 even mid-training.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .fused import Adapter, WrittenDeltas
from .kernels import fused_values_grad, sparse_delta_add_, sparse_delta_matmul
from .masks import shira_budget
from .partitioned import used_by
from .patterns import PatternDict, SparsePattern, make_pattern

FUSE_MODES = ("auto", "fused", "unfused")
# "auto" fuses fp32/fp64 weights only: a half-precision weight would round small deltas away.
_FUSE_DTYPES = (torch.float32, torch.float64)


def _plain(w: Tensor) -> bool:
    """A torch.Tensor/nn.Parameter itself, not a subclass (quantized, DTensor, Int8Params ...)."""
    return type(w) in (Tensor, nn.Parameter)


def _weight_ref(w: Tensor):
    """A weak reference to a plain weight, the only kind a forward fuses into. None for any
    other: torch converts a tensor subclass (``.to()``) by swapping it in place, which it
    refuses while a weak reference to it exists."""
    return weakref.ref(w) if _plain(w) else lambda: None


class ShiraLinear(nn.Module):
    """SHiRA adapter around an ``nn.Linear`` (PEFT's ``peft.tuners.shira.Linear``).

    Args:
        base_layer: the frozen linear layer, weight (out, in).
        mask: (out, in) 0/1 dense or sparse-COO mask with r*(in+out) ones, or None when
            ``indices`` or ``csr`` is given.
        adapter_name: name of the first adapter.
        r: budget factor.
        fan_in_fan_out: must be False for nn.Linear (kept for PEFT's signature).
        init_weights: zeros (True) or randn (False) initial values.
        indices: (2, nnz) int stored pattern (PEFT's form, e.g. from a checkpoint).
        layer_name: module path, used in error messages.
        csr: (crow (out+1,), col (nnz,)) from shira_dist's own sampler (see make_pattern).
    """

    def __init__(self, base_layer: nn.Linear, mask: Optional[Tensor] = None, adapter_name: str = "default",
                 r: int = 0, fan_in_fan_out: bool = False, init_weights: bool = True,
                 indices: Optional[Tensor] = None, layer_name: str = "",
                 csr: Optional[tuple[Tensor, Tensor]] = None, pattern: Optional[SparsePattern] = None) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{layer_name or 'target'}: {type(base_layer).__name__} is not supported; "
                            "SHiRA supports torch.nn.Linear only")
        if fan_in_fan_out:
            warnings.warn(f"{layer_name}: fan_in_fan_out=True does not apply to torch.nn.Linear; using False")
        self.base_layer = base_layer
        self.layer_name = layer_name or type(base_layer).__name__
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.fan_in_fan_out = False
        self.shira_weight = nn.ParameterDict()
        self.shira_indices = PatternDict(self.layer_name)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self._active_adapters: list[str] = [adapter_name]
        self._disable_adapters = False
        self.fuse_mode = "auto"  # see set_fuse_mode
        self.fusable = True  # False when the weight is shared (tied) with another module
        self._merged = WrittenDeltas()  # what merge() wrote, until unmerge()
        self._fused = WrittenDeltas()  # what the last fused forward wrote
        self._weight = _weight_ref(base_layer.weight)  # the only tensor a fused forward writes into
        self._register_state_dict_hook(_report_unfused_weight)
        self._register_load_state_dict_pre_hook(_unfuse_before_load, with_module=True)
        self.update_layer(adapter_name, mask, r, init_weights=init_weights, indices=indices, csr=csr, pattern=pattern)

    # ---- adapters -------------------------------------------------------------------
    def update_layer(self, adapter_name: str, mask: Optional[Tensor], r: int, init_weights: bool = True,
                     indices: Optional[Tensor] = None, csr: Optional[tuple[Tensor, Tensor]] = None,
                     pattern: Optional[SparsePattern] = None) -> None:
        """Add adapter ``adapter_name`` with the pattern of ``mask`` (or ``indices``, ``csr``, or
        a ``pattern`` already made by :func:`~shira_dist.patterns.make_pattern`)."""
        shape = (self.out_features, self.in_features)
        nnz = shira_budget(*shape, r, where=self.layer_name)
        where = f"{self.layer_name} {shape} adapter {adapter_name!r}"
        if pattern is None:
            pattern = make_pattern(shape, nnz, where, mask=mask, indices=indices, csr=csr)
        elif pattern.shape != shape or pattern.nnz != nnz or any(t is not None for t in (mask, indices, csr)):
            raise ValueError(f"{where}: a {pattern.shape} pattern of {pattern.nnz} entries given (alone) for "
                             f"nnz={nnz}")
        weight = self.base_layer.weight
        device = weight.device if weight.device.type != "meta" else pattern.col.device
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        init = torch.zeros(nnz, dtype=dtype, device=device) if init_weights else torch.randn(nnz, device=device).to(dtype)
        self.shira_weight[adapter_name] = nn.Parameter(init, requires_grad=adapter_name in self._active_adapters)
        self.shira_indices[adapter_name] = pattern.to(device)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = 1.0

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"{self.layer_name}: adapter {adapter_name!r} is merged; unmerge it before deleting")
        self.unfuse()
        del self.shira_weight[adapter_name]
        del self.shira_indices[adapter_name]
        self.r.pop(adapter_name, None)
        self.scaling.pop(adapter_name, None)
        self._active_adapters = [a for a in self._active_adapters if a != adapter_name]

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.shira_weight:
            raise KeyError(f"{self.layer_name}: unknown adapter {adapter_name!r}; have {list(self.shira_weight)}")

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str:
        return self._active_adapters[0]

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        """Activate adapters present in this layer; active ones train (unless ``inference_mode``),
        others freeze."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapters = names
        for name, p in self.shira_weight.items():
            p.requires_grad_(not inference_mode and name in names)

    def get_base_layer(self) -> nn.Linear:
        """The wrapped ``nn.Linear`` (PEFT's ``BaseTunerLayer.get_base_layer``)."""
        return self.base_layer

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Disabling unmerges merged adapters first (the disabled forward is the base layer's)."""
        if not enabled and self.merged:
            self.unmerge()
        self._disable_adapters = not enabled

    def set_scale(self, adapter: str, scale: float) -> None:
        self._check_known(adapter)
        if adapter in self.merged_adapters:
            raise ValueError(f"{self.layer_name}: adapter {adapter!r} is merged; unmerge before changing its scale")
        self.scaling[adapter] = float(scale)

    def _adapter(self, name: str) -> Adapter:
        """(name, layout, values, scale): what the kernels take for one adapter."""
        return name, self.shira_indices.pattern(name).layout(), self.shira_weight[name], self.scaling[name]

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The adapter's scaled delta as a coalesced sparse COO tensor (out, in), nnz = r*(in+out)."""
        self._check_known(adapter)
        idx = self.shira_indices[adapter].long()
        vals = self.shira_weight[adapter] * self.scaling[adapter]
        return torch.sparse_coo_tensor(idx, vals, (self.out_features, self.in_features)).coalesce()

    # ---- forward ----------------------------------------------------------------------
    def forward(self, x: Tensor, adapter_names: Optional[list[str]] = None) -> Tensor:
        """x: (B, ..., in) -> (B, ..., out). ``adapter_names`` (B,): each row's adapter instead
        of the active ones ("__base__": none); ShiraModel passes it for ``adapter_names=``."""
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        active = [] if self._disable_adapters else [
            n for n in self._active_adapters if n in self.shira_weight and n not in self.merged_adapters]
        with used_by(self, [self.shira_weight[n] for n in active]):  # ZeRO-3: gathered with this layer
            return self._forward(x, [self._adapter(n) for n in active])

    def _mixed_batch_forward(self, x: Tensor, adapter_names: list[str]) -> Tensor:
        """One batch, each row with its own adapter: the base forward once, then each adapter's
        sparse product on its rows only."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"{self.layer_name}: adapter_names has {len(adapter_names)} entries for a batch of "
                             f"{x.shape[0]} rows; give one name per row")
        if self.merged:
            raise ValueError(f"{self.layer_name}: cannot run adapter_names with merged adapters "
                             f"{self.merged_adapters}; unmerge first")
        self.unfuse()
        y = self.base_layer(x)
        names = [n for n in dict.fromkeys(adapter_names) if n in self.shira_weight]
        with used_by(self, [self.shira_weight[n] for n in names]):
            for name in names:
                rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
                _, layout, values, scale = self._adapter(name)
                delta = sparse_delta_matmul(x.index_select(0, rows), values, layout, scale).to(y.dtype)
                y = y.index_add(0, rows, delta)
        return y

    def _forward(self, x: Tensor, adapters: list[Adapter]) -> Tensor:
        if adapters and torch.is_grad_enabled() and self._fuses():
            self._fused.write(self.base_layer.weight.data, adapters)
            y = self.base_layer(x)
            for name, layout, values, scale in adapters:
                if values.requires_grad:
                    y = fused_values_grad(y, x, values, layout, scale)
            return y
        self.unfuse()
        y = self.base_layer(x)
        for name, layout, values, scale in adapters:
            if torch.is_grad_enabled() and (y.requires_grad or x.requires_grad or values.requires_grad):
                y = y + sparse_delta_matmul(x, values, layout, scale).to(y.dtype)
            else:  # inference: the kernel adds into the base layer's fresh output, no delta tensor
                y = sparse_delta_add_(y, x, values, layout, scale)
        return y

    # ---- fused mode ---------------------------------------------------------------------
    def set_fuse_mode(self, mode: str) -> None:
        """"auto" (fuse fp32/fp64 weights that can be; unfused when compiled), "fused" (fuse any
        float weight; error if it cannot be), "unfused" (never; restores W0 now)."""
        if mode not in FUSE_MODES:
            raise ValueError(f"fuse mode {mode!r} is invalid; allowed: {FUSE_MODES}")
        if mode == "fused":
            self._check_fusable()
        self.fuse_mode = mode
        if mode == "unfused":
            self.unfuse()

    def fuse_blocker(self) -> Optional[str]:
        """Why a forward cannot write into the base weight now, or None."""
        w = self.base_layer.weight
        if not self.fusable:
            return "its weight is shared with another module (tied weights)"
        if not _plain(w):
            return f"its weight is a {type(w).__name__} (quantized or sharded), not a plain tensor"
        if w is not self._weight():
            return ("its weight is not the parameter this layer wrapped (an engine such as FSDP replaced it, "
                    "e.g. with a copy gathered for this forward only)")
        if hasattr(w, "ds_id"):
            return "DeepSpeed ZeRO-3 manages its weight (gathered for each forward and freed after)"
        if tuple(w.shape) != (self.out_features, self.in_features):
            return f"its weight has shape {tuple(w.shape)} (partitioned)"
        if not w.dtype.is_floating_point or w.device.type == "meta":
            return f"its weight is {w.dtype} on {w.device.type}, not a writable float tensor"
        return None

    def _check_fusable(self) -> None:
        blocker = self.fuse_blocker()
        if blocker is not None:
            error = TypeError if not _plain(self.base_layer.weight) else ValueError
            raise error(f"{self.layer_name}: cannot run fused: {blocker}; use fuse mode 'auto' or 'unfused' "
                        "(base forward plus the sparse product)")

    def _fuses(self) -> bool:
        if self.fuse_mode == "fused":
            self._check_fusable()
            return True
        w = self.base_layer.weight
        return (self.fuse_mode == "auto" and w.dtype in _FUSE_DTYPES and self.fuse_blocker() is None
                and not torch.compiler.is_compiling())  # see the module docstring

    @property
    def fused(self) -> bool:
        """True while the base weight holds the active adapters' deltas (after a fused forward)."""
        return bool(self._fused.entries)

    def unfuse(self) -> None:
        """Put W0 back at the fused entries (bit-exact); a no-op when nothing is fused."""
        if not self._fused.entries:
            return
        w = self.base_layer.weight
        if w is not self._weight() or not _plain(w) or tuple(w.shape) != (self.out_features, self.in_features):
            raise RuntimeError(
                f"{self.layer_name}: its base weight was replaced or re-partitioned ({type(w).__name__} "
                f"{tuple(w.shape)}) while it held the fused adapter (W0 + delta at the adapter's entries), so the "
                "new weight may carry the delta. Call model.unfuse() before handing a model that ran training "
                "forwards to something that copies its weights (FSDP, DeepSpeed, a quantizer); rebuild this one "
                "from its base model and the saved adapter")
        self._fused.restore(w.data)

    def _apply(self, fn, recurse: bool = True):
        self.unfuse()  # .to(), .half(), ...: move or convert W0, not a fused write
        out = super()._apply(fn, recurse)
        self._merged.convert(fn)
        return out

    def __getstate__(self) -> dict:  # copy.deepcopy, pickling: of W0 and the adapters, not a fused write
        self.unfuse()
        state = self.__dict__.copy()
        state.pop("_weight")  # a weakref: re-made for the copy's own weight
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._weight = _weight_ref(self.base_layer.weight)

    # ---- merge ------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        return self._merged.names

    @property
    def merged(self) -> bool:
        return bool(self._merged.entries)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write active (or named) adapters into the base weight at their indices only."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self.check_mergeable("merge")
        if self._disable_adapters:
            raise ValueError(f"{self.layer_name}: adapters are disabled; enable them before merging")
        self.unfuse()
        for name in names:
            if name not in self.shira_weight:
                if adapter_names is not None:
                    self._check_known(name)
            elif name in self.merged_adapters:
                warnings.warn(f"{self.layer_name}: adapter {name!r} is already merged; nothing to do")
            else:
                self._merged.add(self.base_layer.weight.data, self._adapter(name), check_finite=safe_merge)

    def unmerge(self) -> None:
        """Restore the base weight bit-exactly (last merged first)."""
        if not self.merged:
            warnings.warn(f"{self.layer_name}: already unmerged; nothing to do")
            return
        self.check_mergeable("unmerge")
        self.unfuse()
        self._merged.restore(self.base_layer.weight.data)

    def switch(self, adapter_names: list[str]) -> None:
        """Hold ``adapter_names`` merged instead of what is merged now: W0 back at the current
        entries, then each new delta written at its own (a scatter each; nothing dense)."""
        self.check_mergeable("switch")
        if self._disable_adapters:
            raise ValueError(f"{self.layer_name}: adapters are disabled; enable them before switching")
        self.unfuse()
        self._merged.restore(self.base_layer.weight.data)
        for name in adapter_names:
            self._merged.add(self.base_layer.weight.data, self._adapter(name))

    def check_mergeable(self, action: str) -> None:
        """Merging writes into the whole base weight: refuse anything but a plain, whole tensor."""
        w = self.base_layer.weight
        if hasattr(w, "ds_id"):
            raise RuntimeError(
                f"{self.layer_name}: cannot {action}: the base weight is a DeepSpeed ZeRO-3 partition (the model was "
                "built under deepspeed.zero.Init or wrapped by a ZeRO-3 engine), and merging writes whole weights; "
                "save the adapter (shira_dist.distributed.save_adapter) and merge it into a whole model in one process")
        if not _plain(w) or tuple(w.shape) != (self.out_features, self.in_features):
            raise TypeError(
                f"{self.layer_name}: cannot {action}: its base weight is a {type(w).__name__} of shape "
                f"{tuple(w.shape)} (quantized or sharded), not a plain ({self.out_features}, {self.in_features}) "
                "tensor. Keep the adapter unmerged (forwards run the quantized base plus the sparse product), or "
                "merge into a float copy of the base: load it unquantized, PeftModel.from_pretrained(base, "
                "adapter_dir), merge_and_unload(), then quantize the result")

    def extra_repr(self) -> str:
        return f"adapters={list(self.shira_weight)}, r={self.r}, active={self._active_adapters}, merged={self.merged_adapters}"


def _report_unfused_weight(module: ShiraLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict hook: a fused layer reports its base weight as W0 (the adapter is saved separately)."""
    key = prefix + "base_layer.weight"
    if module._fused.entries and key in state_dict:
        state_dict[key] = module._fused.unwritten_copy(module.base_layer.weight.data)


def _unfuse_before_load(module: ShiraLinear, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """load_state_dict pre-hook: loading a base weight replaces W0, so drop the fused write first."""
    module.unfuse()


ShiraLayer = ShiraLinear  # PEFT's layer name
