"""FedLoRA: the Flower strategy, a translator between Flower's types and the core.

Every decision is the round core's (:mod:`lora_flwr.server`): which partitions a
round samples (seeded), each client's plan and payload, the checks a reply must
pass, the rule, the optimizer, DP and SecAgg+, the head refit, the history row.
This class turns those values into ``FitIns``/``EvaluateIns`` and Flower's
replies back into values, and counts the bytes of the serialized tensors
actually sent and received. Flower counts rounds from 1 again after a resume:
:meth:`_round` adds the resumed offset, in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from lora_flwr.aggregation import Rule, ServerOptimizer, ServerState
from lora_flwr.aggregation.state import Arrays, NDArray
from lora_flwr.config import ExperimentConfig
from lora_flwr.fl.checkpoint import Checkpoint
from lora_flwr.fl.directory import PartitionDirectory
from lora_flwr.fl.handshake import Handshake
from lora_flwr.fl.head_refit import refit_head
from lora_flwr.fl.messages import parameters_nbytes, send_plans
from lora_flwr.protocol import AdapterLayout
from lora_flwr.server.core import RoundCore
from lora_flwr.server.evaluation import EvaluateFn
from lora_flwr.server.history import RoundCallback
from lora_flwr.server.replies import Incoming, failure_text
from lora_flwr.server.rounds import EvalIncoming
from lora_flwr.server.sampling import EVALUATE_STREAM, FIT_STREAM

Instruction = tuple[ClientProxy, Parameters, dict[str, Scalar]]


class FedLoRA(Strategy):
    """Federated LoRA with per-client plans, validated replies and a named rule.

    Parameters
    ----------
    cfg, layout, initial, evaluate_fn, on_round_end
        As :class:`~lora_flwr.server.core.RoundCore` takes them.
    resume
        A checkpoint to continue after, with the ``history`` written so far.
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
        self.cfg = cfg
        self.fed = cfg.fed
        self.layout = layout
        self.core = RoundCore(
            cfg=cfg,
            layout=layout,
            initial=initial,
            evaluate_fn=evaluate_fn,
            on_round_end=on_round_end,
        )
        self.handshake = Handshake(cfg, self.core, partitions)
        self._client_manager: ClientManager | None = None
        self.core.runlog.view = self  # what on_round_end sees (not under overlap)
        self.offset = 0  # rounds done before this server started (resume)
        if resume is not None:
            self._restore(resume, history)

    def _restore(self, resume: Checkpoint, history: Sequence[dict[str, Any]]) -> None:
        """Continue after the checkpointed round: state, counters, history."""
        self.offset = self.core.restore(resume.state, resume.counters, history)

    def __repr__(self) -> str:
        """Name shown in Flower's logs."""
        return f"FedLoRA(aggregation={self.fed.aggregation!r})"

    # ------------------------------------------------------- the core's view
    @property
    def rule(self) -> Rule:
        """The aggregation rule."""
        return self.core.rule

    @property
    def optimizer(self) -> ServerOptimizer | None:
        """The server optimizer, if any."""
        return self.core.optimizer

    @property
    def state(self) -> ServerState:
        """The global server state."""
        return self.core.state

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every history row reported so far."""
        return self.core.history

    @property
    def ranks(self) -> dict[int, int]:
        """Each partition's rank tier."""
        return self.core.ranks

    @property
    def partition_of(self) -> dict[str, int]:
        """Node id -> partition id, as learned so far."""
        return self.core.nodes.partition_of

    @property
    def versions(self) -> dict[int, int | None]:
        """Base version each partition holds (None: unknown)."""
        return self.core.nodes.versions

    @property
    def on_round_end(self) -> RoundCallback | None:
        """The callback each history row goes to."""
        return self.core.runlog.on_round_end

    @on_round_end.setter
    def on_round_end(self, callback: RoundCallback | None) -> None:
        self.core.runlog.on_round_end = callback

    def counters(self, server_round: int) -> dict[str, Any]:
        """Return what a checkpoint after ``server_round`` needs beyond the state."""
        return self.core.counters(server_round)

    def global_arrays(self) -> Arrays:
        """Return the global adapter at the allocated rank, by weight name."""
        return self.core.global_arrays()

    # ------------------------------------------------------------ translate
    def _round(self, server_round: int) -> int:
        """Return the run's round number (Flower counts from 1 again on resume)."""
        return server_round + self.offset

    def _as_parameters(self) -> Parameters:
        arrays = self.global_arrays()
        with self.core.phase("server_serialization"):
            return ndarrays_to_parameters([arrays[n] for n in self.layout.names])

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Start from the seeded initial adapter (the rule's state at round 0)."""
        self._client_manager = client_manager
        return self._as_parameters()

    # ------------------------------------------------------------------ fit
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send each sampled client its own plan and payload."""
        rnd = self._round(server_round)
        self._client_manager = client_manager
        self.core.begin_round(rnd)
        sampling = self.cfg.sampling
        with self.core.phase("server_other"):
            clients = self.handshake.sample(
                client_manager, rnd, sampling.fraction, sampling.min_clients, FIT_STREAM
            )
            instructions, sent = send_plans(self.core, clients, rnd, evaluate=False)
        handshake = (self.handshake.seconds, self.handshake.asked)
        self.core.fit_sampled(rnd, sent, handshake)
        return [(proxy, FitIns(p, c)) for proxy, p, c in instructions]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate replies, run the rule and optimizer; keep the global on faults."""
        self.core.note_calls("fit", [res.metrics for _, res in results])
        with self.core.phase("server_aggregation"):
            incoming = [self._incoming(proxy, res) for proxy, res in results]
            failed = [(_who(f), failure_text(f)) for f in failures]
            if not self.core.fit_outcome(self._round(server_round), incoming, failed):
                return None, {}
            record = self.core.open_record().to_dict()
            out: dict[str, Scalar] = {
                k: v for k, v in record.items() if isinstance(v, int | float | str)
            }
            return self._as_parameters(), out

    def _incoming(self, proxy: ClientProxy, res: FitRes) -> Incoming:
        arrays: Sequence[object] | Exception
        with self.core.phase("server_serialization"):
            try:
                arrays = parameters_to_ndarrays(res.parameters)
            except Exception as exc:  # checked (and dropped) by the core
                arrays = exc
        nbytes = parameters_nbytes(res.parameters)
        return Incoming(proxy.cid, arrays, res.num_examples, res.metrics, nbytes)

    # ------------------------------------------------------------- evaluate
    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Centralised evaluation (round 0, every ``eval_every``, the last).

        After a resume, Flower's round-0 evaluation is skipped (history has it).
        The head is refitted first (before round 1 too), so that the evaluation,
        the saved adapter and the next round's clients all get it.
        """
        if self.offset and server_round == 0:
            return None
        rnd = self._round(server_round)
        self.core.settle()
        calib = {}
        if self.core.refit_due(rnd):
            if self._client_manager is None:
                raise RuntimeError("the head refit needs Flower's client manager")
            calib = refit_head(self.core, self.handshake, self._client_manager, rnd)
        result = self.core.evaluate(rnd, calib)
        if result is None:
            return None
        loss, metrics = result
        return loss, dict(metrics)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Federated evaluation on a share of clients (FedSA: all, by default)."""
        rnd = self._round(server_round)
        with self.core.phase("server_other"):
            fraction = self.core.eval_fraction(rnd)
            if fraction == 0:
                self.core.finish_round()
                return []
            clients = self.handshake.sample(
                client_manager,
                rnd,
                fraction,
                self.cfg.eval.min_clients,
                EVALUATE_STREAM,
            )
            instructions, sent = send_plans(self.core, clients, rnd, evaluate=True)
            # Evaluation traffic is counted apart too: it is not part of training.
            self.core.eval_sampled(sent)
            return [(proxy, EvaluateIns(p, c)) for proxy, p, c in instructions]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Example-weighted mean of the clients' local test loss and accuracy."""
        self.core.note_calls("evaluate", [res.metrics for _, res in results])
        with self.core.phase("server_aggregation"):
            replies = [
                EvalIncoming(proxy.cid, res.loss, res.num_examples, res.metrics)
                for proxy, res in results
            ]
            failed = [(_who(f), repr(f)) for f in failures]
            loss, out = self.core.eval_outcome(
                self._round(server_round), replies, failed
            )
            self.core.finish_round()
            return loss, out


def _who(failure: tuple[ClientProxy, Any] | BaseException) -> str:
    return failure[0].cid if isinstance(failure, tuple) else "?"
