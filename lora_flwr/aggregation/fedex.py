"""FedEx-LoRA: average A and B, fold the residual into the base weights."""

from __future__ import annotations

from collections.abc import Sequence

from lora_flwr.aggregation.base import Rule, register
from lora_flwr.aggregation.linalg import stack_factors
from lora_flwr.aggregation.state import (
    ClientReply,
    FoldBlock,
    ServerState,
    example_weights,
)
from lora_flwr.protocol import LORA_A_SUFFIX, LORA_B_SUFFIX


@register
class FedEx(Rule):
    r"""FedIT's averages plus the exact residual, folded into the base weights.

    .. math::
        \bar A = \sum_k p_k A_k, \quad \bar B = \sum_k p_k B_k, \quad
        R = \sum_k p_k s B_k A_k - s \bar B \bar A

    so that :math:`R + s \bar B \bar A = \sum_k p_k s B_k A_k` exactly.
    Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient
    Fine-Tuning of Foundation Models", 2024. R has rank at most ``(K + 1) r`` and
    travels factored, ``[B_1 \dots B_K, \bar B]`` times
    ``[p_1 s A_1; \dots; p_K s A_K; -s \bar A]``, not as a dense matrix (unless
    the dense one is smaller). Saved modules are averaged.
    """

    name = "fedex"
    optimizer_refusal = (
        "its exact residual is computed against the plain averages, which an "
        "optimizer step would change"
    )

    def aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """Averages as FedIT; the residual becomes the next base version."""
        weights = example_weights(replies)
        mean = {n: self.weighted_mean(replies, n) for n in self.layout.names}
        factors = {}
        for module in self.layout.modules:
            a_name, b_name = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            b, a = stack_factors(
                [r.arrays[b_name] for r in replies] + [mean[b_name]],
                [r.arrays[a_name] for r in replies] + [mean[a_name]],
                [w * self.scaling for w in weights] + [-self.scaling],
            )
            factors[module] = (b.astype(self.dtype), a.astype(self.dtype))
        arrays = {n: v.astype(self.dtype) for n, v in mean.items()}
        return self.with_fold(state, FoldBlock(factors)).replace(
            round=server_round, arrays=arrays
        )
