"""Model surgery shared by the adapter and its file formats (pure torch).

Finding target modules by PEFT's matching rule, swapping submodules, and merging
every LoRA layer of a model into its base weights, all or none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from lora_flwr.lora.layers import LoRALinear, is_conv1d


def matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's rule: a str is a full-match regex; a list matches ``x`` or ``*.x``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` / ``Conv1D`` module of ``model``."""
    return [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)
    ]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoRALinear` of ``model`` into its base layer, in place.

    Returns ``model`` with plain ``nn.Linear`` / ``Conv1D`` layers in place of the LoRA
    wrappers: the export a user deploys without this package.
    """
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    # Merge everything before replacing anything: a NaN in one layer then leaves the
    # model as it was instead of half unloaded.
    merge_all([layer for _, layer in wrapped])
    for name, layer in wrapped:
        layer._unmerged_weight = None  # the backup is no longer needed
        set_submodule(model, name, layer.base_layer)
    return model


def merge_all(layers: Sequence[LoRALinear]) -> None:
    """Merge every layer, or none: a failure unmerges the ones merged so far."""
    merged: list[LoRALinear] = []
    try:
        for layer in layers:
            if not layer.merged:
                layer.merge()
                merged.append(layer)
    except Exception:
        for layer in merged:
            layer.unmerge()
        raise
