"""``compute.gradient_checkpointing``: one switch for both model paths.

The native models (:class:`lora_flwr.models.native.common.Checkpointable`) and
transformers' ``PreTrainedModel`` answer the same calls:
``activation_checkpointing_enable`` / ``_disable`` (transformers 5; 4.x names them
``gradient_checkpointing_enable`` / ``_disable``). Both then recompute each block's
activations in the backward pass with ``torch.utils.checkpoint`` and
``use_reentrant=False``: the reentrant variant gives no gradient to LoRA factors
behind a frozen base unless the block inputs require grad (what transformers'
``enable_input_require_grads`` hook patches over), the non-reentrant one does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_KWARGS = {"use_reentrant": False}


def supports_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` has a checkpointing switch this module can turn."""
    return _method(model, "enable") is not None


def is_checkpointing(model: nn.Module) -> bool:
    """Whether any block stack of ``model`` checkpoints now."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def set_checkpointing(model: nn.Module, enable: bool) -> None:
    """Turn ``model``'s gradient checkpointing on or off (nothing if already so).

    Idempotent on purpose: transformers' enable also installs an input hook
    (``enable_input_require_grads``) whose handle a second enable would lose.

    Raises
    ------
    ValueError
        When ``enable`` and the model has no checkpointing switch (a custom module).
    """
    if is_checkpointing(model) == enable:
        return
    if enable:
        found = _method(model, "enable")
        if found is None:
            raise ValueError(
                "`compute.gradient_checkpointing` needs a model with a checkpointing "
                f"switch (a native or transformers model); {type(model).__name__} "
                "has none"
            )
        prefix, switch = found
        switch(**{f"{prefix}_checkpointing_kwargs": dict(_KWARGS)})
        return
    found = _method(model, "disable")
    if found is not None:
        found[1]()
    remove_hook = getattr(model, "disable_input_require_grads", None)
    if remove_hook is not None:  # transformers' enable added it for reentrancy
        remove_hook()


def _method(model: nn.Module, verb: str) -> tuple[str, Callable[..., Any]] | None:
    """Return the model's ``<prefix>_checkpointing_<verb>``, the newer name first."""
    for prefix in ("activation", "gradient"):
        found = getattr(model, f"{prefix}_checkpointing_{verb}", None)
        if callable(found):
            return prefix, found
    return None
