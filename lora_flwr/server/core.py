"""The round core: server state, plans, replies -> outcome, the round record.

Flower-free. The Flower translator (:mod:`lora_flwr.fl.strategy`) samples nodes,
carries messages and hands the core plain values; the core answers in values:
the plan and payload for each sampled partition, and for a round's replies the
new state, the counts and the round's :class:`RoundRecord`. One round::

    begin_round -> plans (fit)  -> fit_outcome (validate, guard, hooks, rule,
    optimizer) -> [head refit] -> evaluate (centralised, maybe overlapped)
    -> plans (federated evaluation) -> eval_outcome -> finish_round
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_flwr.aggregation import (
    ClientReply,
    Rule,
    ServerOptimizer,
    ServerState,
    get_rule,
)
from lora_flwr.aggregation.state import Arrays, NDArray
from lora_flwr.config import ExperimentConfig
from lora_flwr.profiling import ClientCall, PhaseTimer, client_call, maybe_phase
from lora_flwr.protocol import (
    COMPRESSION,
    LOCAL_STEPS,
    LR,
    PROX_MU,
    ROUND,
    TOPK_FRACTION,
    WORKER_PID,
    AdapterLayout,
    Plan,
    Scalar,
)
from lora_flwr.server.dp import DPHook
from lora_flwr.server.evaluation import EvaluateFn
from lora_flwr.server.head import HeadRefit, StatsAnswer
from lora_flwr.server.history import History, RoundCallback
from lora_flwr.server.hooks import FitRound, RoundHook
from lora_flwr.server.nodes import NodeBook
from lora_flwr.server.record import RoundRecord
from lora_flwr.server.replies import Incoming, ReplyChecks, Sent
from lora_flwr.server.rounds import EvalIncoming, eval_outcome, fit_outcome
from lora_flwr.server.sampling import assign_rank_tiers
from lora_flwr.server.secagg import SecAggHook
from lora_flwr.validation import check_arrays


@dataclass(frozen=True)
class Outgoing:
    """What one sampled partition is sent: its plan, payload and settings."""

    partition: int
    plan: Plan
    payload: list[NDArray]
    config: dict[str, Scalar]
    start: Arrays


def build_rule(cfg: ExperimentConfig, layout: AdapterLayout, initial: Arrays) -> Rule:
    """Instantiate ``fed.aggregation`` and refuse combinations that make no sense.

    Raises
    ------
    ValueError
        On an unknown rule, rank tiers the rule cannot hold, or a server optimizer,
        robust average or DP it cannot use (one line naming the keys).
    """
    rule = get_rule(cfg.fed.aggregation)(layout, initial, cfg.lora.scaling)
    rule.check_config(cfg)
    if cfg.guards.robust != "none":
        rule.use_robust(cfg.guards.robust, cfg.guards.trim_fraction)
    if cfg.privacy.noise_multiplier > 0:
        rule.use_dp(cfg.privacy.noise_multiplier, cfg.privacy.clip_norm)
    rule.use_head(cfg.head.mode, cfg.head.warmup_rounds)
    return rule


def build_optimizer(cfg: ExperimentConfig) -> ServerOptimizer | None:
    """Return the configured server optimizer, or None."""
    server_opt = cfg.server_opt
    if server_opt.name == "none":
        return None
    return ServerOptimizer(
        server_opt.name,
        lr=server_opt.lr,
        beta1=server_opt.beta1,
        beta2=server_opt.beta2,
        tau=server_opt.tau,
    )


def build_hooks(cfg: ExperimentConfig) -> list[RoundHook]:
    """Return the side protocols a config turns on, in the order they run."""
    hooks: list[RoundHook] = []
    if cfg.secagg.enabled:
        hooks.append(SecAggHook())
    if cfg.privacy.noise_multiplier > 0:
        hooks.append(DPHook(cfg))
    return hooks


class RoundCore:
    """A federated LoRA server's rounds, in values.

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
        Called with each round's history row and the state it ended with (the
        core, or a :class:`~lora_flwr.server.evaluation.RoundSnapshot`).
    """

    def __init__(
        self,
        *,
        cfg: ExperimentConfig,
        layout: AdapterLayout,
        initial: Mapping[str, NDArray],
        evaluate_fn: EvaluateFn | None = None,
        on_round_end: RoundCallback | None = None,
    ) -> None:
        self.cfg = cfg
        self.fed = cfg.fed
        self.layout = layout
        self.rule = build_rule(cfg, layout, dict(initial))
        self.optimizer = build_optimizer(cfg)
        self.hooks = build_hooks(cfg)
        self.state: ServerState = self.rule.init_state()
        ranks = assign_rank_tiers(
            cfg.fed.rank_tiers, cfg.fed.num_clients, seed=cfg.seed, default=cfg.lora.r
        )
        self.nodes = NodeBook(cfg.fed.num_clients, ranks)
        self.checks = ReplyChecks(
            compression=cfg.compression.codec,
            topk_fraction=cfg.compression.topk_fraction,
            secagg=cfg.secagg.enabled,
            max_update_norm=cfg.guards.max_update_norm,
        )
        self.runlog = History(self, evaluate_fn, on_round_end)
        self.head: HeadRefit | None = None
        if self.cfg.head.calibration == "lda":
            if self.rule.personalized:
                raise ValueError(
                    f"head.calibration = 'lda' needs a global model; "
                    f"fed.aggregation = {self.fed.aggregation!r} keeps part of it "
                    "on the clients"
                )
            self.head = HeadRefit(cfg, layout)
        self.record: RoundRecord | None = None  # the round in progress
        self.fit_sent: dict[str, Sent] = {}
        self.eval_sent: dict[str, Sent] = {}
        self._round_start = 0.0
        # compute.profile: the round's server phases and the clients' call profiles.
        self.prof: PhaseTimer | None = None
        self.prof_calls: list[ClientCall] = []

    # ---------------------------------------------------------------- state
    @property
    def history(self) -> list[dict[str, Any]]:
        """Every history row reported so far."""
        return self.runlog.rows

    @property
    def ranks(self) -> dict[int, int]:
        """Each partition's rank tier (seeded)."""
        return self.nodes.ranks

    def global_arrays(self) -> Arrays:
        """Return the global adapter at the allocated rank, by weight name."""
        return self.rule.global_arrays(self.state)

    def counters(self, server_round: int) -> dict[str, Any]:
        """Return what a checkpoint after ``server_round`` needs beyond the state."""
        out = {"round": server_round, **self.runlog.counters(), "dp_rounds": 0}
        for hook in self.hooks:
            out.update(hook.counters())
        return out

    def restore(
        self,
        state: ServerState,
        counters: Mapping[str, Any],
        history: Sequence[dict[str, Any]],
    ) -> int:
        """Continue after a checkpointed round; return that round.

        Nodes are new to this server: their partitions are asked again, and their
        base versions are unknown (a merging rule sends them the whole delta).
        """
        done = int(counters["round"])
        if not 0 < done < self.fed.num_rounds:
            raise ValueError(
                f"cannot resume after round {done} of fed.num_rounds="
                f"{self.fed.num_rounds}"
            )
        check_arrays(state.arrays, self.layout.items(), what="checkpoint")
        self.state = state
        self.runlog.restore(counters, history, done)
        for hook in self.hooks:
            hook.restore(dict(counters))
        self.nodes.forget_versions()
        return done

    # ------------------------------------------------------------ profiling
    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time a block as a server phase of the round (``compute.profile`` only)."""
        return maybe_phase(self.prof, name)

    def note_calls(self, stage: str, metrics: Sequence[Mapping[str, Scalar]]) -> None:
        """Keep the call profiles the clients sent (dropped replies' too)."""
        if self.prof is None:
            return
        for i, m in enumerate(metrics):
            worker = m.get(WORKER_PID, f"unknown-{stage}-{i}")
            call = client_call(stage, m, worker)
            if call is not None:
                self.prof_calls.append(call)

    # ---------------------------------------------------------------- plans
    def round_lr(self, server_round: int) -> float:
        """Return the client lr in a round: ``lr * lr_decay ** (round - 1)``."""
        return self.cfg.train.lr * self.fed.lr_decay ** (server_round - 1)

    def begin_round(self, server_round: int) -> None:
        """Open ``server_round``'s record and start its clock."""
        self._round_start = time.perf_counter()
        self.record = RoundRecord(round=server_round, started_at=time.time())
        self.prof = PhaseTimer() if self.cfg.compute.profile else None
        self.prof_calls = []

    def plans(
        self, server_round: int, partitions: Sequence[int], *, evaluate: bool
    ) -> list[Outgoing]:
        """Plan, payload and settings for each sampled partition, in order."""
        out = []
        for pid in partitions:
            info = self.nodes.client_info(pid)
            plan = self.rule.plan(self.state, info, server_round)
            if evaluate:
                plan = plan.evaluation()
            with self.phase("server_serialization"):
                payload = self.rule.payload(self.state, plan)
            config: dict[str, Scalar] = {ROUND: server_round, **plan.to_config()}
            if not evaluate:
                config[LR] = self.round_lr(server_round)
                config[PROX_MU] = self.fed.prox_mu
                if self.cfg.train.local_epochs == 0:
                    config[LOCAL_STEPS] = self.cfg.train.local_steps
                config[COMPRESSION] = self.cfg.compression.codec
                config[TOPK_FRACTION] = self.cfg.compression.topk_fraction
            start = self.rule.start_arrays(self.state, plan)
            out.append(Outgoing(pid, plan, payload, config, start))
        return out

    def fit_sampled(
        self,
        server_round: int,
        sent: Mapping[str, Sent],
        handshake: tuple[float, int],
    ) -> None:
        """Record the fit messages sent: who got what, and the bytes."""
        rec = self.open_record()
        self.fit_sent = dict(sent)
        down = [s.nbytes for s in sent.values()]
        rec.handshake_seconds, rec.handshake_messages = handshake
        rec.lr = self.round_lr(server_round)
        rec.fit_sampled = len(sent)
        rec.fit_partitions = ",".join(str(s.partition) for s in sent.values())
        rec.bytes_down = sum(down)
        rec.bytes_down_fit_max = max(down, default=0)

    # ------------------------------------------------------------------ fit
    def fit_outcome(
        self,
        server_round: int,
        incoming: Sequence[Incoming],
        failures: Sequence[tuple[str, str]],
    ) -> bool:
        """Validate, guard and aggregate a round's replies; True if aggregated.

        ``failures`` are ``(node, one-line reason)`` of calls that failed. On any
        fault (too few valid replies, a non-finite aggregate) the global state is
        kept unchanged.
        """
        return fit_outcome(self, server_round, incoming, failures)

    def aggregate(self, fit: FitRound, replies: Sequence[ClientReply]) -> ServerState:
        """Run the rule and the server optimizer; check the result is finite."""
        state = self.state
        new = self.rule.update(state, replies, fit.server_round)
        # A hook that pre-averaged the replies leaves no per-client error.
        if not any(h.collapses for h in self.hooks):
            fit.record.agg_error = self.rule.aggregation_error(state, new, replies)
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
    def settle(self) -> None:
        """Wait for a background evaluation and report the rounds it held."""
        self.runlog.settle()

    def evaluate(
        self, server_round: int, calib: dict[str, Any]
    ) -> tuple[float, dict[str, float]] | None:
        """Evaluate the global adapter centrally when due (see :class:`History`)."""
        return self.runlog.evaluate(server_round, calib)

    def refit_due(self, server_round: int) -> bool:
        """Whether the head is refitted after ``server_round`` (0: before round 1)."""
        return self.head is not None and self.head.due(server_round)

    def refit_head(
        self, server_round: int, answers: Sequence[StatsAnswer]
    ) -> dict[str, Any]:
        """Refit the global head from the nodes' answers; return history fields."""
        assert self.head is not None
        self.state, out = self.head.refit(
            server_round, self.state, answers, self.nodes, self.rule.dtype
        )
        return out

    def eval_sampled(self, sent: Mapping[str, Sent]) -> None:
        """Record the federated-evaluation messages sent (counted apart)."""
        rec = self.open_record()
        self.eval_sent = dict(sent)
        down = sum(s.nbytes for s in sent.values())
        rec.bytes_down_eval = down
        rec.bytes_down = (rec.bytes_down or 0) + down

    def eval_fraction(self, server_round: int) -> float:
        """Share of clients in federated evaluation (0: none this round).

        A personalised rule is evaluated on every client unless a share is set.
        """
        personal = self.personal() and self.eval_round(server_round)
        fraction = self.cfg.eval.fraction
        return 1.0 if personal and fraction == 0 else fraction

    def eval_outcome(
        self,
        server_round: int,
        results: Sequence[EvalIncoming],
        failures: Sequence[tuple[str, str]],
    ) -> tuple[float | None, dict[str, Any]]:
        """Weighted federated-evaluation metrics, recorded in the open round."""
        return eval_outcome(self, server_round, results, failures)

    def finish_round(self) -> None:
        """Close the open round (see :meth:`History.finish_round`)."""
        self.runlog.finish_round()

    # -------------------------------------------------------------- helpers
    def open_record(self) -> RoundRecord:
        """Return the open round's record (one is opened if Flower skipped fit)."""
        if self.record is None:
            # Flower called an evaluation step without a fit step this round.
            self.record = RoundRecord()
            self.record._set.discard("round")
        return self.record

    def personal(self) -> bool:
        """Whether federated evaluation runs each client's own model."""
        return self.rule.personalized or self.rule.local_head

    def eval_round(self, server_round: int) -> bool:
        """Whether ``server_round`` is evaluated centrally (0, every k, the last)."""
        every = self.cfg.eval.every
        last = server_round == self.fed.num_rounds
        return server_round == 0 or last or (every > 0 and server_round % every == 0)
