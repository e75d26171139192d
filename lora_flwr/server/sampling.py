"""Seeded client sampling and rank-tier assignment, by partition id (numpy only).

Flower's own sampler draws from an unseeded RNG over random node ids, so two runs
of one config train different clients from the first rounds on. Here the server
learns each node's partition id once and samples partitions with a generator
seeded by ``(seed, round, stream)``: the same config and seed give the same
clients in every round, whatever order nodes registered in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FIT_STREAM = 0
EVALUATE_STREAM = 1
_TIER_STREAM = 7


def sample_count(available: int, fraction: float, minimum: int) -> int:
    """Count the clients a round takes: ``ceil(fraction * available)``, bounded.

    At least ``minimum`` and at most ``available``.
    """
    return min(available, max(math.ceil(fraction * available), minimum))


def sample_partitions(
    partitions: Sequence[int], num: int, *, seed: int, server_round: int, stream: int
) -> list[int]:
    """Draw ``num`` distinct partitions, reproducibly, sorted.

    Parameters
    ----------
    partitions
        The partitions that are available (any order).
    num
        How many to draw (at most ``len(partitions)``).
    seed, server_round, stream
        Seed the generator; ``stream`` separates fit from evaluate sampling.
    """
    pool = sorted(set(partitions))
    if not 0 <= num <= len(pool):
        raise ValueError(f"cannot sample {num} of {len(pool)} partitions")
    rng = np.random.default_rng([seed, server_round, stream])
    chosen = rng.choice(len(pool), size=num, replace=False)
    return sorted(pool[int(i)] for i in chosen)


def assign_rank_tiers(
    tiers: Sequence[int], num_partitions: int, *, seed: int, default: int
) -> dict[int, int]:
    """Give every partition a rank: tiers in turn over a seeded permutation.

    Each tier gets ``num_partitions / len(tiers)`` partitions (up to one more);
    with no tiers every partition gets ``default``.
    """
    if not tiers:
        return dict.fromkeys(range(num_partitions), default)
    rng = np.random.default_rng([seed, _TIER_STREAM])
    order = rng.permutation(num_partitions)
    return {int(p): int(tiers[i % len(tiers)]) for i, p in enumerate(order)}
