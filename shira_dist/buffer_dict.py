"""A name -> tensor mapping stored as registered buffers (moves with ``.to()``)."""

from __future__ import annotations

from torch import Tensor, nn


class BufferDict(nn.Module):
    """Like ``nn.ParameterDict`` for buffers; ``persistent`` decides if ``state_dict()`` holds them."""

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self._persistent = persistent

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.register_buffer(key, value, persistent=self._persistent)

    def __getitem__(self, key: str) -> Tensor:
        return self._buffers[key]

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def items(self):
        return self._buffers.items()
