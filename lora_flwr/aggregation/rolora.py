"""RoLoRA: alternate rounds between training B (A frozen) and A (B frozen)."""

from __future__ import annotations

from collections.abc import Sequence

from lora_flwr.aggregation.base import Rule, register
from lora_flwr.aggregation.state import (
    ALL,
    ClientReply,
    GroupPlan,
    ServerState,
    example_weights,
    groups,
)


@register
class RoLoRA(Rule):
    r"""Alternate the trained factor by round; the other one is frozen and shared.

    Odd rounds train B with A frozen, even rounds A with B frozen:

    .. math::
        \text{odd } t: \bar B = \sum_k p_k B_k, \quad
            s \bar B A = \sum_k p_k s B_k A; \qquad
        \text{even } t: \bar A = \sum_k p_k A_k, \quad
            s B \bar A = \sum_k p_k s B A_k

    so every round is exact, and only one factor (plus saved modules) goes up.
    Chen et al., "Robust Federated Finetuning of LLMs via Alternating
    Optimization of LoRA" (RoLoRA), 2025. B comes first because B starts at zero:
    with B = 0 the gradient of A is zero, so an A round first would be wasted.
    """

    name = "rolora"
    plain_weighted_sum = True
    supports_robust = True
    supports_server_optimizer = True

    @staticmethod
    def trained_factor(server_round: int) -> str:
        """``"B"`` in odd rounds, ``"A"`` in even rounds."""
        return "B" if server_round % 2 == 1 else "A"

    def round_groups(self, server_round: int) -> GroupPlan:
        """Both factors go down; one factor and the saved modules train and go up."""
        trained = groups(self.trained_factor(server_round) + "M")
        return GroupPlan(receive=ALL, train=trained, send=trained)

    def aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """Weighted mean of what was trained; the frozen factor is unchanged."""
        example_weights(replies)  # refuses zero replies even if nothing was sent
        new = dict(state.arrays)
        for name in self.averaged_names(replies):
            new[name] = self.weighted_mean(replies, name).astype(self.dtype)
        return state.replace(round=server_round, arrays=new)
