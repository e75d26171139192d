"""Read a model's ``config.json`` and its safetensors weights, without transformers.

The weights come back memory-mapped: :func:`safetensors.safe_open` maps the file
and each tensor is a view of it, so a 0.5 GB checkpoint costs no read and no copy
until a page is touched, and the page cache is shared by every process that maps
the same file. The mapping is private (copy-on-write): writing into a base weight
(merging an adapter, folding a base delta) never changes the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

WEIGHTS_NAME = "model.safetensors"


def read_config(model_dir: Path) -> dict[str, Any]:
    """Return the parsed ``config.json`` of ``model_dir``.

    Raises
    ------
    RuntimeError
        If the file is missing or is not a JSON object; the message names the file.
    """
    path = model_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"Cannot read the model config {path}: {type(exc).__name__}: {exc}. "
            "Delete the model's cache directory to fetch it again."
        ) from exc
    if not isinstance(data, dict):
        raise RuntimeError(f"The model config {path} is not a JSON object")
    return data


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Memory-map every tensor of ``model_dir/model.safetensors``.

    Raises
    ------
    RuntimeError
        If the file is missing, truncated or not a safetensors file; the message
        names the file and says how to get a good one.
    """
    path = model_dir / WEIGHTS_NAME
    if not path.is_file():
        raise RuntimeError(
            f"The model weights {path} are missing. Delete {model_dir} to fetch the "
            "model again."
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise RuntimeError(
            f"Cannot read the model weights {path}: {type(exc).__name__}: {exc}. "
            f"The file is damaged or not a safetensors file; delete {model_dir} to "
            "fetch the model again."
        ) from exc


def assign_weights(
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    *,
    source: Path,
    new: Iterable[str] = (),
) -> list[str]:
    """Make the checkpoint's tensors ``model``'s parameters, without copying them.

    ``model`` is built on the ``meta`` device (nothing allocated, nothing drawn);
    every parameter must come from ``weights`` except those under a prefix in
    ``new`` (a new head), which stay on ``meta`` for the caller to initialise.
    Keys the model does not have (e.g. a pre-training head) are ignored.

    Returns
    -------
    list[str]
        The parameter names left for the caller (those under ``new``).

    Raises
    ------
    RuntimeError
        If a parameter is missing from the file or has another shape; the message
        names the tensor and the file.
    """
    prefixes = tuple(new)
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in weights and not k.startswith(prefixes)]
    if missing:
        raise RuntimeError(
            f"The model weights {source} lack {len(missing)} tensor(s) the model "
            f"needs, e.g. {missing[:3]}; the file belongs to another model or is "
            "incomplete. Delete it to fetch the model again."
        )
    chosen: dict[str, torch.Tensor] = {}
    for key, param in expected.items():
        if key not in weights:
            continue
        tensor = weights[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise RuntimeError(
                f"The tensor {key!r} in {source} has shape {tuple(tensor.shape)} but "
                f"the model's config asks for {tuple(param.shape)}; the weights "
                "and config.json do not belong together."
            )
        chosen[key] = tensor
    model.load_state_dict(chosen, strict=False, assign=True)
    return [k for k in expected if k not in chosen]
