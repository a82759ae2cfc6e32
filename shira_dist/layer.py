"""The SHiRA linear layer: a frozen nn.Linear plus sparse trainable entries of its weight.

    x ──► base_layer (W0, frozen; its hooks fire) ───────────────┐
    │                                                             (+) ──► y
    └──► Σ_active  x @ (scale_a · S_a)^T   (sparse, no dense S) ──┘

    S_a: (out, in) with r*(in+out) non-zeros at shira_indices[a], values shira_weight[a]

Two execution modes give the same results (see ``set_fuse_mode``):
  unfused  the picture above: base forward plus a CSR sparse matmul per adapter (with
           autograd off, e.g. inference, the kernel adds into the base output in place).
  fused    the base weight holds W0 + Σ deltas in place (re-written from the saved W0
           entries after each optimizer step), so the forward is exactly the base layer's;
           backward adds only the values' SDDMM. The default ("auto") for fp32/fp64
           weights that are plain, unshared tensors.

Merging writes ``W0[idx] + scale·values`` into the base weight at the indices only and
keeps ``W0[idx]``, so unmerging restores the weight bit-exactly. State is registered:
values are parameters, patterns are buffers (CSR, 2 bytes per entry; read and saved as
PEFT's (2, nnz) indices, see patterns.py; ZeRO-3 and FSDP2 make the column indices frozen
parameters so they are sharded too), so ``state_dict()`` and ``.to()`` see them.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .buffer_dict import BufferDict
from .fused import FusedDelta
from .kernels import (
    CsrLayout,
    fused_values_grad,
    scatter_merge_,
    scatter_restore_,
    sparse_delta_add_,
    sparse_delta_matmul,
)
from .masks import mask_to_indices, shira_budget, validate_indices
from .partitioned import is_partitioned
from .patterns import PatternDict

FUSE_MODES = ("auto", "fused", "unfused")
# "auto" fuses fp32/fp64 weights only: a half-precision weight would round small deltas away.
_FUSE_DTYPES = (torch.float32, torch.float64)


class ShiraLinear(nn.Module):
    """SHiRA adapter around an ``nn.Linear`` (PEFT's ``peft.tuners.shira.Linear``).

    Args:
        base_layer: the frozen linear layer, weight (out, in).
        mask: (out, in) 0/1 dense or sparse-COO mask with r*(in+out) ones, or None when
            ``indices`` is given (e.g. when loading a checkpoint).
        adapter_name: name of the first adapter.
        r: budget factor.
        fan_in_fan_out: must be False for nn.Linear (kept for PEFT's signature).
        init_weights: zeros (True) or randn (False) initial values.
        indices: (2, nnz) int stored pattern, instead of ``mask``.
        layer_name: module path, used in error messages.
        csr: (crow (out+1,), col (nnz,)) of a pattern made by shira_dist itself (the built-in
            random mask, :func:`shira_dist.masks.random_csr`), instead of ``mask``: row-major
            and distinct by construction, so stored without a mask tensor or re-validation.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        mask: Optional[Tensor],
        adapter_name: str,
        r: int = 0,
        fan_in_fan_out: bool = False,
        init_weights: bool = True,
        indices: Optional[Tensor] = None,
        layer_name: str = "",
        csr: Optional[tuple[Tensor, Tensor]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"{layer_name or 'target'}: {type(base_layer).__name__} is not supported; "
                "SHiRA supports torch.nn.Linear only"
            )
        if fan_in_fan_out:
            warnings.warn(f"{layer_name}: fan_in_fan_out=True does not apply to torch.nn.Linear; using False")
        self.base_layer = base_layer
        self.layer_name = layer_name or type(base_layer).__name__
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.fan_in_fan_out = False
        self.shira_weight = nn.ParameterDict()
        self.shira_indices = PatternDict((self.out_features, self.in_features), self.layer_name)
        self._merged_originals = BufferDict(persistent=False)  # W0[idx] of merged adapters
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self._active_adapters: list[str] = [adapter_name]
        self._disable_adapters = False
        self._layouts: dict[str, tuple[tuple, CsrLayout]] = {}
        self.fuse_mode = "auto"  # see set_fuse_mode
        self.fusable = True  # False when the weight is shared (tied) with another module
        self._fused = FusedDelta()
        self._register_state_dict_hook(_report_unfused_weight)
        self._register_load_state_dict_pre_hook(_unfuse_before_load, with_module=True)
        self.update_layer(adapter_name, mask, r, init_weights=init_weights, indices=indices, csr=csr)

    # ---- adapters -------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        mask: Optional[Tensor],
        r: int,
        init_weights: bool = True,
        indices: Optional[Tensor] = None,
        csr: Optional[tuple[Tensor, Tensor]] = None,
    ) -> None:
        """Add adapter ``adapter_name`` with the pattern of ``mask`` (or stored ``indices``, or
        ``csr`` from shira_dist's own mask: see the class docstring)."""
        where = f"{self.layer_name} ({self.out_features}x{self.in_features})"
        nnz = shira_budget(self.out_features, self.in_features, r, where=self.layer_name)
        weight = self.base_layer.weight
        shape = (self.out_features, self.in_features)
        if sum(x is not None for x in (mask, indices, csr)) != 1:
            raise ValueError(f"{where}: give exactly one of mask, indices or csr for adapter {adapter_name!r}")
        if csr is not None:
            if csr[1].shape != (nnz,):
                raise ValueError(f"{where}: adapter {adapter_name!r} has a csr pattern of {tuple(csr[1].shape)} "
                                 f"columns, expected ({nnz},) = r*(in+out) for r={r}")
            idx = None
        elif mask is not None:
            idx = mask_to_indices(mask, shape, nnz, where)
        else:
            validate_indices(indices, shape, where)
            if indices.shape[1] != nnz:
                raise ValueError(f"{where}: adapter {adapter_name!r} has {indices.shape[1]} indices, "
                                 f"expected r*(in+out)={nnz} for r={r}")
            idx = indices.to(torch.int32)
        given = idx if idx is not None else csr[1]
        device = weight.device if weight.device.type != "meta" else given.device
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        init = torch.zeros(nnz, dtype=dtype, device=device) if init_weights else torch.randn(nnz, device=device).to(dtype)
        self.shira_weight[adapter_name] = nn.Parameter(init, requires_grad=adapter_name in self._active_adapters)
        if idx is not None:
            self.shira_indices[adapter_name] = idx.to(device)
        else:
            self.shira_indices.set_csr(adapter_name, csr[0].to(device), csr[1].to(device))
        self.r[adapter_name] = r
        self.scaling[adapter_name] = 1.0
        self._layouts.pop(adapter_name, None)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"{self.layer_name}: adapter {adapter_name!r} is merged; unmerge it before deleting")
        self.unfuse()
        del self.shira_weight[adapter_name]
        del self.shira_indices[adapter_name]
        for d in (self.r, self.scaling, self._layouts):
            d.pop(adapter_name, None)
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

    def set_adapter(self, adapter_names: str | Iterable[str], trainable: bool = True) -> None:
        """Activate adapters present in this layer; active ones train (if ``trainable``), others freeze."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapters = names
        for name, p in self.shira_weight.items():
            p.requires_grad_(trainable and name in names)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def set_scale(self, adapter: str, scale: float) -> None:
        self._check_known(adapter)
        if adapter in self.merged_adapters:
            raise ValueError(f"{self.layer_name}: adapter {adapter!r} is merged; unmerge before changing its scale")
        self.scaling[adapter] = float(scale)

    # ---- math -------------------------------------------------------------------------
    def _layout(self, adapter: str) -> CsrLayout:
        """The kernels' view of the stored pattern (rebuilt only when the buffers change)."""
        pattern = self.shira_indices.pattern(adapter)
        key = pattern.stamp()
        cached = self._layouts.get(adapter)
        if cached is None or cached[0] != key:
            cached = (key, pattern.layout())
            self._layouts[adapter] = cached
        return cached[1]

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The adapter's scaled delta as a coalesced sparse COO tensor (out, in), nnz = r*(in+out)."""
        self._check_known(adapter)
        idx = self.shira_indices[adapter].long()
        vals = self.shira_weight[adapter] * self.scaling[adapter]
        return torch.sparse_coo_tensor(idx, vals, (self.out_features, self.in_features)).coalesce()

    # ---- fused mode ---------------------------------------------------------------------
    def set_fuse_mode(self, mode: str) -> None:
        """"auto" (fuse when safe, see ``fuse_blocker``), "fused" (always; error if unsafe), "unfused"."""
        if mode not in FUSE_MODES:
            raise ValueError(f"fuse mode {mode!r} is invalid; allowed: {FUSE_MODES}")
        self.fuse_mode = mode

    def fuse_blocker(self) -> Optional[str]:
        """Why this layer cannot run fused, or None."""
        w = self.base_layer.weight
        if not self.fusable:
            return "its weight is shared with another module (tied weights)"
        if hasattr(w, "ds_id"):
            return "its weight is managed by DeepSpeed ZeRO (partitioned or updated in flat buffers)"
        if type(w) not in (torch.Tensor, nn.Parameter):
            return f"its weight is a {type(w).__name__} (sharded or quantized), not a plain tensor"
        if tuple(w.shape) != (self.out_features, self.in_features):
            return f"its weight has shape {tuple(w.shape)} (partitioned, e.g. DeepSpeed ZeRO-3)"
        if not w.dtype.is_floating_point or w.device.type == "meta":
            return f"its weight is {w.dtype} on {w.device.type}, not a writable float tensor"
        if self.merged:
            return "adapters are merged into the weight"
        return None

    @property
    def fused(self) -> bool:
        """True while the base weight holds the active adapters' deltas (fused mode)."""
        return self._fused.active

    def _use_fused(self, active: list[str]) -> bool:
        if self.fuse_mode == "unfused" or not active:
            return False
        blocker = self.fuse_blocker()
        if blocker is not None:
            if self.fuse_mode == "fused":
                raise RuntimeError(f"{self.layer_name}: fuse mode 'fused' but the layer cannot fuse: {blocker}")
            return False
        return self.fuse_mode == "fused" or self.base_layer.weight.dtype in _FUSE_DTYPES

    def unfuse(self) -> None:
        """Put W0 back at the fused indices (bit-exact); the next fused forward re-writes them."""
        if self._fused.active:
            self._fused.restore(self.base_layer.weight.data, self._layout)

    def forward(self, x: Tensor) -> Tensor:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            self.unfuse()
            return self.base_layer(x)
        active = [n for n in self._active_adapters if n in self.shira_weight and n not in self.merged_adapters]
        if self._use_fused(active):
            if not self._fused.is_current(active, self.shira_weight, self.scaling):
                self._fused.write(self.base_layer.weight.data, active, self._layout, self.shira_weight,
                                  self.scaling)
            y = self.base_layer(x)
            if torch.is_grad_enabled():
                for name in active:
                    if self.shira_weight[name].requires_grad:
                        y = fused_values_grad(y, x, self.shira_weight[name], self._layout(name), self.scaling[name])
            return y
        self.unfuse()
        y = self.base_layer(x)
        for name in active:
            # whole(): under FSDP2 this adapter's columns are gathered for this product only (and
            # again by the kernel for its backward); a no-op elsewhere
            with self.shira_indices.pattern(name).whole():
                values, layout, scale = self.shira_weight[name], self._layout(name), self.scaling[name]
                if torch.is_grad_enabled() and (y.requires_grad or x.requires_grad or values.requires_grad):
                    y = y + sparse_delta_matmul(x, values, layout, scale).to(y.dtype)
                else:  # inference: the kernel adds into the base layer's fresh output, no delta tensor
                    y = sparse_delta_add_(y, x, values, layout, scale)
        return y

    # ---- merge ------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write active (or named) adapters into the base weight at their indices only."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self._check_whole_weight("merge")
        self.unfuse()
        for name in names:
            if name not in self.shira_weight:
                if adapter_names is not None:
                    self._check_known(name)
                continue
            if name in self.merged_adapters:
                warnings.warn(f"{self.layer_name}: adapter {name!r} is already merged; nothing to do")
                continue
            originals = scatter_merge_(
                self.base_layer.weight.data, self._layout(name), self.shira_weight[name],
                self.scaling[name], check_finite=safe_merge,
            )
            self._merged_originals[name] = originals
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base weight bit-exactly (last merged first)."""
        if not self.merged:
            warnings.warn(f"{self.layer_name}: already unmerged; nothing to do")
            return
        self._check_whole_weight("unmerge")
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            scatter_restore_(self.base_layer.weight.data, self._layout(name), self._merged_originals[name])
            del self._merged_originals[name]

    def _check_whole_weight(self, action: str) -> None:
        if is_partitioned(self.base_layer.weight):
            raise RuntimeError(
                f"{self.layer_name}: cannot {action}: the base weight is a DeepSpeed ZeRO-3 partition (the model was "
                "built under deepspeed.zero.Init or wrapped by a ZeRO-3 engine), and merging writes whole weights; "
                "save the adapter (shira_dist.distributed.save_adapter) and merge it into a whole model in one process")

    def extra_repr(self) -> str:
        return f"adapters={list(self.shira_weight)}, r={self.r}, active={self._active_adapters}, merged={self.merged_adapters}"


def _report_unfused_weight(module: ShiraLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict hook: a fused layer reports its base weight as W0 (the adapter is saved separately)."""
    if module._fused.active:
        key = prefix + "base_layer.weight"
        if key in state_dict:
            state_dict[key] = module._fused.unfused_copy(module.base_layer.weight.data, module._layout)


def _unfuse_before_load(module: ShiraLinear, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """load_state_dict pre-hook: loading a base weight replaces W0, so drop the fused write first."""
    module.unfuse()


ShiraLayer = ShiraLinear  # PEFT's layer name
