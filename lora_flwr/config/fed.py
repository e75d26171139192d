"""The federation's sections: rounds, sampling, server optimizer and guards.

Then differential privacy, uplink compression, the saved head and SecAgg+.

Each section checks its own fields when it is built; rows of
:data:`~lora_flwr.config.refusals.REFUSALS` that read several sections (every
client count against ``fed.num_clients``, SecAgg+ against the guards) are
checked when the whole experiment is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_flwr.config.choices import (
    Compression,
    HeadCalibration,
    HeadMode,
    NormGuard,
    Robust,
    ServerOptimizer,
    UpdateFilter,
)
from lora_flwr.config.fields import (
    ABOVE_0,
    AT_LEAST_0,
    AT_LEAST_1,
    bounded,
    check_section,
    nonempty,
)
from lora_flwr.config.owners import parse_partition_owners

# A share of the clients.
_SHARE = "(0, 1]"


@dataclass(frozen=True)
class FedConfig:
    """The federation: how many rounds and clients, which rule, when to stop."""

    num_rounds: int = bounded(5, AT_LEAST_1)
    num_clients: int = bounded(10, AT_LEAST_1)  # partitions = simulated SuperNodes
    # Rule name in lora_flwr.aggregation: fedit, ffa, fedsa, rolora, flora, fedex,
    # hetlora, flexlora, fedsvd.
    aggregation: str = nonempty("fedit")
    # Client ranks, assigned to partitions deterministically from the seed (e.g.
    # "4,8,16"); empty: every client at lora.r. lora.r must be the largest tier.
    rank_tiers: tuple[int, ...] = bounded((), AT_LEAST_1)
    # FedProx proximal term mu on the client (0: off)
    prox_mu: float = bounded(0.0, AT_LEAST_0)
    # client lr in round t = train.lr * lr_decay ** (t - 1)
    lr_decay: float = bounded(1.0, "(0, 1]")
    # The run stops (non-zero exit) after this many consecutive rounds without an
    # aggregate (every client failed or was dropped).
    max_failed_rounds: int = bounded(2, AT_LEAST_0)
    # Deployment under SuperNode authentication: which registered key owns which
    # partition, "SHA256:<fingerprint>=<partition>,..." (ssh-keygen -lf). A node
    # then gets the partition its key owns, never one it merely claims. "": off.
    partition_owners: str = ""

    def __post_init__(self) -> None:
        """Check the fields and the owners table."""
        check_section(self, "fed")
        parse_partition_owners(self.partition_owners, self.num_clients)


@dataclass(frozen=True)
class SamplingConfig:
    """Which clients train in a round, and how many replies a round needs."""

    # share of available clients trained per round
    fraction: float = bounded(1.0, _SHARE)
    # wait for (and require) at least this many replies (at most fed.num_clients)
    min_clients: int = bounded(2, AT_LEAST_1)
    # clients that must be connected before a round starts
    min_available: int = bounded(2, AT_LEAST_1)
    # A round aggregates when at least this many replies pass validation; fewer
    # keep the global adapter unchanged for that round.
    min_replies: int = bounded(1, AT_LEAST_1)

    def __post_init__(self) -> None:
        """Check the fields."""
        check_section(self, "sampling")


@dataclass(frozen=True)
class ServerOptConfig:
    """The server optimizer on the pseudo-gradient of what the rule averaged."""

    # Reddi et al., ICLR 2021: none, fedavgm, fedadagrad, fedadam, fedyogi.
    name: ServerOptimizer = "none"
    # Server learning rate eta. Reddi et al. tune it over 1e-3..10; above 100 a
    # server step moves the adapter 100x further than the clients' own average
    # (fedavgm) or every coordinate by ~100 a round (the adaptive ones).
    lr: float = bounded(1.0, "(0, 100]", why="above 100 every server step diverges")
    # momentum (FedAvgM's beta, FedAdam/FedYogi's beta_1)
    beta1: float = bounded(0.9, "[0, 1)")
    # second-moment decay (FedAdam, FedYogi)
    beta2: float = bounded(0.99, "[0, 1)")
    # adaptivity tau (FedAdagrad, FedAdam, FedYogi)
    tau: float = bounded(1e-3, ABOVE_0)

    def __post_init__(self) -> None:
        """Check the fields."""
        check_section(self, "server_opt")


@dataclass(frozen=True)
class GuardsConfig:
    """Robustness against a hostile client (on by default)."""

    # reject replies whose update norm exceeds this (0: off)
    max_update_norm: float = bounded(0.0, AT_LEAST_0)
    # A reply's example count is capped at weight_cap x the round's lower-median
    # count (0: off) ...
    weight_cap: float = bounded(
        1.5, AT_LEAST_1, off=0.0, why="a multiple of the median example count"
    )
    # ... and an update (reply - what it started from) whose norm exceeds
    # norm_guard_factor x the round's lower-median update norm is clipped to that
    # bound ("clip") or dropped ("reject"); "off" disables the guard.
    norm_guard: NormGuard = "clip"
    norm_guard_factor: float = bounded(
        2.0, AT_LEAST_1, why="a multiple of the median update norm"
    )
    # Optional robust aggregation of what the rule averages (unweighted,
    # coordinate-wise): none, median, trimmed_mean (drops trim_fraction of the
    # replies at each end per coordinate). Only for plain-average rules.
    robust: Robust = "none"
    trim_fraction: float = bounded(0.2, "[0, 0.5)")
    # Leave out whole updates before any rule averages (at most (K - 1) // 2 of
    # K, none below 3): "cosine" those whose mean cosine to the round's other
    # updates is below min_cosine, "krum" those Multi-Krum scores worst; "auto"
    # is cosine, and none with DP or SecAgg+ (ExperimentConfig.update_filter).
    filter: UpdateFilter = "auto"
    # The cosine filter's threshold: in round 1 of the main job the ten honest
    # updates score -0.014 to 0.196, a sign-flipped one about minus its own score.
    min_cosine: float = bounded(-0.05, "[-1, 1]")
    # An evaluation reply's loss above eval_loss_factor x the round's lower-median
    # evaluation loss is clipped or dropped as norm_guard says (wider than the
    # update guard: honest clients' losses spread more than their update norms).
    eval_loss_factor: float = bounded(
        10.0, AT_LEAST_1, why="a multiple of the median evaluation loss"
    )
    # An evaluation reply's example count is capped at eval_weight_cap x the
    # round's lower-median count (0: off; weight_cap's twin, apart so that a
    # skewed split can keep plain example weights in its reported metrics).
    eval_weight_cap: float = bounded(
        1.5, AT_LEAST_1, off=0.0, why="a multiple of the median example count"
    )

    def __post_init__(self) -> None:
        """Check the fields."""
        check_section(self, "guards")


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018).

    Each update is clipped to ``clip_norm``, clients weigh equally, and Gaussian
    noise of std ``noise_multiplier * clip_norm / m`` is added to the mean of the
    m updates. Epsilon at ``delta`` is reported every round.
    """

    noise_multiplier: float = bounded(0.0, AT_LEAST_0, why="0: no differential privacy")
    clip_norm: float = bounded(1.0, ABOVE_0)
    delta: float = bounded(1e-5, "(0, 1)")

    def __post_init__(self) -> None:
        """Check the fields."""
        check_section(self, "privacy")


