"""Full trainable copies of chosen modules (e.g. a classifier head), one per adapter."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .partitioned import plain_copy


class ModulesToSave(nn.Module):
    """Wraps ``original_module``; the active adapter's copy in ``modules_to_save`` runs instead.

    State dict keys mirror PEFT's wrapper: ``original_module.*`` and ``modules_to_save.<adapter>.*``.
    """

    def __init__(self, original_module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = adapter_name
        self.disabled = False
        self.add(adapter_name)

    def add(self, adapter_name: str, trainable: bool = False) -> None:
        clone = plain_copy(self.original_module)  # a deepcopy, gathered first if ZeRO-3 partitioned
        clone.requires_grad_(trainable)
        self.modules_to_save[adapter_name] = clone

    def set_adapter(self, adapter_names: list[str], trainable: bool = True) -> None:
        present = [a for a in adapter_names if a in self.modules_to_save]
        self.active_adapter = present[0] if present else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name == self.active_adapter)

    def delete(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    @property
    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        if adapter_names is None:
            return self.current(*args, **kwargs)
        return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)

    def _mixed_batch_forward(self, x, *args, adapter_names: list[str], **kwargs):
        """Each row of ``x`` (B, ...) through its adapter's copy ("__base__" or an adapter without
        a copy: the original module), reassembled in row order."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows")
        out = None
        for name in dict.fromkeys(adapter_names):
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            part = module(x.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.current, name)
