"""FedLoRA: a Flower strategy that runs a LoRA-aware rule with per-client plans.

One round, as Flower's server drives it::

    configure_fit    learn new nodes' partition ids (the simulation engine's map,
                     or get_properties, once per node); sample
                     partitions with a seeded generator; for each client ask the
                     rule for its plan (rank, groups, base-weight catch-up) and its
                     payload; send one FitIns per client
    aggregate_fit    validate every reply against what that client's plan expects
                     (count, names, dtype, shape, finite, norm against what it
                     started from); drop bad ones with a warning; run the rule on
                     the rest, then the server optimizer; keep the global state if
                     too few remain or the result is not finite
    evaluate         centralised evaluation of the global adapter (+ base delta);
                     with ``fed.eval_overlap`` it runs in a background thread
                     during the next round, and the round's history row and
                     checkpoint wait for it
    configure/aggregate_evaluate   federated evaluation on the clients' local
                     splits; for a personalised rule (FedSA) this is the
                     evaluation: each client's own model on its own split

Bytes are counted per client from the serialized tensors actually sent and received:
under ``fed.compression`` that is the encoded reply, decoded in ``_check_reply``
before any other check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from lora_flwr.aggregation import (
    ClientInfo,
    ClientReply,
    Rule,
    ServerOptimizer,
    ServerState,
    get_rule,
)
from lora_flwr.aggregation.lda import (
    ClassStats,
    decode_stats,
    head_weight_names,
    lda_head,
    merge_stats,
)
from lora_flwr.aggregation.robust import clip_update
from lora_flwr.compression import decode_reply
from lora_flwr.config import ExperimentConfig
from lora_flwr.fl.checkpoint import Checkpoint
from lora_flwr.fl.directory import PartitionDirectory
from lora_flwr.fl.guards import (
    RunAborted,
    clean_metrics,
    guard_replies,
    is_finite_number,
)
from lora_flwr.fl.owners import node_fingerprints, owned_partition, parse_owners
from lora_flwr.fl.sampling import (
    EVALUATE_STREAM,
    FIT_STREAM,
    assign_rank_tiers,
    sample_count,
    sample_partitions,
)
from lora_flwr.privacy import epsilon
from lora_flwr.profiling import (
    HANDSHAKE,
    ClientCall,
    PhaseTimer,
    client_call,
    maybe_phase,
    round_profile,
)
from lora_flwr.protocol import (
    ACCURACY,
    BASE_VERSION,
    COMPRESSION,
    FIT_CALLS,
    HEAD_STATS,
    LOCAL_STEPS,
    LR,
    MODEL_LOADS,
    NUM_TOKENS,
    PARTITION_ID,
    PERPLEXITY,
    PROX_MU,
    ROUND,
    SECONDS,
    TOPK_FRACTION,
    TRAIN_LOSS,
    WORKER_PID,
    AdapterLayout,
    Plan,
    pair_names,
)
from lora_flwr.validation import check_arrays, update_norm

NDArray = npt.NDArray[np.float32]
Arrays = dict[str, NDArray]
# Centralised evaluation: (round, global adapter by name, base delta by module).
EvaluateFn = Callable[[int, Arrays, Arrays], dict[str, float]]
RoundCallback = Callable[[dict[str, Any], "RoundView"], None]


# Seconds a node may take to report its partition (a deployed node starts a fresh
# ClientApp process per message); one that does not answer is asked again next round.
HANDSHAKE_TIMEOUT = 600.0
# Seconds to wait for the simulation engine's partition map once nodes are seen.
DIRECTORY_TIMEOUT = 60.0


def parameters_nbytes(parameters: Parameters) -> int:
    """Bytes of the serialized tensors in ``parameters``."""
    return sum(len(t) for t in parameters.tensors)


def stats_reply(
    res: EvaluateRes | BaseException, num_labels: int, dim: int
) -> ClassStats:
    """Read one node's answer to a ``head_stats`` instruction, checking it.

    Raises
    ------
    ValueError
        If the call failed, its status is not OK, or the statistics are malformed
        or inconsistent (their counts must add up to the reply's ``num_examples``).
    """
    if isinstance(res, BaseException):
        raise ValueError(f"no reply: {res!r}")
    if res.status.code != Code.OK:
        raise ValueError(f"status {res.status.code}: {res.status.message}")
    stats = decode_stats(res.metrics.get(HEAD_STATS), num_labels, dim)
    if stats.total != res.num_examples:
        raise ValueError(
            f"counts add up to {stats.total} but the reply says "
            f"num_examples={res.num_examples}"
        )
    return stats


class RoundView(Protocol):
    """What ``on_round_end`` reads: the history so far and the round's state.

    The strategy itself, or (under ``fed.eval_overlap``) the state a round ended
    with, kept until its evaluation finished.
    """

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every record up to and including the one being reported."""
        ...

    @property
    def state(self) -> ServerState:
        """The server state after the reported round."""
        ...

    def global_arrays(self) -> Arrays:
        """Return the global adapter after the reported round."""
        ...

    def counters(self, server_round: int) -> dict[str, Any]:
        """Return what a checkpoint after the reported round needs beyond the state."""
        ...


@dataclass(frozen=True)
class _RoundSnapshot:
    """A finished round as it stood, reported once its evaluation is done."""

    history: list[dict[str, Any]]  # the strategy's list: complete when reported
    state: ServerState
    arrays: Arrays
    saved_counters: dict[str, Any]

    def global_arrays(self) -> Arrays:
        """Return the global adapter the round ended with."""
        return self.arrays

    def counters(self, server_round: int) -> dict[str, Any]:
        """Return the counters the round ended with."""
        return dict(self.saved_counters)


@dataclass
class _PendingEval:
    """A centralised evaluation running in the background (``fed.eval_overlap``)."""

    server_round: int
    future: Future[tuple[dict[str, float], float]]
    target: dict[str, Any]  # the record its metrics go into
    # Finished records waiting for the metrics, with the state each ended with.
    held: list[tuple[dict[str, Any], _RoundSnapshot]] = field(default_factory=list)


def _copied(arrays: Mapping[str, NDArray]) -> Arrays:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def _timed_eval(
    evaluate_fn: EvaluateFn, server_round: int, arrays: Arrays, base_delta: Arrays
) -> tuple[dict[str, float], float]:
    """Run ``evaluate_fn``; return its metrics and the seconds it took."""
    start = time.perf_counter()
    metrics = evaluate_fn(server_round, arrays, base_delta)
    return metrics, time.perf_counter() - start


def _eval_fields(metrics: Mapping[str, float], seconds: float) -> dict[str, Any]:
    """Return the history fields of one centralised evaluation."""
    return {**{f"test_{k}": v for k, v in metrics.items()}, "eval_seconds": seconds}


@dataclass(frozen=True)
class _Sent:
    """What the server sent one client this round (to check its reply against)."""

    partition: int
    plan: Plan
    start: Arrays
    nbytes: int


def build_rule(cfg: ExperimentConfig, layout: AdapterLayout, initial: Arrays) -> Rule:
    """Instantiate ``fed.aggregation`` and refuse combinations that make no sense.

    Raises
    ------
    ValueError
        On an unknown rule, rank tiers the rule cannot hold, or a server optimizer,
        robust average or DP it cannot use (one line naming the keys).
    """
    rule = get_rule(cfg.fed.aggregation)(layout, initial, cfg.lora.scaling)
    rule.check_config(cfg.fed)
    if cfg.fed.robust != "none":
        rule.use_robust(cfg.fed.robust, cfg.fed.trim_fraction)
    if cfg.fed.dp_noise_multiplier > 0:
        rule.use_dp(cfg.fed.dp_noise_multiplier, cfg.fed.dp_clip_norm)
    rule.use_head(cfg.fed.head, cfg.fed.head_warmup_rounds)
    return rule


def build_optimizer(cfg: ExperimentConfig) -> ServerOptimizer | None:
    """Return the configured server optimizer, or None."""
    fed = cfg.fed
    if fed.server_optimizer == "none":
        return None
    return ServerOptimizer(
        fed.server_optimizer,
        lr=fed.server_lr,
        beta1=fed.server_beta1,
        beta2=fed.server_beta2,
        tau=fed.server_tau,
    )


class FedLoRA(Strategy):
    """Federated LoRA with per-client plans, validated replies and a named rule.

    Parameters
    ----------
    cfg
        The experiment (sampling, rounds, lr schedule, rule, optimizer, tiers).
    layout
        Adapter weight names and allocated shapes.
    initial
        The seeded starting adapter by weight name.
    evaluate_fn
        Centralised evaluation ``evaluate_fn(round, arrays, base_delta)`` returning
        metrics with a ``loss`` key, or None.
    on_round_end
        Called with each round's record and a :class:`RoundView` (the strategy,
        or under ``fed.eval_overlap`` the state the round ended with) once the
        record is complete (save checkpoints, write history, print the row).
    partitions
        The simulation engine's node -> partition map (in-process simulation), or
        None: nodes are then asked for their partition, once each.
    """

    def __init__(
        self,
        *,
        cfg: ExperimentConfig,
        layout: AdapterLayout,
        initial: Mapping[str, NDArray],
        evaluate_fn: EvaluateFn | None = None,
        on_round_end: RoundCallback | None = None,
        resume: Checkpoint | None = None,
        history: Sequence[dict[str, Any]] = (),
        partitions: PartitionDirectory | None = None,
    ) -> None:
        super().__init__()
        self.directory = partitions
        # Nodes whose reply contradicted the directory: asked from then on.
        self._ask_only: set[str] = set()
        self._asked = 0  # get_properties messages sent this round
        self.cfg = cfg
        self.fed = cfg.fed
        self.layout = layout
        self.rule = build_rule(cfg, layout, dict(initial))
        self.optimizer = build_optimizer(cfg)
        self.state: ServerState = self.rule.init_state()
        self.ranks = assign_rank_tiers(
            cfg.fed.rank_tiers, cfg.fed.num_clients, seed=cfg.seed, default=cfg.lora.r
        )
        self.evaluate_fn = evaluate_fn
        self.on_round_end = on_round_end
        self.overlap_eval = cfg.fed.eval_overlap
        self._pending: _PendingEval | None = None
        self._eval_pool: ThreadPoolExecutor | None = None
        self.history: list[dict[str, Any]] = []
        self.partition_of: dict[str, int] = {}  # node (cid) -> partition id
        # Base version each partition holds; None: unknown (gets the whole delta).
        self.versions: dict[int, int | None] = {}
        self._sent: dict[str, _Sent] = {}
        self._record: dict[str, Any] = {}
        self._round_start = 0.0
        # train.profile: the round's server phases and the clients' call profiles.
        self._prof: PhaseTimer | None = None
        self._prof_calls: list[ClientCall] = []
        self._handshake_seconds = 0.0  # this round's time learning new nodes
        self.failed_rounds = 0  # consecutive rounds without an aggregate
        self._last_failure = ""
        self.aggregated_rounds = 0
        self.offset = 0  # rounds done before this server started (resume)
        self.dp_rounds = 0  # rounds that released a noisy aggregate
        # Key fingerprint -> partition (deployment under node authentication).
        self.owners = parse_owners(cfg.fed.partition_owners, cfg.fed.num_clients)
        # fed.head_calibration: the head's (weight, bias) names, and the client
        # manager the refit asks every node through (kept from Flower's calls).
        self._client_manager: ClientManager | None = None
        self._lda_names: tuple[str, str] | None = None
        if self.fed.head_calibration == "lda":
            if self.rule.personalized:
                raise ValueError(
                    f"fed.head_calibration = 'lda' needs a global model; "
                    f"fed.aggregation = {self.fed.aggregation!r} keeps part of it "
                    "on the clients"
                )
            self._lda_names = head_weight_names(
                layout.names, layout.shapes, cfg.model.num_labels
            )
        if resume is not None:
            self._restore(resume, history)

    def __repr__(self) -> str:
        """Name shown in Flower's logs."""
        return f"FedLoRA(aggregation={self.fed.aggregation!r})"

    # ---------------------------------------------------------------- setup
    def counters(self, server_round: int) -> dict[str, Any]:
        """Return what a checkpoint after ``server_round`` needs beyond the state."""
        return {
            "round": server_round,
            "failed_rounds": self.failed_rounds,
            "aggregated_rounds": self.aggregated_rounds,
            "last_failure": self._last_failure,
            "dp_rounds": self.dp_rounds,
        }

    def _restore(self, resume: Checkpoint, history: Sequence[dict[str, Any]]) -> None:
        """Continue after the checkpointed round: state, counters, history.

        Nodes are new to this server: their partitions are asked again, and their
        base versions are unknown (a merging rule sends them the whole delta).
        """
        counters = resume.counters
        done = int(counters["round"])
        if not 0 < done < self.fed.num_rounds:
            raise ValueError(
                f"cannot resume after round {done} of fed.num_rounds="
                f"{self.fed.num_rounds}"
            )
        check_arrays(resume.state.arrays, self.layout.items(), what="checkpoint")
        self.state = resume.state
        self.offset = done
        self.failed_rounds = int(counters.get("failed_rounds", 0))
        self.aggregated_rounds = int(counters.get("aggregated_rounds", 0))
        self._last_failure = str(counters.get("last_failure", ""))
        self.dp_rounds = int(counters.get("dp_rounds", 0))
        self.history = [dict(r) for r in history if int(r.get("round", 0)) <= done]
        rounds = [int(r.get("round", -1)) for r in self.history]
        if rounds != list(range(done + 1)):
            raise ValueError(
                f"history to resume holds rounds {rounds}; expected 0..{done}"
            )
        self.versions = {pid: None for pid in range(self.fed.num_clients)}

    def global_arrays(self) -> Arrays:
        """Return the global adapter at the allocated rank, by weight name."""
        return self.rule.global_arrays(self.state)

    def _as_parameters(self) -> Parameters:
        arrays = self.global_arrays()
        with self._phase("server_serialization"):
            return ndarrays_to_parameters([arrays[n] for n in self.layout.names])

    def _phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time a block as a server phase of the round (``train.profile`` only)."""
        return maybe_phase(self._prof, name)

    def _note_calls(
        self, stage: str, results: Sequence[tuple[ClientProxy, FitRes | EvaluateRes]]
    ) -> None:
        """Keep the call profiles the clients sent (dropped replies' too)."""
        if self._prof is None:
            return
        for i, (_, res) in enumerate(results):
            worker = res.metrics.get(WORKER_PID, f"unknown-{stage}-{i}")
            call = client_call(stage, res.metrics, worker)
            if call is not None:
                self._prof_calls.append(call)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Start from the seeded initial adapter (the rule's state at round 0)."""
        self._client_manager = client_manager
        return self._as_parameters()

    def _learn_partitions(
        self, client_manager: ClientManager, server_round: int
    ) -> None:
        """Learn the partition of every node not seen before.

        From the simulation engine's map when there is one (no message), else by
        asking each such node once (``get_properties``, in parallel).
        """
        # Virtual nodes register asynchronously: wait for the ones we mean to use.
        client_manager.wait_for(self.fed.min_available_clients, timeout=3600)
        proxies = client_manager.all()
        # A node that left frees its partition: it may come back under a new id.
        for cid in [c for c in self.partition_of if c not in proxies]:
            del self.partition_of[cid]
        unknown = [p for cid, p in proxies.items() if cid not in self.partition_of]
        if not unknown:
            return
        answers: list[tuple[str, int | None]] = []
        if self.directory is not None and not self.owners:
            # Simulation: the engine's own assignment, no message needed.
            known = self.directory.lookup(DIRECTORY_TIMEOUT)
            for proxy in unknown:
                if proxy.cid in known and proxy.cid not in self._ask_only:
                    answers.append((proxy.cid, known[proxy.cid]))
            told = {cid for cid, _ in answers}
            unknown = [p for p in unknown if p.cid not in told]
        if unknown:
            answers += self._ask_partitions(unknown, server_round)
        self._assign(answers, unknown)

    def _ask_partitions(
        self, unknown: Sequence[ClientProxy], server_round: int
    ) -> list[tuple[str, int | None]]:
        """Ask each node in ``unknown`` which partition it owns (in parallel)."""
        self._asked += len(unknown)
        ins = GetPropertiesIns(config={})

        def ask(proxy: ClientProxy) -> tuple[str, int | None]:
            try:
                res = proxy.get_properties(
                    ins, timeout=HANDSHAKE_TIMEOUT, group_id=server_round
                )
                value = res.properties.get(PARTITION_ID)
                return proxy.cid, value if isinstance(value, int) else None
            except Exception as exc:  # a node that cannot answer is skipped
                log(WARNING, "node %s did not report its partition: %r", proxy.cid, exc)
                return proxy.cid, None

        with ThreadPoolExecutor(max_workers=min(32, len(unknown))) as pool:
            return list(pool.map(ask, unknown))

    def _assign(
        self, answers: Sequence[tuple[str, int | None]], asked: Sequence[ClientProxy]
    ) -> None:
        """Record each node's partition, refusing out-of-range or taken ones."""
        claimed = set(self.partition_of.values())
        keys = self._fingerprints(asked) if self.owners else {}
        for cid, pid in sorted(answers):
            if self.owners:
                # Under node authentication the key decides, not the claim.
                pid, why = owned_partition(cid, pid, keys, self.owners)
                if pid is None:
                    log(WARNING, "%s; ignored", why)
                    continue
            if pid is None:
                continue
            if not 0 <= pid < self.fed.num_clients:
                log(
                    WARNING,
                    "node %s claims partition %s of %d; ignored",
                    cid,
                    pid,
                    self.fed.num_clients,
                )
                continue
            if pid in claimed:
                log(
                    WARNING,
                    "node %s claims partition %d, already owned; ignored",
                    cid,
                    pid,
                )
                continue
            self.partition_of[cid] = pid
            claimed.add(pid)
            if pid in self.versions:
                # A returning node may have lost its state: send it everything.
                self.versions[pid] = None

    @staticmethod
    def _fingerprints(proxies: Sequence[ClientProxy]) -> dict[str, str | None]:
        """Each node's registered key fingerprint, from the deployment's grid."""
        grid = getattr(proxies[0], "grid", None) if proxies else None
        if grid is None:
            return {}
        try:
            return node_fingerprints(grid.get_nodes())
        except Exception as exc:  # a grid without node info: no node is trusted
            log(WARNING, "could not read the nodes' keys from the grid: %r", exc)
            return {}

    def _sample(
        self,
        client_manager: ClientManager,
        server_round: int,
        fraction: float,
        minimum: int,
        stream: int,
    ) -> list[tuple[ClientProxy, int]]:
        start = time.perf_counter()
        self._asked = 0
        with self._phase(HANDSHAKE):  # messages to new nodes: Flower's time
            self._learn_partitions(client_manager, server_round)
        self._handshake_seconds = time.perf_counter() - start
        proxies = client_manager.all()
        by_pid = {
            pid: proxies[cid]
            for cid, pid in self.partition_of.items()
            if cid in proxies
        }
        num = sample_count(len(by_pid), fraction, minimum)
        chosen = sample_partitions(
            list(by_pid),
            num,
            seed=self.cfg.seed,
            server_round=server_round,
            stream=stream,
        )
        return [(by_pid[pid], pid) for pid in chosen]

    def round_lr(self, server_round: int) -> float:
        """Return the client lr in a round: ``lr * lr_decay ** (round - 1)``."""
        return self.cfg.train.lr * self.fed.lr_decay ** (server_round - 1)

    def _instructions(
        self,
        clients: Sequence[tuple[ClientProxy, int]],
        server_round: int,
        evaluate: bool,
    ) -> list[tuple[ClientProxy, Parameters, dict[str, Scalar]]]:
        out = []
        self._sent = {}
        for proxy, pid in clients:
            info = ClientInfo(pid, self.ranks[pid], self.versions.get(pid, 0))
            plan = self.rule.plan(self.state, info, server_round)
            if evaluate:
                plan = plan.evaluation()
            with self._phase("server_serialization"):
                payload = self.rule.payload(self.state, plan)
                parameters = ndarrays_to_parameters(payload)
            config: dict[str, Scalar] = {ROUND: server_round, **plan.to_config()}
            if not evaluate:
                config[LR] = self.round_lr(server_round)
                config[PROX_MU] = self.fed.prox_mu
                if self.cfg.train.local_epochs == 0:
                    config[LOCAL_STEPS] = self.cfg.train.local_steps
                config[COMPRESSION] = self.fed.compression
                config[TOPK_FRACTION] = self.fed.topk_fraction
            start = self.rule.start_arrays(self.state, plan)
            self._sent[proxy.cid] = _Sent(
                pid, plan, start, parameters_nbytes(parameters)
            )
            out.append((proxy, parameters, config))
        return out

    # ------------------------------------------------------------------ fit
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send each sampled client its own plan and payload."""
        server_round += self.offset  # Flower counts from 1 again after a resume
        self._client_manager = client_manager
        self._round_start = time.perf_counter()
        started_at = time.time()
        self._prof = PhaseTimer() if self.cfg.train.profile else None
        self._prof_calls = []
        with self._phase("server_other"):
            clients = self._sample(
                client_manager,
                server_round,
                self.fed.fraction_fit,
                self.fed.min_fit_clients,
                FIT_STREAM,
            )
            instructions = self._instructions(clients, server_round, evaluate=False)
        down = [s.nbytes for s in self._sent.values()]
        self._record = {
            "round": server_round,
            # Wall clock (epoch seconds): where a round sits in a run's timeline.
            "started_at": started_at,
            "handshake_seconds": self._handshake_seconds,
            "handshake_messages": self._asked,
            "lr": self.round_lr(server_round),
            "fit_sampled": len(clients),
            "fit_partitions": ",".join(str(pid) for _, pid in clients),
            "bytes_down": sum(down),
            "bytes_down_fit_max": max(down, default=0),
        }
        return [(proxy, FitIns(p, c)) for proxy, p, c in instructions]

    def _check_reply(self, sent: _Sent, res: FitRes) -> ClientReply:
        """Validate one reply against its plan; raise ValueError on any fault.

        A compressed reply is decoded first (``reference + update``, the reference
        being what the client started from, zero for private groups), so every
        check below sees float32 arrays as without compression.
        """
        spec = self.rule.reply_spec(sent.plan)
        with self._phase("server_serialization"):
            arrays: Sequence[object] = parameters_to_ndarrays(res.parameters)
            if self.fed.compression != "none":
                reference = [
                    sent.start[n] if n in sent.start else np.zeros(s, np.float32)
                    for n, s in spec
                ]
                arrays = decode_reply(
                    self.fed.compression,
                    arrays,
                    reference,
                    fraction=self.fed.topk_fraction,
                )
        named = pair_names(spec, arrays)
        # Under SecAgg+ the arrays are the unmasked float64 mean, checked later.
        dtype = None if self.fed.secagg else np.float32
        check_arrays(named, spec, dtype=dtype, what="reply")
        n = res.num_examples
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"num_examples={n!r} must be a positive integer")
        typed: Arrays = {k: v for k, v in named.items()}  # type: ignore[misc]
        if self.fed.max_update_norm > 0:
            norm = update_norm(typed, sent.start)
            if norm > self.fed.max_update_norm:
                raise ValueError(
                    f"update norm {norm:.4g} exceeds "
                    f"fed.max_update_norm={self.fed.max_update_norm:g}"
                )
        return ClientReply(sent.partition, sent.plan, typed, n, sent.start)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate replies, run the rule and optimizer; keep the global on faults."""
        self._note_calls("fit", results)
        with self._phase("server_aggregation"):
            return self._aggregate_fit(server_round, results, failures)

    def _aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.offset  # Flower counts from 1 again after a resume
        rec = self._record
        rec["fit_done_at"] = time.time()
        up = [parameters_nbytes(res.parameters) for _, res in results]
        rec["bytes_up"] = sum(up)
        rec["bytes_up_max"] = max(up, default=0)
        for failure in failures:
            who = failure[0].cid if isinstance(failure, tuple) else "?"
            # It may have folded before failing: send it the whole delta next.
            self._note_version(self._sent.get(who), None)
            # One line (the innermost error): the full Ray traceback is Flower's.
            self._last_failure = _failure_text(failure)
            log(
                WARNING,
                "round %d: client %s failed: %s",
                server_round,
                who,
                self._last_failure,
            )
        replies, metrics, dropped = self._valid_replies(server_round, results)
        replies, report = guard_replies(
            replies,
            weight_cap=self.fed.weight_cap,
            norm_guard=self.fed.norm_guard,
            norm_factor=self.fed.norm_guard_factor,
        )
        for warning in report.warnings:
            log(WARNING, "round %d: %s", server_round, warning)
        fit_ok = len(replies)
        if self.fed.secagg:
            # Uploads are masked vectors that only Flower's workflow sees.
            rec.pop("bytes_up", None)
            rec.pop("bytes_up_max", None)
            replies = self._secagg_reply(server_round, results, replies, dropped)
            fit_ok = fit_ok if replies else 0
        failed = len(failures)
        if self.fed.secagg:
            # Flower's SecAgg+ workflow lists each failed node twice (1.42): count
            # the sampled clients that sent no masked vector instead.
            failed = int(rec.get("fit_sampled", 0)) - len(results)
        rec.update(fit_ok=fit_ok, fit_failed=failed, fit_dropped=dropped)
        rec.update(
            weight_capped=report.weight_capped,
            norm_clipped=report.norm_clipped,
            norm_rejected=report.norm_rejected,
        )
        if report.norm_bound is not None:
            rec["norm_bound"] = report.norm_bound
        if self.fed.dp_noise_multiplier > 0:
            replies = self._dp_clip(replies, rec)
        rec.update(_fit_metrics(metrics))
        if not replies or fit_ok < self.fed.min_fit_replies:
            log(
                WARNING,
                "round %d: %d valid replies < fed.min_fit_replies=%d; the global "
                "adapter is kept unchanged",
                server_round,
                fit_ok,
                self.fed.min_fit_replies,
            )
            rec["aggregated"] = False
            return None, {}
        replies.sort(key=lambda r: r.partition)  # sums in a fixed order
        try:
            new = self._aggregate(self.state, replies, server_round)
        except Exception as exc:  # a broken aggregate must not become the global
            log(
                ERROR,
                "round %d: aggregation failed, global kept: %s",
                server_round,
                exc,
            )
            rec["aggregated"] = False
            return None, {}
        self.state = new
        rec["aggregated"] = True
        if self.fed.dp_noise_multiplier > 0:
            self.dp_rounds += 1
            self._dp_account(rec)
        rec["base_version"] = new.base_version
        out: dict[str, Scalar] = {
            k: v for k, v in rec.items() if isinstance(v, int | float | str)
        }
        return self._as_parameters(), out

    def _valid_replies(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]]
    ) -> tuple[list[ClientReply], list[tuple[int, Mapping[str, Scalar]]], int]:
        """Validate each reply against its plan; drop (and count) bad ones."""
        replies: list[ClientReply] = []
        metrics: list[tuple[int, Mapping[str, Scalar]]] = []
        dropped = 0
        for proxy, res in results:
            sent = self._sent.get(proxy.cid)
            try:
                if sent is None:
                    raise ValueError("this node was not sent a fit instruction")
                clean, problems = clean_metrics(res.metrics)
                for problem in problems:
                    log(
                        WARNING,
                        "round %d: client %s (partition %d): %s; ignored",
                        server_round,
                        proxy.cid,
                        sent.partition,
                        problem,
                    )
                reported = clean.get(PARTITION_ID)
                if isinstance(reported, int) and reported != sent.partition:
                    # Trained on other data than the server counts it for: ask
                    # the node again next round instead of trusting the map.
                    self.partition_of.pop(proxy.cid, None)
                    self._ask_only.add(proxy.cid)
                    raise ValueError(
                        f"it reports partition {reported} but was sampled as "
                        f"partition {sent.partition}"
                    )
                self._note_version(sent, clean.get(BASE_VERSION))
                reply = self._check_reply(sent, res)
            except Exception as exc:  # any malformed reply is dropped, never fatal
                dropped += 1
                log(
                    WARNING,
                    "round %d: dropped reply of client %s (partition %s): %s",
                    server_round,
                    proxy.cid,
                    sent.partition if sent else "?",
                    exc,
                )
                continue
            replies.append(reply)
            metrics.append((reply.num_examples, clean))
        return replies, metrics, dropped

    def _secagg_reply(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        replies: Sequence[ClientReply],
        dropped: int,
    ) -> list[ClientReply]:
        """Turn SecAgg+'s one aggregate into the single reply the rule averages.

        Flower's SecAgg+ workflow unmasks only the example-weighted mean of what
        the clients sent and hands it to ``aggregate_fit`` as every result's
        parameters. The rule then averages one reply: for a plain weighted-sum
        rule that is the same global as averaging the clients' replies, up to
        SecAgg+'s quantisation error. A reply that fails validation cannot be
        taken out of the sum, so the round keeps the global adapter.
        """
        if not replies:
            return []
        if dropped:
            log(
                WARNING,
                "round %d: %d invalid replies are inside the SecAgg+ sum and cannot "
                "be taken out; the global adapter is kept unchanged",
                server_round,
                dropped,
            )
            return []
        first = results[0][1].parameters
        if any(res.parameters.tensors != first.tensors for _, res in results):
            raise RuntimeError(
                "fed.secagg: results carry different parameters; Flower's SecAgg+ "
                "workflow did not run (is the ServerApp built by make_server_app?)"
            )
        plan = replies[0].plan
        if any(r.plan != plan for r in replies):
            raise RuntimeError("fed.secagg: the clients of a round had different plans")
        spec = self.rule.reply_spec(plan)
        named = pair_names(spec, parameters_to_ndarrays(first))
        check_arrays(named, spec, dtype=None, what="SecAgg+ aggregate")
        mean: Arrays = {n: np.asarray(a, dtype=np.float32) for n, a in named.items()}
        total = sum(r.num_examples for r in replies)
        return [ClientReply(replies[0].partition, plan, mean, total, replies[0].start)]

    def _dp_clip(
        self, replies: Sequence[ClientReply], rec: dict[str, Any]
    ) -> list[ClientReply]:
        """Clip every update (reply - start) to norm ``fed.dp_clip_norm``.

        The same flat clipping as Flower's DP strategies, done by the norm guard's
        :func:`clip_update` on the names each client sent.
        """
        out = []
        clipped = 0
        for reply in replies:
            if update_norm(reply.arrays, reply.start) > self.fed.dp_clip_norm:
                clipped += 1
                arrays = clip_update(reply.arrays, reply.start, self.fed.dp_clip_norm)
                reply = dataclasses.replace(reply, arrays=arrays)
            out.append(reply)
        rec["dp_clipped"] = clipped
        return out

    def _dp_account(self, rec: dict[str, Any]) -> None:
        """Record the noise std and the privacy spent so far (epsilon at delta)."""
        fed = self.fed
        sampled = sample_count(fed.num_clients, fed.fraction_fit, fed.min_fit_clients)
        rec["dp_noise_std"] = (
            fed.dp_noise_multiplier * fed.dp_clip_norm / max(1, rec.get("fit_ok", 1))
        )
        for key, amplified in (("dp_epsilon", True), ("dp_epsilon_unamplified", False)):
            rec[key] = epsilon(
                noise_multiplier=fed.dp_noise_multiplier,
                num_clients=fed.num_clients,
                sampled=sampled,
                rounds=self.dp_rounds,
                delta=fed.dp_delta,
                amplified=amplified,
            )

    def _aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        new = self.rule.update(state, replies, server_round)
        # Under SecAgg+ the single reply is already the mean: no per-client error.
        if not self.fed.secagg:
            self._record["agg_error"] = self.rule.aggregation_error(state, new, replies)
        if self.optimizer is not None:
            names = self.rule.averaged_names(replies)
            opt_state = {k: v for k, v in state.extra.items() if k.startswith("opt.")}
            arrays, opt_state = self.optimizer.step(
                state.arrays, new.arrays, names, opt_state
            )
            new = new.replace(
                arrays={**new.arrays, **arrays}, extra={**new.extra, **opt_state}
            )
        check_arrays(new.arrays, self.layout.items(), what="aggregate")
        for module, delta in new.base_delta.items():
            if not np.isfinite(delta).all():
                raise ValueError(f"base delta of {module}: contains NaN or Inf")
        return new

    # ------------------------------------------------------------- evaluate
    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Evaluate centrally: round 0, every ``eval_every`` rounds and the last.

        A personalised rule has no global model: its evaluation is federated.
        After a resume, Flower's round-0 evaluation is skipped (history has it).
        With :attr:`overlap_eval`, every round but the last is evaluated in a
        background thread: the previous round's evaluation is waited for first,
        and Flower gets None (the metrics go to this strategy's history).
        """
        if self.offset and server_round == 0:
            return None
        server_round += self.offset
        self._settle_eval()
        # The head is refitted first (before round 1 too), so that the evaluation,
        # the saved adapter and the next round's clients all get it.
        calib = self._calibrate_head(server_round) if self._refit(server_round) else {}
        if self.evaluate_fn is None or self.rule.personalized:
            if server_round == 0:
                self.history.append({"round": 0, **calib})
                self._emit(self.history[-1])
            else:
                self._record.update(calib)
            return None
        if not self._eval_round(server_round):
            self._record.update(calib)
            return None
        if self.overlap_eval and server_round < self.fed.num_rounds:
            self._start_eval(server_round, calib)
            return None
        with self._phase("server_evaluation"):
            metrics, seconds = _timed_eval(
                self.evaluate_fn,
                server_round,
                self.global_arrays(),
                dict(self.state.base_delta),
            )
        entry = {**_eval_fields(metrics, seconds), **calib}
        if server_round == 0:
            self.history.append({"round": 0, **entry})
            self._emit(self.history[-1])
        else:
            self._record.update(entry)
        return float(metrics["loss"]), {k: float(v) for k, v in metrics.items()}

    def _start_eval(self, server_round: int, calib: dict[str, Any]) -> None:
        """Evaluate ``server_round``'s global adapter in the background."""
        assert self.evaluate_fn is not None
        snap = self._snapshot(server_round)  # what the thread reads: a copy
        if self._eval_pool is None:
            self._eval_pool = ThreadPoolExecutor(1, thread_name_prefix="lora-flwr-eval")
        future = self._eval_pool.submit(
            _timed_eval,
            self.evaluate_fn,
            server_round,
            snap.global_arrays(),
            dict(snap.state.base_delta),
        )
        if server_round == 0:
            target: dict[str, Any] = {"round": 0, **calib}
        else:
            target = self._record
            target.update(calib)
        pending = _PendingEval(server_round, future, target)
        if server_round == 0:  # nothing else goes into round 0's record
            pending.held.append((target, snap))
        self._pending = pending

    def _snapshot(self, server_round: int) -> _RoundSnapshot:
        """Keep the state ``server_round`` ended with, to report after evaluation."""
        state = dataclasses.replace(
            self.state,
            arrays=_copied(self.state.arrays),
            base_delta=_copied(self.state.base_delta),
            extra=_copied(self.state.extra),
        )
        return _RoundSnapshot(
            history=self.history,
            state=state,
            arrays=self.rule.global_arrays(state),  # from the copy
            saved_counters=self.counters(server_round),
        )

    def _settle_eval(self) -> None:
        """Wait for the background evaluation, then report the rounds it held."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        with self._phase("server_evaluation"):  # the wait is the round's cost
            try:
                metrics, seconds = pending.future.result()
            except Exception as exc:
                raise RuntimeError(
                    f"the centralised evaluation of round {pending.server_round} "
                    f"failed: {exc}"
                ) from exc
        pending.target.update(_eval_fields(metrics, seconds))
        for rec, view in pending.held:
            self.history.append(rec)
            self._emit(rec, view)

    def _note_version(self, sent: _Sent | None, version: object) -> None:
        """Record the base version a node reports (None: unknown, send it all)."""
        if sent is not None:
            self.versions[sent.partition] = (
                version if isinstance(version, int) else None
            )

    def _refit(self, server_round: int) -> bool:
        """Whether the head is refitted after ``server_round`` (0: before round 1)."""
        if self._lda_names is None:
            return False
        every = self.fed.lda_every
        return server_round % every == 0 or server_round == self.fed.num_rounds

    def _calibrate_head(self, server_round: int) -> dict[str, Any]:
        """Refit the global head to every client's class statistics (LDA).

        Every node gets the global adapter with a ``head_stats`` evaluate
        instruction and answers with the class statistics of the head's inputs
        on its training split (:mod:`lora_flwr.aggregation.lda`). A reply that is
        malformed, inconsistent or missing is left out with a warning; if no
        reply is usable or the fit fails, the head stays as it was.

        Returns
        -------
        dict
            History fields: ``calib_clients``, ``calib_examples``,
            ``calib_seconds``, ``bytes_up_calib``, ``bytes_down_calib`` and, if
            the head was kept, ``calib_error``.
        """
        assert self._lda_names is not None
        if self._client_manager is None:
            raise RuntimeError("the head refit needs Flower's client manager")
        start = time.perf_counter()
        weight_name, bias_name = self._lda_names
        num_labels, dim = dict(self.layout.items())[weight_name]
        clients = self._sample(
            self._client_manager,
            server_round,
            1.0,
            self.fed.min_available_clients,
            EVALUATE_STREAM,
        )
        instructions = self._instructions(clients, server_round, evaluate=True)
        down = sum(s.nbytes for s in self._sent.values())

        def ask(
            item: tuple[ClientProxy, Parameters, dict[str, Scalar]],
        ) -> tuple[ClientProxy, EvaluateRes | BaseException]:
            proxy, parameters, config = item
            ins = EvaluateIns(parameters, {**config, HEAD_STATS: True})
            try:
                return proxy, proxy.evaluate(ins, timeout=None, group_id=server_round)
            except Exception as exc:  # a node that cannot answer is left out
                return proxy, exc

        with ThreadPoolExecutor(max_workers=max(1, min(32, len(instructions)))) as ex:
            answers = list(ex.map(ask, instructions))
        parts: list[ClassStats] = []
        up = 0
        for proxy, res in answers:
            sent = self._sent.get(proxy.cid)
            if isinstance(res, EvaluateRes):
                raw = res.metrics.get(HEAD_STATS)
                up += len(raw) if isinstance(raw, bytes) else 0
            try:
                stats = stats_reply(res, num_labels, dim)
                assert isinstance(res, EvaluateRes)
                clean, _ = clean_metrics(res.metrics)
                self._note_version(sent, clean.get(BASE_VERSION))
                parts.append(stats)
            except ValueError as exc:
                self._note_version(sent, None)
                log(
                    WARNING,
                    "round %d: head statistics of client %s: %s; left out",
                    server_round,
                    proxy.cid,
                    exc,
                )
        out: dict[str, Any] = {
            "calib_clients": len(parts),
            "bytes_down_calib": down,
            "bytes_up_calib": up,
        }
        try:
            if not parts:
                raise ValueError("no client sent usable statistics")
            total = merge_stats(parts)
            out["calib_examples"] = total.total
            weight, bias = lda_head(total, self.fed.lda_shrinkage)
        except ValueError as exc:
            log(WARNING, "round %d: head kept as it was: %s", server_round, exc)
            out["calib_error"] = str(exc)
        else:
            dtype = self.rule.dtype
            arrays = dict(self.state.arrays)
            arrays[weight_name] = weight.astype(dtype)
            arrays[bias_name] = bias.astype(dtype)
            check_arrays(arrays, self.layout.items(), what="refitted head")
            self.state = self.state.replace(arrays=arrays)
        out["calib_seconds"] = time.perf_counter() - start
        return out

    def _personal(self) -> bool:
        """Whether federated evaluation runs each client's own model (FedSA, head)."""
        return self.rule.personalized or self.rule.local_head

    def _eval_round(self, server_round: int) -> bool:
        every = self.fed.eval_every
        last = server_round == self.fed.num_rounds
        return server_round == 0 or last or (every > 0 and server_round % every == 0)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Federated evaluation on a share of clients (FedSA: all, by default)."""
        with self._phase("server_other"):
            return self._configure_evaluate(server_round, client_manager)

    def _configure_evaluate(
        self, server_round: int, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        server_round += self.offset  # Flower counts from 1 again after a resume
        personal = self._personal() and self._eval_round(server_round)
        if self.fed.fraction_evaluate == 0 and not personal:
            self._finish_round()
            return []
        # A personalised rule is evaluated on every client unless a share is set.
        fraction = self.fed.fraction_evaluate
        if personal and fraction == 0:
            fraction = 1.0
        clients = self._sample(
            client_manager,
            server_round,
            fraction,
            self.fed.min_evaluate_clients,
            EVALUATE_STREAM,
        )
        instructions = self._instructions(clients, server_round, evaluate=True)
        # Evaluation traffic is counted apart too: it is not part of training.
        down = sum(s.nbytes for s in self._sent.values())
        self._record["bytes_down_eval"] = down
        self._record["bytes_down"] = self._record.get("bytes_down", 0) + down
        return [(proxy, EvaluateIns(p, c)) for proxy, p, c in instructions]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Example-weighted mean of the clients' local test loss and accuracy."""
        self._note_calls("evaluate", results)
        with self._phase("server_aggregation"):
            return self._aggregate_evaluate(server_round, results, failures)

    def _aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        server_round += self.offset  # Flower counts from 1 again after a resume
        for failure in failures:
            who = failure[0].cid if isinstance(failure, tuple) else "?"
            self._note_version(self._sent.get(who), None)
            log(WARNING, "round %d: evaluation failed: %r", server_round, failure)
        valid = []
        for proxy, res in results:
            sent = self._sent.get(proxy.cid)
            clean, problems = clean_metrics(res.metrics)
            loss_ok = is_finite_number(res.loss)
            n = res.num_examples
            n_ok = isinstance(n, int) and not isinstance(n, bool) and n > 0
            if not loss_ok:
                problems.append(f"loss={res.loss!r} should be a finite number")
            if not n_ok:
                problems.append(f"num_examples={n!r} should be a positive integer")
            for problem in problems:
                log(
                    WARNING,
                    "round %d: evaluation reply of client %s: %s; ignored",
                    server_round,
                    proxy.cid,
                    problem,
                )
            self._note_version(sent, clean.get(BASE_VERSION))
            if loss_ok and n_ok:
                valid.append((n, float(res.loss), clean))
        prefix = "personal" if self._personal() else "fed"
        out: dict[str, Scalar] = {}
        loss: float | None = None
        if valid:
            total = sum(n for n, _, _ in valid)
            loss = sum(n * lo for n, lo, _ in valid) / total
            out[f"{prefix}_loss"] = loss
            accs = [(n, m[ACCURACY]) for n, _, m in valid if ACCURACY in m]
            if accs:
                out[f"{prefix}_accuracy"] = sum(n * float(a) for n, a in accs) / sum(
                    n for n, _ in accs
                )
            if any(PERPLEXITY in m for _, _, m in valid):
                out[f"{prefix}_perplexity"] = math.exp(min(loss, 700.0))
        if self.rule.personalized:
            out["eval_kind"] = "personalized: each client's model on its local split"
        elif self.rule.local_head:
            out["eval_kind"] = "personalized: global adapter, each client's own head"
        self._record.update(out)
        self._record["eval_ok"] = len(valid)
        self._finish_round()
        return loss, out

    # -------------------------------------------------------------- history
    def _finish_round(self) -> None:
        rec = self._record
        if not rec:
            return
        # Server phases read first, so that none runs past the round's end.
        server = self._prof.snapshot() if self._prof is not None else None
        rec["round_seconds"] = time.perf_counter() - self._round_start
        if server is not None:
            rec.update(round_profile(rec["round_seconds"], server, self._prof_calls))
            self._prof = None
        if rec.get("aggregated"):
            self.failed_rounds = 0
            self.aggregated_rounds += 1
        else:
            self.failed_rounds += 1
        rnd = int(rec.get("round", 0))
        reason = self._abort_reason(rnd)
        if reason:
            rec["aborted"] = reason  # the run outputs skip the final adapter
        self._record = {}
        pending = self._pending
        if pending is not None and pending.target is rec and not reason:
            # Reported when its evaluation is done, with the state it ended with.
            pending.held.append((rec, self._snapshot(rnd)))
            return
        self._settle_eval()
        self.history.append(rec)
        self._emit(rec)
        if reason:
            raise RunAborted(reason)

    def _abort_reason(self, server_round: int) -> str:
        """Why the run must stop now (every client failing, say), or ``""``.

        After more than ``fed.max_failed_rounds`` consecutive rounds without an
        aggregate, or at the last round when no round produced one, the round's
        callback still runs (history written) and then :class:`RunAborted` stops
        the server.
        """
        fed = self.fed
        reason = ""
        if self.failed_rounds > fed.max_failed_rounds:
            reason = (
                f"{self.failed_rounds} consecutive rounds without an aggregate "
                f"(fed.max_failed_rounds={fed.max_failed_rounds})"
            )
        elif server_round >= fed.num_rounds and self.aggregated_rounds == 0:
            reason = f"none of the {fed.num_rounds} rounds produced an aggregate"
        if reason:
            last = self._record
            return (
                f"run stopped at round {server_round}: {reason}; last round: "
                f"{last.get('fit_ok', 0)} valid replies, "
                f"{last.get('fit_failed', 0)} client failures, "
                f"{last.get('fit_dropped', 0)} dropped"
                + (
                    f"; last client error: {self._last_failure}"
                    if self._last_failure
                    else ""
                )
            )
        return ""

    def _emit(self, rec: dict[str, Any], view: RoundView | None = None) -> None:
        log(INFO, "round %s: %s", rec.get("round"), _short(rec))
        if self.on_round_end is not None:
            self.on_round_end(rec, self if view is None else view)


def _failure_text(failure: object) -> str:
    """One short line for a client failure (an exception or a bad FitRes)."""
    if isinstance(failure, tuple):
        res = failure[1]
        status = getattr(res, "status", None)
        text = getattr(status, "message", "") or repr(res)
    else:
        text = f"{type(failure).__name__}: {failure}"
    # A ClientApp error arrives wrapped in Ray's and Flower's tracebacks: the
    # innermost "XxxError: message" line is the one that says what went wrong.
    raised = re.findall(r"\b(\w+(?:Error|Exception): [^\n'>]+)", str(text))
    if raised:
        text = raised[-1]
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _fit_metrics(metrics: list[tuple[int, Mapping[str, Scalar]]]) -> dict[str, Any]:
    """Example-weighted train loss, client compute time, tokens and model loads.

    ``client_seconds_critical`` is the round's compute critical path: calls served by
    one worker process run one after another, workers run in parallel.
    """
    if not metrics:
        return {}
    per_worker: dict[Scalar, float] = {}
    for i, (_, m) in enumerate(metrics):
        key = m.get(WORKER_PID, f"unknown-{i}")
        per_worker[key] = per_worker.get(key, 0.0) + float(m.get(SECONDS, 0.0))
    # Over the clients that reported a (valid) loss only.
    losses = [(n, float(m[TRAIN_LOSS])) for n, m in metrics if TRAIN_LOSS in m]
    out: dict[str, Any] = {
        "train_loss": sum(n * lo for n, lo in losses) / sum(n for n, _ in losses)
        if losses
        else None,
        "client_seconds_max": max(float(m.get(SECONDS, 0.0)) for _, m in metrics),
        "client_seconds_sum": sum(float(m.get(SECONDS, 0.0)) for _, m in metrics),
        "tokens": sum(int(m.get(NUM_TOKENS, 0)) for _, m in metrics),
        "client_seconds_critical": max(per_worker.values()),
        "workers": len(per_worker),
        "model_loads_max": max(int(m.get(MODEL_LOADS, 0)) for _, m in metrics),
        "client_fit_calls_max": max(int(m.get(FIT_CALLS, 0)) for _, m in metrics),
    }
    return out


def _short(rec: dict[str, Any]) -> str:
    keys = (
        "train_loss",
        "test_loss",
        "test_accuracy",
        "test_perplexity",
        "personal_accuracy",
        "agg_error",
        "fit_ok",
    )
    return ", ".join(
        f"{k}={rec[k]:.4g}" if isinstance(rec[k], float) else f"{k}={rec[k]}"
        for k in keys
        if k in rec and rec[k] is not None
    )
