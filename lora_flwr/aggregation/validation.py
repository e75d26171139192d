"""Checks a client reply must pass before it may touch the global adapter."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lora_flwr.aggregation.base import NDArray


def check_update(
    arrays: Sequence[object],
    expected_shapes: Sequence[tuple[int, ...]],
    names: Sequence[str],
    *,
    reference: Sequence[NDArray] | None = None,
    max_update_norm: float = 0.0,
) -> None:
    """Raise ``ValueError`` describing the first fault of a client reply.

    Checks, in order: array count, then per array type, dtype (float32), shape and
    finiteness, then (when ``max_update_norm > 0``) the L2 norm of the whole update
    ``arrays - reference``.

    Parameters
    ----------
    arrays
        The reply's arrays.
    expected_shapes
        Shapes in the adapter's weight order.
    names
        Weight names in the same order, for the message.
    reference
        The global arrays the client started from (for the norm check).
    max_update_norm
        Largest accepted update norm; 0 turns the check off.
    """
    if len(arrays) != len(expected_shapes):
        raise ValueError(
            f"{len(arrays)} arrays but the adapter has {len(expected_shapes)}"
        )
    for name, array, shape in zip(names, arrays, expected_shapes, strict=True):
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{name}: not a numpy array ({type(array).__name__})")
        if array.dtype != np.float32:
            raise ValueError(f"{name}: dtype {array.dtype}, expected float32")
        if tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"{name}: shape {tuple(array.shape)}, expected {tuple(shape)}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: contains NaN or Inf")
    if max_update_norm > 0 and reference is not None:
        sq = 0.0
        for array, ref in zip(arrays, reference, strict=True):
            assert isinstance(array, np.ndarray)
            diff = array.astype(np.float64) - ref.astype(np.float64)
            sq += float(np.dot(diff.ravel(), diff.ravel()))
        norm = float(np.sqrt(sq))
        if norm > max_update_norm:
            raise ValueError(
                f"update norm {norm:.4g} exceeds "
                f"fed.max_update_norm={max_update_norm:g}"
            )
