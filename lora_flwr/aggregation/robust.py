"""Defences against hostile clients (pure numpy).

Three independent tools, all applied by the strategy before or inside a rule:

* :func:`cap_counts`: a client's self-reported example count cannot exceed
  ``cap`` times the round's lower median count, so no single client can buy the
  aggregate by claiming ``num_examples = 10**9``;
* :func:`norm_bound` and :func:`clip_update`: an update ``u_k = x_k - x_k^0`` (its
  reply minus what it started from) whose norm exceeds ``factor`` times the
  round's lower median update norm is scaled back to that bound (or rejected);
* :func:`robust_mean`: coordinate-wise median or trimmed mean of the replies, in
  place of the weighted mean, for rules whose aggregate is a plain average
  (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates", ICML 2018).

The lower median (the ``ceil(K/2)``-th smallest value) is used so that with two
clients the honest one sets the bound, and with ``K >= 3`` one client cannot move it
past an honest value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from lora_flwr.validation import update_norm

F64 = npt.NDArray[np.float64]
RobustMode = Literal["none", "median", "trimmed_mean"]


def lower_median(values: Sequence[float]) -> float:
    """Return the ``ceil(K/2)``-th smallest of ``values`` (K >= 1).

    Raises
    ------
    ValueError
        If ``values`` is empty.
    """
    if not values:
        raise ValueError("lower_median of no values")
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


def cap_counts(counts: Sequence[int], cap: float) -> list[int]:
    """Cap each example count at ``cap`` times the lower median count.

    ``n_k' = min(n_k, floor(cap * median_lo(n)))``; ``cap = 0`` returns the counts
    unchanged.

    Raises
    ------
    ValueError
        If ``cap`` is in (0, 1) or negative, or a count is not positive.
    """
    if cap == 0:
        return list(counts)
    if not cap >= 1:
        raise ValueError(f"`cap` should be 0 (off) or >= 1 but is {cap}")
    if any(n <= 0 for n in counts):
        raise ValueError(f"example counts must be > 0, got {list(counts)}")
    if not counts:
        return []
    limit = max(1, math.floor(cap * lower_median([float(n) for n in counts])))
    return [min(int(n), limit) for n in counts]


def norm_bound(norms: Sequence[float], factor: float) -> float:
    """Return ``factor * median_lo(norms)``, the largest update norm accepted.

    Raises
    ------
    ValueError
        If ``factor < 1`` or ``norms`` is empty.
    """
    if not factor >= 1:
        raise ValueError(f"`factor` should be >= 1 but is {factor}")
    return factor * lower_median(norms)


def clip_update(
    arrays: Mapping[str, npt.NDArray[np.floating]],
    start: Mapping[str, npt.NDArray[np.floating]],
    bound: float,
) -> dict[str, npt.NDArray[np.floating]]:
    """Scale the update so its norm is at most ``bound``: ``x^0 + u * bound/||u||``.

    The update is taken over the names ``start`` holds (as :func:`update_norm`
    measures it); other arrays pass unchanged. Arrays keep their dtype; an update
    already inside the bound is returned as is.
    """
    norm = update_norm(arrays, start)
    if norm <= bound or norm == 0:
        return dict(arrays)
    factor = bound / norm
    out: dict[str, npt.NDArray[np.floating]] = {}
    for name, value in arrays.items():
        if name not in start:
            out[name] = value
            continue
        base = start[name].astype(np.float64)
        clipped = base + (value.astype(np.float64) - base) * factor
        out[name] = clipped.astype(value.dtype)
    return out


def robust_mean(values: Sequence[F64], mode: RobustMode, trim: float = 0.2) -> F64:
    """Coordinate-wise robust average of same-shaped arrays (unweighted).

    ``median``: the median of each coordinate over the K replies.
    ``trimmed_mean``: drop the ``floor(trim * K)`` largest and smallest values of
    each coordinate and average the rest (``trim = 0`` is the plain mean).

    Raises
    ------
    ValueError
        On no values, different shapes, an unknown mode, or ``trim`` outside
        [0, 0.5).
    """
    if not values:
        raise ValueError("robust_mean of no arrays")
    shapes = {v.shape for v in values}
    if len(shapes) != 1:
        raise ValueError(f"robust_mean needs one shape, got {sorted(shapes)}")
    stack = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    if mode == "median":
        result: F64 = np.median(stack, axis=0)
        return result
    if mode == "trimmed_mean":
        if not 0 <= trim < 0.5:
            raise ValueError(f"`trim` should be in [0, 0.5) but is {trim}")
        k = math.floor(trim * len(values))
        ordered = np.sort(stack, axis=0)
        kept = ordered[k : len(values) - k]
        mean: F64 = kept.mean(axis=0)
        return mean
    raise ValueError(f"robust mode should be 'median' or 'trimmed_mean', got {mode!r}")
