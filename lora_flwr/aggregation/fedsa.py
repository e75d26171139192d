"""FedSA-LoRA: A is shared and averaged, each client's B stays on the client."""

from __future__ import annotations

from collections.abc import Sequence

from lora_flwr.aggregation.base import Rule, register
from lora_flwr.aggregation.state import ClientReply, GroupPlan, ServerState, groups
from lora_flwr.protocol import group_of


@register
class FedSA(Rule):
    r"""Share and average A; keep every client's B private.

    .. math:: \bar A = \sum_k p_k A_k, \qquad B_k \text{ never leaves client } k

    Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
    Learning" (FedSA-LoRA), ICLR 2025: A learns what clients share, B what is
    specific to each. Saved modules (e.g. a new classifier head) are shared and
    averaged like A. There is no global B, hence no global model: evaluation runs
    each client's personalised model (global A, its own B) on its local split and
    reports the example-weighted mean, and no aggregation error is defined.
    """

    name = "fedsa"
    plain_weighted_sum = True
    supports_robust = True
    supports_server_optimizer = True
    personalized = True

    def round_groups(self, server_round: int) -> GroupPlan:
        """Send A and saved modules both ways; train B and keep it on the client."""
        return GroupPlan(
            receive=groups("AM"),
            train=groups("ABM"),
            send=groups("AM"),
            keep=groups("B"),
        )

    def aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """Weighted mean of A and saved modules."""
        new = dict(state.arrays)
        for name in self.layout.names:
            if group_of(name) != "B":
                new[name] = self.weighted_mean(replies, name).astype(self.dtype)
        return state.replace(round=server_round, arrays=new)
