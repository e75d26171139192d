"""FlexLoRA: aggregate the full products, give each client its best rank-r_k part."""

from __future__ import annotations

from collections.abc import Sequence

from lora_flwr.aggregation.base import Rule, register
from lora_flwr.aggregation.linalg import lowrank_svd, stack_factors, truncate
from lora_flwr.aggregation.state import ClientReply, ServerState, example_weights
from lora_flwr.protocol import LORA_A_SUFFIX, LORA_B_SUFFIX, group_of


@register
class FlexLoRA(Rule):
    r"""Average the products, then split them by SVD at each client's rank.

    .. math::
        W = \sum_k p_k s B_k A_k = U \Sigma V^\top, \qquad
        B^{(k)} = U_{r_k} \Sigma_{r_k} / s, \; A^{(k)} = V_{r_k}^\top

    Bai et al., "Federated Fine-tuning of Large Language Models under
    Heterogeneous Tasks and Client Resources" (FlexLoRA), NeurIPS 2024. A client
    of rank ``r_k`` gets the best rank-``r_k`` approximation of W (Eckart-Young),
    exact when ``rank(W) <= r_k``. The global adapter keeps the allocated rank
    ``r``; the SVD is taken on the stacked factors, never on a dense W.
    """

    name = "flexlora"
    supports_rank_tiers = True
    optimizer_refusal = "its global factors are re-derived by an SVD every round"

    def aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """SVD of the weighted product sum, truncated to the allocated rank."""
        weights = example_weights(replies)
        rank = self.layout.rank
        new = dict(state.arrays)
        for module in self.layout.modules:
            a_name, b_name = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            b, a = stack_factors(
                [r.arrays[b_name] for r in replies],
                [r.arrays[a_name] for r in replies],
                [w * self.scaling for w in weights],
            )
            u, s, vt = lowrank_svd(b, a)
            b_new, a_new = truncate(u, s, vt, rank)
            new[b_name] = (b_new / self.scaling).astype(self.dtype)
            new[a_name] = a_new.astype(self.dtype)
        for name in self.layout.names:
            if group_of(name) == "M":
                new[name] = self.weighted_mean(replies, name).astype(self.dtype)
        return state.replace(round=server_round, arrays=new)
