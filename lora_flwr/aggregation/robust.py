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
  Rates", ICML 2018);
* :func:`cosine_outliers` and :func:`krum_outliers`: which whole updates to leave
  out of the round before any rule aggregates (a direction check against the
  other updates, and Multi-Krum's distance scores).

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
FilterMode = Literal["none", "cosine", "krum"]


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


def most_outliers(k: int) -> int:
    """How many of ``k`` updates a filter may remove: ``floor((k - 1) / 2)``.

    The filters assume an honest majority; removing more would let a hostile
    majority remove the honest clients instead.
    """
    return max(0, (k - 1) // 2)


def cosine_outliers(updates: Sequence[F64], min_cosine: float) -> list[int]:
    """Return the updates that point away from the others (indices, ascending).

    Update ``k`` scores the mean cosine to the other non-zero updates,
    ``s_k = mean_{j != k} <u_k, u_j> / (||u_k|| ||u_j||)``, and is an outlier when
    ``s_k < min_cosine``. At most :func:`most_outliers` ``(K)`` are returned, the
    lowest scores first; a zero update carries no direction and is neither scored
    nor compared with, and fewer than three non-zero updates give none (two cannot
    outvote each other). A direction check in the spirit of FLTrust (Cao et al.,
    "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping", NDSS
    2021), with the other clients standing in for FLTrust's server update: a
    sign-flipped update scores about minus the honest pairwise cosine, an honest
    one about plus it.

    Raises
    ------
    ValueError
        If the updates differ in shape.
    """
    stack = _stack(updates) if updates else np.zeros((0, 0))
    norms = np.linalg.norm(stack, axis=1)
    live = [k for k in range(len(updates)) if norms[k] > 0]
    if len(live) < 3:
        return []
    unit = stack[live] / norms[live, None]
    cos = unit @ unit.T
    scores = (cos.sum(axis=1) - np.diag(cos)) / (len(live) - 1)
    flagged = sorted(
        (float(s), k) for s, k in zip(scores, live, strict=True) if s < min_cosine
    )
    return sorted(k for _, k in flagged[: most_outliers(len(live))])


def krum_outliers(updates: Sequence[F64]) -> list[int]:
    """Return the ``f`` updates Multi-Krum scores worst (indices, ascending).

    With ``K`` updates and ``f =`` :func:`most_outliers` ``(K)``, the score of
    update ``k`` is ``sum ||u_k - u_j||^2`` over its ``max(1, K - f - 2)`` nearest
    other updates; the ``K - f`` lowest scores are kept (Blanchard et al.,
    "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
    NeurIPS 2017). Their guarantee needs ``K >= 2f + 3``; with fewer updates (3 or
    4 per round) this is a heuristic: the update farthest from its nearest
    neighbour goes. Ties keep the lower index. Fewer than three updates give none.

    Raises
    ------
    ValueError
        If the updates differ in shape.
    """
    k_all = len(updates)
    f = most_outliers(k_all)
    if k_all < 3 or f == 0:
        return []
    stack = _stack(updates)
    sq = np.sum(stack**2, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * stack @ stack.T, 0.0)
    neighbours = max(1, k_all - f - 2)
    scores = []
    for k in range(k_all):
        others = np.sort(np.delete(dist[k], k))
        scores.append((float(others[:neighbours].sum()), k))
    scores.sort()
    return sorted(k for _, k in scores[k_all - f :])


def _stack(updates: Sequence[F64]) -> F64:
    shapes = {u.shape for u in updates}
    if len(shapes) != 1:
        raise ValueError(f"updates must share one shape, got {sorted(shapes)}")
    return np.stack([np.asarray(u, dtype=np.float64).ravel() for u in updates])
