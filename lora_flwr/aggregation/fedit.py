"""FedIT: FedAvg applied to the LoRA factors A and B separately."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lora_flwr.aggregation.base import (
    Arrays,
    ClientUpdate,
    NDArray,
    example_weights,
    register,
)


@register("fedit")
def fedit(
    current: Sequence[NDArray], updates: Sequence[ClientUpdate], names: Sequence[str]
) -> Arrays:
    r"""Average every adapter tensor over clients, weighted by example counts.

    For each tensor (each ``A_i``, each ``B_i`` and each ``modules_to_save`` tensor)

    .. math:: X^{t+1} = \sum_k \frac{n_k}{\sum_j n_j} X_k^{t+1}

    This is FedIT (Zhang et al., "Towards Building the Federated GPT: Federated
    Instruction Tuning", ICASSP 2024), i.e. FedAvg (McMahan et al., AISTATS 2017) on
    A and B. It is *not* exact for the product: in general
    :math:`\bar B \bar A \ne \overline{B A}`, so the global update differs from the
    average of the clients' updates :math:`\Delta W_k = s B_k A_k`. Sums are taken
    in float64 and returned as float32.

    Parameters
    ----------
    current
        Global arrays before the round (unused: FedIT needs no server state).
    updates
        Validated client replies in the adapter's weight order.
    names
        Weight names (unused here; LoRA-aware rules pair ``lora_A``/``lora_B``).

    Returns
    -------
    list of numpy.ndarray
        The new global arrays, float32, same shapes as ``current``.
    """
    del current, names
    weights = example_weights(updates)
    num_arrays = len(updates[0].arrays)
    out: Arrays = []
    for i in range(num_arrays):
        acc = np.zeros(updates[0].arrays[i].shape, dtype=np.float64)
        for w, update in zip(weights, updates, strict=True):
            acc += w * update.arrays[i].astype(np.float64)
        out.append(acc.astype(np.float32))
    return out
