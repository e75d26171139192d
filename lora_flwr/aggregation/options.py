"""What a rule supports, and the run options layered on it (pure numpy).

A rule declares its capabilities as class flags; :meth:`RuleOptions.check_setup`
refuses the combinations of rank tiers, server optimizer, robust averaging,
differential privacy and secure aggregation that make no sense for it, and
``use_robust``, ``use_dp`` and ``use_head`` switch an option on for a run.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from lora_flwr.aggregation.robust import RobustMode
from lora_flwr.aggregation.state import GroupPlan
from lora_flwr.protocol import AdapterLayout, Group, group_of

if TYPE_CHECKING:  # annotations only: the rules do not depend on the config
    from lora_flwr.config import ExperimentConfig

# How the saved modules ("M": e.g. a new classifier head) are treated, on top of
# any rule (``head.mode``; config.HEAD_MODES lists the same names).
HEAD_MODES: tuple[str, ...] = ("averaged", "frozen", "local", "reinit")
_M: frozenset[Group] = frozenset({"M"})


class RuleOptions:
    """Capability flags and run options of a rule; :class:`Rule` builds on it."""

    name: ClassVar[str] = ""
    # Is the aggregate a plain weighted sum of what clients send? Secure
    # aggregation can only compute such sums.
    plain_weighted_sum: ClassVar[bool] = False
    # Can clients hold different ranks (rank tiers)?
    supports_rank_tiers: ClassVar[bool] = False
    # Does a server optimizer over the averaged tensors make sense?
    supports_server_optimizer: ClassVar[bool] = False
    # No global model exists (FedSA's B stays on the clients): evaluate each
    # client's personalised model on its local split instead.
    personalized: ClassVar[bool] = False
    # Can a coordinate-wise median / trimmed mean replace the weighted mean? Only
    # where the rule's aggregate is a plain average of what clients send.
    supports_robust: ClassVar[bool] = False

    optimizer_refusal: ClassVar[str] = (
        "its state is not a fixed set of averaged tensors"
    )

    # Set by the rule's constructor; the saved modules are read from it.
    layout: AdapterLayout

    def __init__(self) -> None:
        """Start with every option off: weighted mean, no noise, averaged head."""
        # guards.robust: the averaging :meth:`Rule.weighted_mean` performs.
        self.robust: RobustMode = "none"
        self.trim_fraction = 0.2
        # Differential privacy (:meth:`use_dp`): equal weights and Gaussian noise.
        self.dp_noise_multiplier = 0.0
        self.dp_clip_norm = 0.0
        self._dp_rng: np.random.Generator | None = None
        # head.mode (:meth:`use_head`).
        self.head = "averaged"
        self.head_warmup_rounds = 0

    def use_dp(self, noise_multiplier: float, clip_norm: float) -> None:
        """Average with equal weights and add Gaussian noise to every mean.

        Each averaged tensor gets ``N(0, (z C / m)^2)`` noise, ``z`` the noise
        multiplier, ``C`` the clip norm the server applied to every update and
        ``m`` the number of replies (DP-FedAvg, McMahan et al., "Learning
        Differentially Private Recurrent Language Models", ICLR 2018). The noise
        comes from fresh OS entropy, never from the run's seed: noise that can be
        replayed protects nothing.

        Raises
        ------
        ValueError
            If the rule's aggregate is not a plain average (see ``check_setup``).
        """
        self.check_setup(rank_tiers=(), server_optimizer="none", dp=True)
        self.dp_noise_multiplier = float(noise_multiplier)
        self.dp_clip_norm = float(clip_norm)
        self._dp_rng = np.random.default_rng(secrets.randbits(128))

    def use_robust(self, mode: RobustMode, trim_fraction: float = 0.2) -> None:
        """Average with a coordinate-wise ``median`` or ``trimmed_mean`` instead.

        Raises
        ------
        ValueError
            If the rule's aggregate is not a plain average (see ``check_setup``).
        """
        self.check_setup(rank_tiers=(), server_optimizer="none", robust=mode)
        self.robust = mode
        self.trim_fraction = trim_fraction

    def use_head(self, mode: str, warmup_rounds: int = 0) -> None:
        """Treat the saved modules (group ``M``, e.g. a new head) as ``mode`` says.

        * ``averaged``: as the rule says (every rule trains, sends and averages M).
        * ``frozen``: trained and averaged in rounds ``1..warmup_rounds``, then
          received but neither trained nor sent; the global M stays as it was
          (``warmup_rounds = 0``: fixed at the seeded init, as FedBABU fixes its
          head: Oh et al., "FedBABU: Toward Enhanced Representation for Federated
          Image Classification", ICLR 2022).
        * ``local``: never received or sent; each client trains and keeps its own
          (the personalised part, like FedSA-LoRA's B: Guo et al., ICLR 2025);
          the global M stays at the seeded init.
        * ``reinit``: not received; every round each client trains it from the
          seeded init, and the server averages those, so head drift does not
          accumulate across rounds.

        Raises
        ------
        ValueError
            For an unknown mode, a negative warm-up, a warm-up with another mode,
            or an adapter without saved modules.
        """
        if mode not in HEAD_MODES:
            raise ValueError(
                f"`head.mode` should be one of {', '.join(map(repr, HEAD_MODES))} "
                f"but is {mode!r}"
            )
        if warmup_rounds < 0 or (warmup_rounds and mode != "frozen"):
            raise ValueError(
                f"`head.warmup_rounds` = {warmup_rounds} should be >= 0, and 0 "
                "unless `head.mode` = 'frozen'"
            )
        if mode != "averaged" and not self.head_names:
            raise ValueError(
                f"`head.mode` = {mode!r} needs saved modules (`lora.modules_to_save`, "
                "e.g. 'classifier') but the adapter has none"
            )
        self.head = mode
        self.head_warmup_rounds = int(warmup_rounds)

    @property
    def head_names(self) -> list[str]:
        """Weight names of the saved modules (group ``M``)."""
        return [n for n in self.layout.names if group_of(n) == "M"]

    @property
    def local_head(self) -> bool:
        """Whether each client keeps its own head (``head.mode = 'local'``)."""
        return self.head == "local"

    def head_groups(self, g: GroupPlan, server_round: int) -> GroupPlan:
        """Apply :meth:`use_head`'s treatment of ``M`` to a rule's round plan."""
        if self.head == "frozen" and server_round > self.head_warmup_rounds:
            return GroupPlan(g.receive, g.train - _M, g.send - _M, g.keep)
        if self.head == "local":
            return GroupPlan(g.receive - _M, g.train, g.send - _M, g.keep | _M)
        if self.head == "reinit":
            return GroupPlan(g.receive - _M, g.train, g.send, g.keep)
        return g

    @classmethod
    def check_setup(
        cls,
        *,
        rank_tiers: Sequence[int],
        server_optimizer: str,
        robust: str = "none",
        dp: bool = False,
        secagg: bool = False,
    ) -> None:
        """Refuse combinations that make no sense for this rule (one clear line).

        Raises
        ------
        ValueError
            On heterogeneous rank tiers for a rule that needs one rank, a server
            optimizer for a rule whose state it cannot act on, robust averaging
            or differential privacy for a rule whose aggregate is not a plain
            average, or secure aggregation for a rule whose aggregate is not a
            plain weighted sum of equally shaped replies.
        """
        if len(set(rank_tiers)) > 1 and not cls.supports_rank_tiers:
            raise ValueError(
                f"`fed.aggregation`={cls.name!r} needs one rank for every client but "
                f"`fed.rank_tiers` is {','.join(map(str, rank_tiers))!r}; use hetlora, "
                "flexlora or flora for heterogeneous ranks"
            )
        if server_optimizer != "none" and not cls.supports_server_optimizer:
            raise ValueError(
                f"`server_opt.name`={server_optimizer!r} cannot be combined with "
                f"`fed.aggregation`={cls.name!r}: {cls.optimizer_refusal}"
            )
        if robust != "none" and not cls.supports_robust:
            raise ValueError(
                f"`guards.robust`={robust!r} cannot be combined with "
                f"`fed.aggregation`={cls.name!r}: its aggregate is not a plain "
                "average of what clients send; use fedit, ffa, fedsa, rolora or fedsvd"
            )
        if dp and not cls.supports_robust:
            raise ValueError(
                f"differential privacy (`privacy.noise_multiplier` > 0) cannot be "
                f"combined with `fed.aggregation`={cls.name!r}: its aggregate is not "
                "a noisy mean of clipped updates; use ffa or fedsvd (as their papers "
                "do under DP), fedit, fedsa or rolora"
            )

        if secagg and not cls.plain_weighted_sum:
            raise ValueError(
                f"`secagg.enabled` = true cannot be combined with `fed.aggregation`="
                f"{cls.name!r}: SecAgg+ reveals only a weighted sum of what clients "
                "send, and this rule needs each reply; use fedit, ffa, fedsa, rolora, "
                "fedsvd or hetlora"
            )
        if secagg and len(set(rank_tiers)) > 1:
            raise ValueError(
                "`secagg.enabled` = true needs one rank for every client (SecAgg+ sums "
                f"equally shaped vectors) but `fed.rank_tiers` is "
                f"{','.join(map(str, rank_tiers))!r}"
            )

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """:meth:`check_setup` for an experiment's config.

        Raises
        ------
        ValueError
            As :meth:`check_setup`.
        """
        cls.check_setup(
            rank_tiers=cfg.fed.rank_tiers,
            server_optimizer=cfg.server_opt.name,
            robust=cfg.guards.robust,
            dp=cfg.privacy.noise_multiplier > 0,
            secagg=cfg.secagg.enabled,
        )
