"""FedIT: FedAvg applied to the LoRA factors A and B separately."""

from __future__ import annotations

from collections.abc import Sequence

from lora_flwr.aggregation.base import Rule, register
from lora_flwr.aggregation.state import ClientReply, ServerState


@register
class FedIT(Rule):
    r"""Average every adapter tensor over clients, weighted by example counts.

    For each A, each B and each ``modules_to_save`` tensor

    .. math:: \bar A = \sum_k p_k A_k, \qquad \bar B = \sum_k p_k B_k

    Zhang et al., "Towards Building the Federated GPT: Federated Instruction
    Tuning", ICASSP 2024 (FedAvg of McMahan et al., AISTATS 2017, on A and B).
    It is *not* exact for the product the model uses: in general
    :math:`s \bar B \bar A \ne \sum_k p_k s B_k A_k`; the gap is logged every round
    as the aggregation error.
    """

    name = "fedit"
    plain_weighted_sum = True
    supports_robust = True
    supports_server_optimizer = True

    def aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """Weighted mean of every tensor."""
        new = {n: self.weighted_mean(replies, n) for n in self.layout.names}
        return state.replace(round=server_round, arrays=self.cast(new))
