"""What a client does with a :class:`~lora_flwr.protocol.Plan` (no Flower import).

:func:`prepare` turns a plan and its payload into the adapter state training
starts from: it folds the base-weight delta, sets every factor group from the
payload, the node's private store or the seeded init, sets the rank and which
groups train, and returns what the client starts from. :func:`finish` stores the
kept groups and returns the reply in wire order; :func:`compress_reply` encodes it
for the uplink (``compression.codec``), keeping top-k's residual in the node's store.
Keeping this apart from ``client.py`` lets tests drive it without Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from lora_flwr.aggregation.linalg import cut_to_rank, fold_block
from lora_flwr.compression import Codec, encode_reply
from lora_flwr.protocol import (
    FOLD_A_SUFFIX,
    FOLD_B_SUFFIX,
    FOLD_DELTA_SUFFIX,
    AdapterLayout,
    Plan,
    group_of,
    pair_names,
)
from lora_flwr.validation import check_arrays

if TYPE_CHECKING:  # torch: the client's protocol-only messages never need it
    from lora_flwr.lora import LoRAAdapter

NDArray = npt.NDArray[np.float32]


class NodeStore(Protocol):
    """What a node keeps between calls (Flower's ``Context.state`` in practice)."""

    def base_version(self) -> int:
        """Version of the base-weight delta the node holds (0: none)."""
        ...

    def base_delta(self) -> dict[str, NDArray]:
        """Return the held delta per LoRA module (empty at version 0)."""
        ...

    def set_base(self, version: int, delta: Mapping[str, NDArray]) -> None:
        """Replace the held delta and its version."""
        ...

    def private(self) -> dict[str, NDArray]:
        """Privately kept adapter tensors by weight name (e.g. FedSA's B)."""
        ...

    def set_private(self, arrays: Mapping[str, NDArray]) -> None:
        """Replace the privately kept tensors."""
        ...

    def residual(self) -> dict[str, NDArray]:
        """Top-k's error feedback by weight name: computed, not yet sent."""
        ...

    def set_residual(self, arrays: Mapping[str, NDArray]) -> None:
        """Replace the top-k residual."""
        ...


class MemoryStore:
    """A :class:`NodeStore` in memory (tests, and a single-process client)."""

    def __init__(self) -> None:
        self._version = 0
        self._delta: dict[str, NDArray] = {}
        self._private: dict[str, NDArray] = {}
        self._residual: dict[str, NDArray] = {}

    def base_version(self) -> int:
        """Version of the held delta."""
        return self._version

    def base_delta(self) -> dict[str, NDArray]:
        """Return the held delta per module."""
        return dict(self._delta)

    def set_base(self, version: int, delta: Mapping[str, NDArray]) -> None:
        """Replace the held delta."""
        self._version = version
        self._delta = dict(delta)

    def private(self) -> dict[str, NDArray]:
        """Kept tensors."""
        return dict(self._private)

    def set_private(self, arrays: Mapping[str, NDArray]) -> None:
        """Replace the kept tensors."""
        self._private = dict(arrays)

    def residual(self) -> dict[str, NDArray]:
        """Top-k residual."""
        return dict(self._residual)

    def set_residual(self, arrays: Mapping[str, NDArray]) -> None:
        """Replace the top-k residual."""
        self._residual = dict(arrays)


def layout_of(adapter: LoRAAdapter) -> AdapterLayout:
    """Return the adapter's names and allocated shapes, as the server sees them."""
    return AdapterLayout(tuple(adapter.weight_names()), tuple(adapter.weight_shapes()))


def apply_fold(
    layout: AdapterLayout, plan: Plan, payload: Mapping[str, NDArray], store: NodeStore
) -> dict[str, NDArray]:
    """Bring the node's base delta to ``plan.fold_to`` and return it.

    Raises
    ------
    ValueError
        If the node does not hold the version the plan starts from (the server
        then sends the whole delta next time).
    """
    held = store.base_version()
    if plan.fold_mode == "none":
        if held != plan.fold_to:
            raise ValueError(
                f"this node holds base version {held} but the server expects "
                f"{plan.fold_to}; it will send the whole delta next round"
            )
        return store.base_delta()
    if plan.fold_mode == "dense":
        delta = {m: payload[m + FOLD_DELTA_SUFFIX] for m in layout.modules}
    else:
        if held != plan.fold_from:
            raise ValueError(
                f"this node holds base version {held} but the stacked update starts "
                f"at {plan.fold_from}; it will send the whole delta next round"
            )
        delta = store.base_delta()
        for module in layout.modules:
            b_all = payload[module + FOLD_B_SUFFIX]
            a_all = payload[module + FOLD_A_SUFFIX]
            value = delta.get(module)
            start = 0
            # One block per server version, in order: the same float64 folds the
            # server did, so both hold the same bits.
            for width in plan.fold_ranks:
                end = start + width
                value = fold_block(value, b_all[:, start:end], a_all[start:end])
                start = end
            assert value is not None
            delta[module] = value
    store.set_base(plan.fold_to, delta)
    return delta


def prepare(
    adapter: LoRAAdapter,
    initial: Mapping[str, NDArray],
    plan: Plan,
    payload: Sequence[NDArray],
    store: NodeStore,
) -> dict[str, NDArray]:
    """Set the adapter (and its base weights) up for a call under ``plan``.

    Everything in the payload is checked (count, names, dtype, shape, finite)
    before anything changes.

    Returns
    -------
    dict
        What the adapter starts from, by name, for the groups the server knows:
        the payload's received groups and the seeded init of groups neither
        received nor kept (the server's ``Rule.start_arrays``, bit for bit).

    Raises
    ------
    ValueError
        On a malformed payload, or a base version mismatch.
    """
    layout = layout_of(adapter)
    spec = layout.payload_spec(plan)
    named = pair_names(spec, payload)
    check_arrays(named, spec, dtype=np.float32, what="server payload")
    arrays: dict[str, NDArray] = {n: a for n, a in named.items()}  # type: ignore[misc]
    delta = apply_fold(layout, plan, arrays, store)
    adapter.set_base_delta(delta or None)
    private = store.private() if plan.keep else {}
    values: dict[str, NDArray] = {}
    for name in layout.names:
        group = group_of(name)
        if group in plan.receive:
            values[name] = arrays[name]
        elif group in plan.keep and name in private:
            values[name] = private[name]
        else:
            values[name] = cut_to_rank(initial[name], name, plan.rank)
    adapter.set_named_weights(values, rank=plan.rank)
    adapter.set_trainable(
        lora_A="A" in plan.train, lora_B="B" in plan.train, saved="M" in plan.train
    )
    return {n: v for n, v in values.items() if group_of(n) not in plan.keep}


def finish(adapter: LoRAAdapter, plan: Plan, store: NodeStore) -> list[NDArray]:
    """Store the kept groups and return the reply arrays in wire order."""
    current = adapter.get_named_weights(plan.rank)
    if plan.keep:
        store.set_private(
            {n: a for n, a in current.items() if group_of(n) in plan.keep}
        )
    return [current[name] for name, _ in layout_of(adapter).reply_spec(plan)]


def compress_reply(
    reply: Sequence[NDArray],
    start: Mapping[str, NDArray],
    names: Sequence[str],
    store: NodeStore,
    codec: Codec,
    fraction: float = 1.0,
) -> list[npt.NDArray[np.generic]]:
    """Encode a reply for the uplink as ``codec`` (``"none"``: unchanged).

    The update is coded against ``start`` (:func:`prepare`'s return; zero for a
    weight not in it, as on the server). Top-k adds the residual this node kept
    from earlier rounds (zero at first, or for a weight whose shape changed) and
    stores the new one (error feedback), leaving other weights' residuals as they
    were. The residual is stored before the reply leaves: a reply lost on the way
    loses what it carried.

    Parameters
    ----------
    reply
        The reply arrays in wire order.
    start
        What the client started from, by name.
    names
        The reply's weight names in wire order.
    store
        The node's store (holds the top-k residual).
    codec, fraction
        ``compression.codec`` and ``compression.topk_fraction`` as the server sent them.
    """
    if codec == "none":
        return list(reply)
    reference = [
        start[n] if n in start else np.zeros_like(a)
        for n, a in zip(names, reply, strict=True)
    ]
    if codec != "topk":
        return encode_reply(codec, reply, reference).arrays
    held = store.residual()
    residual = [
        held[n] if n in held and held[n].shape == a.shape else np.zeros_like(a)
        for n, a in zip(names, reply, strict=True)
    ]
    encoded = encode_reply(
        codec, reply, reference, fraction=fraction, residual=residual
    )
    assert encoded.residual is not None
    store.set_residual({**held, **dict(zip(names, encoded.residual, strict=True))})
    return encoded.arrays


def check_secagg_range(
    reply: Sequence[NDArray], num_examples: int, clip: float, max_weight: float
) -> None:
    """Refuse a reply that SecAgg+ would distort without a word.

    The SecAgg+ client mod multiplies the reply by ``num_examples / max_weight``
    and clips every value to ``[-clip, clip]`` before quantising it, and the
    masked sums stay exact only while the weights stay at most ``max_weight``.

    Raises
    ------
    ValueError
        If ``num_examples`` exceeds ``max_weight`` or a weighted value would be
        clipped, naming the value and the config key to raise.
    """
    if num_examples > max_weight:
        raise ValueError(
            f"SecAgg+: this client has {num_examples} training examples, more than "
            f"secagg.max_weight={max_weight:g}; raise secagg.max_weight"
        )
    ratio = num_examples / max_weight
    peak = max((float(np.abs(a).max()) for a in reply if a.size), default=0.0)
    if not math.isfinite(peak) or peak * ratio > clip:
        raise ValueError(
            f"SecAgg+: a reply value of magnitude {peak:.4g} x weight {ratio:.4g} "
            f"exceeds secagg.clip={clip:g} and would be clipped; raise "
            "secagg.clip"
        )
