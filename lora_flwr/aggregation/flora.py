"""FLoRA: stack the clients' factors so the product is their exact weighted sum."""

from __future__ import annotations

from collections.abc import Sequence

from lora_flwr.aggregation.base import Rule, register
from lora_flwr.aggregation.linalg import stack_factors
from lora_flwr.aggregation.state import (
    ClientReply,
    FoldBlock,
    GroupPlan,
    ServerState,
    example_weights,
    groups,
)
from lora_flwr.protocol import LORA_A_SUFFIX, LORA_B_SUFFIX, group_of


@register
class FLoRA(Rule):
    r"""Stack the client factors, fold the product into the base, restart LoRA.

    .. math::
        B = [B_1 \dots B_K], \quad A = [p_1 s A_1; \dots; p_K s A_K], \qquad
        B A = \sum_k p_k s B_k A_k \quad\text{(exact)}

    Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
    Heterogeneous Low-Rank Adaptations", NeurIPS 2024. Every client folds
    :math:`BA` into its frozen base weights and restarts A, B from the shared
    seeded init, so ranks may differ between clients (``fed.rank_tiers``). A
    client that missed rounds first receives what it missed: the stacked blocks
    of those rounds or the whole delta, whichever has fewer bytes. Saved modules
    are averaged. The scaling goes into the stacked A, so server and client fold
    the same product.
    """

    name = "flora"
    supports_rank_tiers = True
    optimizer_refusal = (
        "its global update is a stacked factor pair that grows every round"
    )

    def round_groups(self, server_round: int) -> GroupPlan:
        """Only saved modules go down (A, B restart from init); everything goes up."""
        return GroupPlan(receive=groups("M"), train=groups("ABM"), send=groups("ABM"))

    def aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """Fold the stacked product; A, B back to init; saved modules averaged."""
        weights = example_weights(replies)
        factors = {}
        for module in self.layout.modules:
            b, a = stack_factors(
                [r.arrays[module + LORA_B_SUFFIX] for r in replies],
                [r.arrays[module + LORA_A_SUFFIX] for r in replies],
                [w * self.scaling for w in weights],
            )
            factors[module] = (b.astype(self.dtype), a.astype(self.dtype))
        new = dict(self.initial)
        for name in self.layout.names:
            if group_of(name) == "M":
                new[name] = self.weighted_mean(replies, name).astype(self.dtype)
        return self.with_fold(state, FoldBlock(factors)).replace(
            round=server_round, arrays=new
        )