@dataclass(frozen=True)
class CompressionConfig:
    """Uplink compression of each reply's update (reply - what it started from).

    Decoded on the server before validation (lora_flwr/compression.py); the
    downlink stays float32.
    """

    # none (float32), fp16, bf16, int8 (a scale per row/column), or topk (the
    # topk_fraction largest entries, with error feedback on the client).
    codec: Compression = "none"
    topk_fraction: float = bounded(0.1, _SHARE)

    def __post_init__(self) -> None:
        """Check the fields."""
        check_section(self, "compression")


@dataclass(frozen=True)
class HeadConfig:
    """The saved modules (lora.modules_to_save, e.g. a new classifier head)."""

    # averaged (trained, sent and averaged like the factors), frozen (trained and
    # averaged for warmup_rounds rounds, then fixed), local (trained and kept on
    # each client, never sent; federated evaluation uses each client's own),
    # reinit (every round each client trains it from the seeded init; the server
    # averages those).
    mode: HeadMode = "averaged"
    warmup_rounds: int = bounded(0, AT_LEAST_0)
    # Server-side head refit (lora_flwr/aggregation/lda.py): none, or lda: after
    # every round (and before the first) every client sends the class counts,
    # per-class sums and second moments of the head's inputs on its training
    # split; the server sets the head to the linear discriminant of their exact
    # sums (shared covariance shrunk by lda_shrinkage * tr/d * I, the pooled label
    # prior). Classification only; the head must be received (averaged or
    # frozen), and SecAgg / DP do not cover the statistics.
    calibration: HeadCalibration = "none"
    lda_shrinkage: float = bounded(1e-3, AT_LEAST_0)
    # Examples per client the statistics are computed on (0: all, exact). Above
    # 0, a stratified sample of about that many, scaled back to the exact class
    # counts: unbiased, and the forward pass costs at most that many examples.
    lda_max_examples: int = bounded(0, AT_LEAST_0, why="0: every training example")
    # Refit before round 1, after every lda_every-th round and after the last:
    # each refit costs a forward pass over every client's training split.
    lda_every: int = bounded(1, AT_LEAST_1)

    def __post_init__(self) -> None:
        """Check the fields."""
        check_section(self, "head")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (Flower's SecAgg+ workflow, Bell et al., CCS 2020).

    The server learns only the weighted sum of what clients send. Each client
    multiplies its reply by ``num_examples / max_weight``, and every value of that
    must lie within ``+-clip`` (the client refuses to send otherwise: SecAgg+
    would clip it silently); values are quantised to 2**22 levels over that
    range. Each client shares its keys with ``shares`` x the sampled clients;
    ``threshold`` x those shares rebuild a dropped client's mask. Only for plain
    weighted-sum rules at one rank; the server sees no single update, so its
    guards (norm_guard, weight_cap, robust, DP) must be off.
    """

    enabled: bool = False
    clip: float = bounded(2.0, ABOVE_0)
    max_weight: float = bounded(
        1000.0, AT_LEAST_1, why="the largest example count a client may have"
    )
    shares: float = bounded(1.0, _SHARE)
    threshold: float = bounded(0.67, _SHARE)

    def __post_init__(self) -> None:
        """Check the fields."""
        check_section(self, "secagg")
