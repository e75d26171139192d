"""FFA-LoRA: A frozen at the shared seeded init, only B (and saved modules) trained."""

from __future__ import annotations

from collections.abc import Sequence

from lora_flwr.aggregation.base import Rule, register
from lora_flwr.aggregation.state import ClientReply, GroupPlan, ServerState, groups
from lora_flwr.protocol import group_of


@register
class FFA(Rule):
    r"""Freeze A at the shared seeded init; average B.

    .. math:: \bar B = \sum_k p_k B_k, \qquad
              s \bar B A_0 = \sum_k p_k s B_k A_0 \quad\text{(exact)}

    Sun et al., "Improving LoRA in Privacy-preserving Federated Learning"
    (FFA-LoRA), ICLR 2024. Every client derives the same ``A_0`` from the
    experiment seed, so A never travels and the uplink halves.
    """

    name = "ffa"
    plain_weighted_sum = True
    supports_robust = True
    supports_server_optimizer = True

    def round_groups(self, server_round: int) -> GroupPlan:
        """B and saved modules travel both ways; A is the seeded init on every side."""
        return GroupPlan(receive=groups("BM"), train=groups("BM"), send=groups("BM"))

    def aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """Weighted mean of B and saved modules; A stays the seeded init."""
        new = dict(state.arrays)
        for name in self.layout.names:
            if group_of(name) != "A":
                new[name] = self.weighted_mean(replies, name).astype(self.dtype)
        return state.replace(round=server_round, arrays=new)
