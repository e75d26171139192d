"""What the native models share: their config object and their output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


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


def run_block(
    owner: nn.Module, block: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
) -> torch.Tensor:
    """Call ``block``; checkpointed when ``owner.gradient_checkpointing`` is on.

    Only while training with gradients, as transformers' ``GradientCheckpointingLayer``
    does: evaluation and ``no_grad`` run the block as is. Non-reentrant
    checkpointing (``use_reentrant=False``) needs no input that requires grad, so
    LoRA on a frozen base backpropagates through it; dropout masks are redrawn
    identically in the recompute (``preserve_rng_state``, the default).
    """
    if getattr(owner, "gradient_checkpointing", False) and owner.training:
        if torch.is_grad_enabled():
            out: torch.Tensor = checkpoint(block, *args, use_reentrant=False, **kwargs)
            return out
    return block(*args, **kwargs)


class Checkpointable(nn.Module):
    """transformers' activation-checkpointing switches, for the native models.

    The same names as ``PreTrainedModel``'s, so one caller serves both paths: each
    submodule with a ``gradient_checkpointing`` flag (the stack of blocks) then
    runs its blocks through :func:`run_block`.
    """

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Checkpoint every block while training (non-reentrant only)."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False) or kwargs:
            raise ValueError(
                "The native models checkpoint with use_reentrant=False and no other "
                f"option; got {activation_checkpointing_kwargs!r}"
            )
        self._set_checkpointing(True)

    def activation_checkpointing_disable(self) -> None:
        """Keep every block's activations again."""
        self._set_checkpointing(False)

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether a block stack checkpoints."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _set_checkpointing(self, enable: bool) -> None:
        found = False
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                # nn.Module types attribute assignment for tensors and modules.
                setattr(module, "gradient_checkpointing", enable)  # noqa: B010
                found = True
        assert found, "every native model has a block stack"
