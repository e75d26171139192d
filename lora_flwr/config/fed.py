"""The ``[fed]`` section: rounds, sampling, aggregation, guards, privacy, evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from lora_flwr.config.choices import (
    Compression,
    HeadCalibration,
    HeadMode,
    NormGuard,
    Robust,
    ServerOptimizer,
)
from lora_flwr.config.fields import (
    ABOVE_0,
    AT_LEAST_0,
    AT_LEAST_1,
    bounded,
    check_fields,
    nonempty,
)
from lora_flwr.config.owners import parse_partition_owners
from lora_flwr.config.refusals import check_refusals

# A share of the clients; a count of them.
_SHARE = "(0, 1]"
_CLIENTS = "[1, num_clients]"


@dataclass(frozen=True)
class FedConfig:
    """Federated rounds, sampling, aggregation and evaluation."""

    num_rounds: int = bounded(5, AT_LEAST_1)
    num_clients: int = bounded(10, AT_LEAST_1)  # partitions = simulated SuperNodes
    # share of available clients trained per round
    fraction_fit: float = bounded(1.0, _SHARE)
    # Share evaluated per round (0: no federated eval; a personalised rule such as
    # fedsa then evaluates every client at each evaluation round).
    fraction_evaluate: float = bounded(0.0, "[0, 1]")
    # wait for (and require) at least this many replies
    min_fit_clients: int = bounded(2, _CLIENTS)
    min_evaluate_clients: int = bounded(2, _CLIENTS)
    min_available_clients: int = bounded(2, _CLIENTS)
    # Rule name in lora_flwr.aggregation: fedit, ffa, fedsa, rolora, flora, fedex,
    # hetlora, flexlora, fedsvd.
    aggregation: str = nonempty("fedit")
    # Client ranks, assigned to partitions deterministically from the seed (e.g.
    # "4,8,16"); empty: every client at lora.r. lora.r must be the largest tier.
    rank_tiers: tuple[int, ...] = bounded((), AT_LEAST_1)
    # Server optimizer on the pseudo-gradient of what the rule averaged (Reddi et
    # al., ICLR 2021): none, fedavgm, fedadagrad, fedadam, fedyogi.
    server_optimizer: ServerOptimizer = "none"
    server_lr: float = bounded(1.0, ABOVE_0)  # server learning rate eta
    # momentum (FedAvgM's beta, FedAdam/FedYogi's beta_1)
    server_beta1: float = bounded(0.9, "[0, 1)")
    # second-moment decay (FedAdam, FedYogi)
    server_beta2: float = bounded(0.99, "[0, 1)")
    # adaptivity tau (FedAdagrad, FedAdam, FedYogi)
    server_tau: float = bounded(1e-3, ABOVE_0)
    # FedProx proximal term mu on the client (0: off)
    prox_mu: float = bounded(0.0, AT_LEAST_0)
    # client lr in round t = train.lr * lr_decay ** (t - 1)
    lr_decay: float = bounded(1.0, "(0, 1]")
    # centralised evaluation every N rounds (0: only at the end)
    eval_every: int = bounded(1, AT_LEAST_0)
    # The server's centralised evaluation of round t runs in a background thread
    # while round t + 1's messages travel and its clients train; round t's history
    # row and checkpoint are written when it is done. Same numbers either way. Pays
    # off when the ServerApp has cores of its own (a deployment's server machine);
    # where it shares them with the clients (the simulation, a one-machine
    # deployment) the two compete (docs/BENCHMARKS.md).
    eval_overlap: bool = False
    # reject replies whose update norm exceeds this (0: off)
    max_update_norm: float = bounded(0.0, AT_LEAST_0)
    # A round aggregates when at least this many replies pass validation; fewer
    # keep the global adapter unchanged for that round.
    min_fit_replies: int = bounded(1, _CLIENTS)
    # The run stops (non-zero exit) after this many consecutive rounds without an
    # aggregate (every client failed or was dropped).
    max_failed_rounds: int = bounded(2, AT_LEAST_0)
    # Robustness against a hostile client (on by default). A reply's example count
    # is capped at weight_cap x the round's lower-median count (0: off) ...
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
    # Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018):
    # each update is clipped to dp_clip_norm, clients weigh equally, and Gaussian
    # noise of std dp_noise_multiplier * dp_clip_norm / m is added to the mean of
    # the m updates. 0: off. Epsilon at dp_delta is reported every round.
    dp_noise_multiplier: float = bounded(
        0.0, AT_LEAST_0, why="0: no differential privacy"
    )
    dp_clip_norm: float = bounded(1.0, ABOVE_0)
    dp_delta: float = bounded(1e-5, "(0, 1)")
    # Uplink compression of each reply's update (reply - what the client started
    # from), decoded on the server before validation (lora_flwr/compression.py):
    # none (float32), fp16, bf16, int8 (a scale per row/column), or topk (the
    # topk_fraction largest entries, with error feedback on the client). The
    # downlink stays float32.
    compression: Compression = "none"
    topk_fraction: float = bounded(0.1, _SHARE)
    # The saved modules (lora.modules_to_save, e.g. the new classifier head):
    # averaged (trained, sent and averaged like the factors), frozen (trained and
    # averaged for head_warmup_rounds rounds, then fixed), local (trained and kept
    # on each client, never sent; federated evaluation uses each client's own),
    # reinit (every round each client trains it from the seeded init; the server
    # averages those).
    head: HeadMode = "averaged"
    head_warmup_rounds: int = bounded(0, AT_LEAST_0)
    # Server-side head refit (lora_flwr/aggregation/lda.py): none, or lda: after
    # every round (and before the first) every client sends the class counts,
    # per-class sums and second moments of the head's inputs on its training
    # split; the server sets the head to the linear discriminant of their exact
    # sums (shared covariance shrunk by lda_shrinkage * tr/d * I, the pooled label
    # prior). Classification only; the head must be received (averaged or
    # frozen), and SecAgg / DP do not cover the statistics.
    head_calibration: HeadCalibration = "none"
    lda_shrinkage: float = bounded(1e-3, AT_LEAST_0)
    # Examples per client the statistics are computed on (0: all, exact). Above
    # 0, a stratified sample of about that many, scaled back to the exact class
    # counts: unbiased, and the forward pass costs at most that many examples.
    lda_max_examples: int = bounded(0, AT_LEAST_0, why="0: every training example")
    # Refit before round 1, after every lda_every-th round and after the last:
    # each refit costs a forward pass over every client's training split.
    lda_every: int = bounded(1, AT_LEAST_1)
    # Secure aggregation (Flower's SecAgg+ workflow, Bell et al., CCS 2020): the
    # server learns only the weighted sum of what clients send. Each client
    # multiplies its reply by num_examples / secagg_max_weight, and every value of
    # that must lie within +-secagg_clip (the client refuses to send otherwise:
    # SecAgg+ would clip it silently); values are quantised to 2**22 levels over
    # that range. Each client shares its keys with secagg_shares x the sampled
    # clients; secagg_threshold x those shares rebuild a dropped client's mask.
    # Only for plain weighted-sum rules at one rank; the server sees no single
    # update, so its guards (norm_guard, weight_cap, robust, DP) must be off.
    secagg: bool = False
    secagg_clip: float = bounded(2.0, ABOVE_0)
    secagg_max_weight: float = bounded(
        1000.0, AT_LEAST_1, why="the largest example count a client may have"
    )
    secagg_shares: float = bounded(1.0, _SHARE)
    secagg_threshold: float = bounded(0.67, _SHARE)
    # Deployment under SuperNode authentication: which registered key owns which
    # partition, "SHA256:<fingerprint>=<partition>,..." (ssh-keygen -lf). A node
    # then gets the partition its key owns, never one it merely claims. "": off.
    partition_owners: str = ""
    client_num_cpus: float = bounded(1.0, ABOVE_0)  # Ray resources per client
    client_num_gpus: float = bounded(0.0, AT_LEAST_0)

    def __post_init__(self) -> None:
        """Check the fields, the owners table and the fed section's refusals."""
        check_fields(self, "fed.")
        parse_partition_owners(self.partition_owners, self.num_clients)
        check_refusals(self, "fed")
