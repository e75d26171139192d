"""What the native models share: their config object and their output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class NativeConfig:
    """A model's ``config.json`` as attributes, like a ``transformers`` config.

    Holds every key of the file (``hidden_size``, ``pad_token_id``, ...) plus
    ``num_labels`` and ``name_or_path``, which the rest of the code reads and sets
    the way it does on a ``PretrainedConfig``. Attribute access is dynamic, as it
    is there, so unknown keys read as missing (``getattr(cfg, k, default)``).
    """

    def __init__(self, values: dict[str, Any], *, num_labels: int = 2) -> None:
        self.__dict__.update(values)
        self.num_labels = num_labels
        self.name_or_path: str = str(values.get("_name_or_path", ""))
        self.problem_type: str | None = None

    def __getattr__(self, name: str) -> Any:
        """Raise AttributeError naming the key (only called for missing ones)."""
        raise AttributeError(f"The model config has no key {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return every key and value."""
        return dict(self.__dict__)

    def require(self, key: str) -> Any:
        """Return ``key``, or raise a clear error if ``config.json`` lacks it."""
        if key not in self.__dict__:
            raise RuntimeError(
                f"The model's config.json has no {key!r}, which the native "
                f"{self.__dict__.get('model_type', '?')} implementation needs"
            )
        return self.__dict__[key]


@dataclass
class ModelOutput:
    """What a forward pass returns: the loss (when labels were given) and logits."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


def embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """Build an ``nn.Embedding``; on the ``meta`` device, without drawing weights.

    ``normal_`` on a meta tensor goes through a torch reference implementation
    that imports ``torch._dynamo`` (~3 s in a fresh process) for nothing: a
    checkpoint's weights replace it anyway.
    """
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        return nn.Embedding(num, dim, padding_idx=padding_idx)
    return nn.Embedding(num, dim, padding_idx=padding_idx, _weight=weight)
