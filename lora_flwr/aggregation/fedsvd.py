"""FedSVD: train B only; re-factor the aggregate by SVD so A stays orthonormal."""

from __future__ import annotations

from collections.abc import Sequence

from lora_flwr.aggregation.base import Rule, register
from lora_flwr.aggregation.linalg import lowrank_svd, truncate
from lora_flwr.aggregation.state import ALL, ClientReply, GroupPlan, ServerState, groups
from lora_flwr.protocol import LORA_A_SUFFIX, LORA_B_SUFFIX, group_of


@register
class FedSVD(Rule):
    r"""Average B with A frozen, then re-factor the product by SVD.

    .. math::
        \bar B = \sum_k p_k B_k, \qquad \bar B A = U \Sigma V^\top, \qquad
        A \leftarrow V_r^\top, \; B \leftarrow U_r \Sigma_r

    so :math:`s B A` is unchanged by the re-factoring (``rank(\bar B A) <= r``)
    and A has orthonormal rows. Lee et al., "FedSVD: Adaptive Orthogonalization
    for Private Federated Learning with LoRA", NeurIPS 2025. Orientation:
    :math:`\bar B A` is ``(out, in)``, so A takes the first ``r`` *right* singular
    vectors as rows (``Vt[:r]``, shape ``(r, in)``) and B the left ones scaled,
    ``(out, r)``; transposing this product is a known bug in public code. B is a
    plain weighted sum of what clients send; the SVD is post-processing.
    """

    name = "fedsvd"
    plain_weighted_sum = True  # of B; the re-factoring needs only the sum
    supports_robust = True
    optimizer_refusal = (
        "its A is rotated by an SVD every round, so moments lose meaning"
    )

    def round_groups(self, server_round: int) -> GroupPlan:
        """Send A and B down; train B and saved modules and send them up."""
        return GroupPlan(receive=ALL, train=groups("BM"), send=groups("BM"))

    def aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """Average B and saved modules, then re-factor every ``B A`` by SVD."""
        rank = self.layout.rank
        new = dict(state.arrays)
        for module in self.layout.modules:
            a_name, b_name = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            b_mean = self.weighted_mean(replies, b_name)
            u, s, vt = lowrank_svd(b_mean, state.arrays[a_name])
            b_new, a_new = truncate(u, s, vt, rank)
            new[b_name] = b_new.astype(self.dtype)
            new[a_name] = a_new.astype(self.dtype)
        for name in self.layout.names:
            if group_of(name) == "M":
                new[name] = self.weighted_mean(replies, name).astype(self.dtype)
        return state.replace(round=server_round, arrays=new)
