"""HetLoRA: heterogeneous ranks by zero-padding to r_max and truncating back."""

from __future__ import annotations

from collections.abc import Sequence

from lora_flwr.aggregation.base import Rule, register
from lora_flwr.aggregation.state import ClientReply, ServerState


@register
class HetLoRA(Rule):
    r"""Zero-pad every client's factors to the allocated rank, average, truncate.

    .. math::
        \bar A = \sum_k p_k \,\mathrm{pad}_{r}(A_k), \quad
        \bar B = \sum_k p_k \,\mathrm{pad}_{r}(B_k), \qquad
        A^{(k)} = \bar A_{[:r_k]}, \; B^{(k)} = \bar B_{[:, :r_k]}

    Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
    Foundation Models" (HetLoRA), EMNLP 2024. Like FedIT it averages factors, so
    it is not exact for the product. The paper's rank self-pruning and
    sparsity-weighted aggregation are not included: weights are ``p_k``.
    """

    name = "hetlora"
    plain_weighted_sum = True  # of the zero-padded factors
    supports_rank_tiers = True
    supports_server_optimizer = True

    def aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """Weighted mean of the zero-padded factors and of the saved modules."""
        new = {
            n: self.weighted_mean(replies, n, pad=True).astype(self.dtype)
            for n in self.layout.names
        }
        return state.replace(round=server_round, arrays=new)
