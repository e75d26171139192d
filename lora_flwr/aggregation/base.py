"""Types and the registry shared by every aggregation rule (pure numpy)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

NDArray = npt.NDArray[np.float32]
Arrays = list[NDArray]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply to a fit round, already validated.

    ``arrays`` follow the adapter's weight order (``names`` in the rule call).
    """

    arrays: Sequence[NDArray]
    num_examples: int
    client_id: str = ""


# A rule maps (current global arrays, client updates, weight names) to new arrays.
AggregationRule = Callable[
    [Sequence[NDArray], Sequence[ClientUpdate], Sequence[str]], Arrays
]

_RULES: dict[str, AggregationRule] = {}


def register(name: str) -> Callable[[AggregationRule], AggregationRule]:
    """Register a rule under ``name`` so configs can select it (``fed.aggregation``)."""

    def deco(rule: AggregationRule) -> AggregationRule:
        if name in _RULES:
            raise ValueError(f"Aggregation rule {name!r} is already registered")
        _RULES[name] = rule
        return rule

    return deco


def get_rule(name: str) -> AggregationRule:
    """Return the rule registered as ``name``.

    Raises
    ------
    ValueError
        If no rule has that name; the message lists the known ones.
    """
    try:
        return _RULES[name]
    except KeyError:
        raise ValueError(
            f"`fed.aggregation` should be one of {available_rules()} but the value "
            f"passed is {name!r}"
        ) from None


def available_rules() -> list[str]:
    """Names of the registered rules, sorted."""
    return sorted(_RULES)


def example_weights(updates: Sequence[ClientUpdate]) -> npt.NDArray[np.float64]:
    """Normalised weights ``n_k / sum_j n_j`` (float64).

    Raises
    ------
    ValueError
        If there are no updates or the example counts do not sum to a positive value.
    """
    if not updates:
        raise ValueError("Cannot aggregate zero client updates")
    counts = np.array([u.num_examples for u in updates], dtype=np.float64)
    if np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(
            f"Client example counts must be >= 0 and sum > 0, got {counts}"
        )
    weights: npt.NDArray[np.float64] = counts / counts.sum()
    return weights
