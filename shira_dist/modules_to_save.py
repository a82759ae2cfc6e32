"""Full trainable copies of chosen modules (e.g. a classifier head), one per adapter."""

from __future__ import annotations

from typing import Optional

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

    def forward(self, *args, **kwargs):
        return self.current(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.current, name)
