"""The values the rule API passes around (pure numpy).

The server state between rounds (with the factored log of the base-weight delta),
what the server knows of a client when it plans its call, a validated client
reply, the groups a round moves, and the example weights ``p_k`` every weighted
mean uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from lora_flwr.protocol import GROUPS, Group, Plan

NDArray = npt.NDArray[np.float32]
Arrays = dict[str, NDArray]


@dataclass(frozen=True)
class FoldBlock:
    """One step of the base-weight delta: ``Delta W_m = B_m @ A_m`` per module.

    The scaling is already inside the factors.
    """

    factors: Mapping[str, tuple[NDArray, NDArray]]

    @property
    def width(self) -> int:
        """Inner dimension ``R`` of the factors (the same for every module)."""
        return int(next(iter(self.factors.values()))[0].shape[1])


@dataclass(frozen=True)
class ServerState:
    """Everything the server knows between rounds.

    Parameters
    ----------
    round
        The last completed round (0 before the first).
    arrays
        The global adapter at the allocated rank, by weight name.
    base_delta
        Per LoRA module, the delta ``(out, in)`` folded into the base weights so
        far (empty for rules that never merge).
    fold_log
        The factored steps that built ``base_delta``: version ``v`` is
        ``fold_log[:v]`` applied in order with :func:`fold_block`.
    extra
        Rule- or server-optimizer-specific arrays (e.g. ``"opt.m.<name>"``).
    """

    round: int
    arrays: Mapping[str, NDArray]
    base_delta: Mapping[str, NDArray] = field(default_factory=dict)
    fold_log: tuple[FoldBlock, ...] = ()
    extra: Mapping[str, NDArray] = field(default_factory=dict)

    @property
    def base_version(self) -> int:
        """Version of the base weights: how many fold steps were applied."""
        return len(self.fold_log)

    def replace(self, **changes: object) -> ServerState:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows of one client when it plans its call.

    Parameters
    ----------
    partition
        The client's partition id.
    rank
        Its rank tier ``r_k``.
    base_version
        The base-weight version it holds, or None when unknown (e.g. its last
        call failed after folding): it then gets the whole delta.
    """

    partition: int
    rank: int
    base_version: int | None = 0


@dataclass(frozen=True)
class ClientReply:
    """One validated client reply.

    Parameters
    ----------
    partition
        The client's partition id.
    plan
        The plan it was sent.
    arrays
        The reply by weight name (``plan.send`` groups at ``plan.rank``).
    num_examples
        Its local training examples (the weight ``n_k``).
    start
        What its adapter held when training began, by weight name, for every
        group the server knows (received groups and seeded inits; not kept ones).
    """

    partition: int
    plan: Plan
    arrays: Mapping[str, NDArray]
    num_examples: int
    start: Mapping[str, NDArray] = field(default_factory=dict)

    def factor(self, name: str) -> NDArray | None:
        """Return the client's ``name`` after training, if the server can know it."""
        if name in self.arrays:
            return self.arrays[name]
        return self.start.get(name)


@dataclass(frozen=True)
class GroupPlan:
    """Which groups a rule's clients receive, train, send and keep in a round."""

    receive: frozenset[Group]
    train: frozenset[Group]
    send: frozenset[Group]
    keep: frozenset[Group] = frozenset()


ALL: frozenset[Group] = frozenset(GROUPS)


def groups(text: str) -> frozenset[Group]:
    """Return the groups named by a string such as ``"BM"``."""
    return frozenset(g for g in GROUPS if g in text)


def example_weights(replies: Sequence[ClientReply]) -> npt.NDArray[np.float64]:
    """Normalised weights ``p_k = n_k / sum_j n_j`` (float64).

    Raises
    ------
    ValueError
        If there are no replies or the example counts are not positive.
    """
    if not replies:
        raise ValueError("Cannot aggregate zero client replies")
    counts = np.array([r.num_examples for r in replies], dtype=np.float64)
    if np.any(counts <= 0):
        raise ValueError(f"Client example counts must be > 0, got {counts}")
    weights: npt.NDArray[np.float64] = counts / counts.sum()
    return weights
