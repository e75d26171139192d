"""FedLoRA: a Flower strategy that aggregates LoRA adapters with a named rule.

One round, as Flower's server drives it::

    configure_fit    sample clients; send the global adapter + (round, lr, steps)
    aggregate_fit    validate every reply (count, dtype, shape, finite, norm);
                     drop bad ones with a warning; aggregate the rest with
                     ``fed.aggregation``; keep the global adapter if too few remain
    evaluate         centralised evaluation on the held-out split (every N rounds)
    configure/aggregate_evaluate   federated evaluation on the clients' local splits

Bytes are counted from the serialized tensors actually sent and received.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from lora_flwr.aggregation import ClientUpdate, check_update, get_rule
from lora_flwr.config import ExperimentConfig
from lora_flwr.fl.client import (
    FIT_CALLS,
    LOCAL_STEPS,
    LR,
    MODEL_LOADS,
    PARTITION_ID,
    ROUND,
    WORKER_PID,
)
from lora_flwr.training import ACCURACY, NUM_TOKENS, PERPLEXITY, SECONDS, TRAIN_LOSS

NDArrays = list[npt.NDArray[np.float32]]
EvaluateFn = Callable[[int, NDArrays], dict[str, float]]
RoundCallback = Callable[[dict[str, Any], NDArrays], None]


def parameters_nbytes(parameters: Parameters) -> int:
    """Bytes of the serialized tensors in ``parameters``."""
    return sum(len(t) for t in parameters.tensors)


class FedLoRA(Strategy):
    """Federated LoRA with validated replies and a pluggable aggregation rule.

    Parameters
    ----------
    cfg
        The experiment (sampling, rounds, lr schedule, rule, evaluation cadence).
    initial_arrays
        The starting global adapter (seeded A, zero B, initial saved modules).
    names
        Weight names in the adapter's order (for messages and LoRA-aware rules).
    evaluate_fn
        Centralised evaluation ``evaluate_fn(round, arrays) -> metrics`` (with a
        ``loss`` key), or None.
    on_round_end
        Called with the round record and the global arrays after every round (save
        checkpoints, write history, print the table row).
    """

    def __init__(
        self,
        *,
        cfg: ExperimentConfig,
        initial_arrays: NDArrays,
        names: Sequence[str],
        evaluate_fn: EvaluateFn | None = None,
        on_round_end: RoundCallback | None = None,
    ) -> None:
        super().__init__()
        if len(names) != len(initial_arrays):
            raise ValueError(f"{len(names)} names for {len(initial_arrays)} arrays")
        self.cfg = cfg
        self.fed = cfg.fed
        self.rule = get_rule(cfg.fed.aggregation)
        self.names = list(names)
        self.shapes = [tuple(a.shape) for a in initial_arrays]
        self.global_arrays: NDArrays = [a.astype(np.float32) for a in initial_arrays]
        self.evaluate_fn = evaluate_fn
        self.on_round_end = on_round_end
        self.history: list[dict[str, Any]] = []
        self._record: dict[str, Any] = {}
        self._round_start = 0.0

    def __repr__(self) -> str:
        """Name shown in Flower's logs."""
        return f"FedLoRA(aggregation={self.fed.aggregation!r})"

    # ---------------------------------------------------------------- setup
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Start every client from the same seeded adapter."""
        return ndarrays_to_parameters(self.global_arrays)

    def _sample(
        self, client_manager: ClientManager, fraction: float, minimum: int
    ) -> list[ClientProxy]:
        # Virtual nodes register asynchronously: wait for the ones we mean to use.
        client_manager.wait_for(self.fed.min_available_clients, timeout=3600)
        available = client_manager.num_available()
        num = min(available, max(math.ceil(fraction * available), minimum))
        clients: list[ClientProxy] = client_manager.sample(
            num_clients=num, min_num_clients=self.fed.min_available_clients
        )
        return clients

    def round_lr(self, server_round: int) -> float:
        """Return the client lr in a round: ``lr * lr_decay ** (round - 1)``."""
        return self.cfg.train.lr * self.fed.lr_decay ** (server_round - 1)

    # ------------------------------------------------------------------ fit
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send the global adapter and this round's instructions to sampled clients."""
        self._round_start = time.perf_counter()
        clients = self._sample(
            client_manager, self.fed.fraction_fit, self.fed.min_fit_clients
        )
        config: dict[str, Scalar] = {
            ROUND: server_round,
            LR: self.round_lr(server_round),
        }
        if self.cfg.train.local_epochs == 0:
            config[LOCAL_STEPS] = self.cfg.train.local_steps
        self._record = {
            "round": server_round,
            "lr": config[LR],
            "fit_sampled": len(clients),
            "bytes_down": parameters_nbytes(parameters) * len(clients),
        }
        ins = FitIns(parameters, config)
        return [(client, ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate replies, aggregate the valid ones, keep the global on too few."""
        rec = self._record
        rec["bytes_up"] = sum(parameters_nbytes(res.parameters) for _, res in results)
        for failure in failures:
            who = failure[0].cid if isinstance(failure, tuple) else "?"
            log(WARNING, "round %d: client %s failed: %r", server_round, who, failure)
        updates: list[ClientUpdate] = []
        metrics: list[tuple[int, dict[str, Scalar]]] = []
        dropped = 0
        for proxy, res in results:
            pid = res.metrics.get(PARTITION_ID, "?")
            try:
                arrays = parameters_to_ndarrays(res.parameters)
                check_update(
                    arrays,
                    self.shapes,
                    self.names,
                    reference=self.global_arrays,
                    max_update_norm=self.fed.max_update_norm,
                )
                if res.num_examples <= 0:
                    raise ValueError(f"num_examples={res.num_examples} must be > 0")
            except Exception as exc:  # any malformed reply is dropped, never fatal
                dropped += 1
                log(
                    WARNING,
                    "round %d: dropped reply of client %s (partition %s): %s",
                    server_round,
                    proxy.cid,
                    pid,
                    exc,
                )
                continue
            updates.append(ClientUpdate(arrays, res.num_examples, str(proxy.cid)))
            metrics.append((res.num_examples, res.metrics))
        rec.update(fit_ok=len(updates), fit_failed=len(failures), fit_dropped=dropped)
        rec.update(_fit_metrics(metrics))
        if len(updates) < self.fed.min_fit_clients:
            log(
                WARNING,
                "round %d: %d valid replies < fed.min_fit_clients=%d; the global "
                "adapter is kept unchanged",
                server_round,
                len(updates),
                self.fed.min_fit_clients,
            )
            rec["aggregated"] = False
            return None, {}
        new = self.rule(self.global_arrays, updates, self.names)
        check_update(
            new, self.shapes, self.names
        )  # a rule must not emit NaN/shape bugs
        self.global_arrays = new
        rec["aggregated"] = True
        out: dict[str, Scalar] = {
            k: v for k, v in rec.items() if isinstance(v, int | float | str)
        }
        return ndarrays_to_parameters(new), out

    # ------------------------------------------------------------- evaluate
    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Evaluate centrally: round 0, every ``eval_every`` rounds and the last."""
        if self.evaluate_fn is None:
            return None
        every = self.fed.eval_every
        last = server_round == self.fed.num_rounds
        if not (server_round == 0 or last or (every > 0 and server_round % every == 0)):
            return None
        arrays = parameters_to_ndarrays(parameters)
        start = time.perf_counter()
        metrics = self.evaluate_fn(server_round, arrays)
        entry: dict[str, Any] = {f"test_{k}": v for k, v in metrics.items()}
        entry["eval_seconds"] = time.perf_counter() - start
        if server_round == 0:
            self.history.append({"round": 0, **entry})
            self._emit(self.history[-1])
        else:
            self._record.update(entry)
        return float(metrics["loss"]), {k: float(v) for k, v in metrics.items()}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Federated evaluation on a share of clients (none if the fraction is 0)."""
        if self.fed.fraction_evaluate == 0:
            self._finish_round()
            return []
        clients = self._sample(
            client_manager, self.fed.fraction_evaluate, self.fed.min_evaluate_clients
        )
        self._record["bytes_down"] = self._record.get("bytes_down", 0) + (
            parameters_nbytes(parameters) * len(clients)
        )
        ins = EvaluateIns(parameters, {ROUND: server_round})
        return [(client, ins) for client in clients]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Example-weighted mean of the clients' local test loss and accuracy."""
        for failure in failures:
            log(WARNING, "round %d: evaluation failed: %r", server_round, failure)
        valid = [
            (res.num_examples, res.loss, res.metrics)
            for _, res in results
            if res.num_examples > 0 and math.isfinite(res.loss)
        ]
        out: dict[str, Scalar] = {}
        loss: float | None = None
        if valid:
            total = sum(n for n, _, _ in valid)
            loss = sum(n * lo for n, lo, _ in valid) / total
            out["fed_loss"] = loss
            accs = [(n, m[ACCURACY]) for n, _, m in valid if ACCURACY in m]
            if accs:
                out["fed_accuracy"] = sum(n * float(a) for n, a in accs) / sum(
                    n for n, _ in accs
                )
            if any(PERPLEXITY in m for _, _, m in valid):
                out["fed_perplexity"] = math.exp(min(loss, 700.0))
        self._record.update(out)
        self._record["eval_ok"] = len(valid)
        self._finish_round()
        return loss, out

    # -------------------------------------------------------------- history
    def _finish_round(self) -> None:
        rec = self._record
        if not rec:
            return
        rec["round_seconds"] = time.perf_counter() - self._round_start
        self.history.append(rec)
        self._record = {}
        self._emit(rec)

    def _emit(self, rec: dict[str, Any]) -> None:
        log(INFO, "round %s: %s", rec.get("round"), _short(rec))
        if self.on_round_end is not None:
            self.on_round_end(rec, self.global_arrays)


def _fit_metrics(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Any]:
    """Example-weighted train loss, client compute time, tokens and model loads.

    ``client_seconds_critical`` is the round's compute critical path: calls served by
    one worker process run one after another, workers run in parallel.
    """
    if not metrics:
        return {}
    total = sum(n for n, _ in metrics)
    per_worker: dict[Scalar, float] = {}
    for i, (_, m) in enumerate(metrics):
        key = m.get(WORKER_PID, f"unknown-{i}")
        per_worker[key] = per_worker.get(key, 0.0) + float(m.get(SECONDS, 0.0))
    out: dict[str, Any] = {
        "train_loss": sum(n * float(m.get(TRAIN_LOSS, 0.0)) for n, m in metrics)
        / total,
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
    keys = ("train_loss", "test_loss", "test_accuracy", "test_perplexity", "fit_ok")
    return ", ".join(
        f"{k}={rec[k]:.4g}" if isinstance(rec[k], float) else f"{k}={rec[k]}"
        for k in keys
        if k in rec
    )
