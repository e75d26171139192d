"""LoRAClient: a Flower NumPyClient that trains only the LoRA adapter.

The seed's ``TrainRound`` / ``UpdateAdapter`` / ``SaveAdapter`` / ``LoadAdapter`` on
Flower: ``fit`` receives the global adapter, trains it on this node's partition and
returns only the adapter arrays. The base model, tokenizer and tokenized partitions
come from the per-process workspace (:mod:`lora_flwr.experiment`), so a call only
resets adapter tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from flwr.client import Client, NumPyClient
from flwr.common import ConfigRecord, Context

from lora_flwr.config import ExperimentConfig
from lora_flwr.experiment import Workspace, client_datasets, get_workspace
from lora_flwr.models import model_load_count
from lora_flwr.training import (
    ACCURACY,
    NUM_STEPS,
    NUM_TOKENS,
    PERPLEXITY,
    SECONDS,
    TRAIN_LOSS,
)

NDArrays = list[npt.NDArray[np.float32]]
Scalar = bool | bytes | float | int | str

# Keys of the fit/evaluate instructions the strategy sends.
ROUND = "server_round"
LR = "lr"
LOCAL_STEPS = "local_steps"
# Metric: how many fit calls this node has served (kept in Context.state).
FIT_CALLS = "client_fit_calls"
PARTITION_ID = "partition_id"
WORKER_PID = "worker_pid"
MODEL_LOADS = "model_loads"
STATE_KEY = "lora_flwr"


def client_train_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of one client's local training in one round (distinct per pair)."""
    return seed * 1_000_003 + server_round * 10_007 + partition_id


class LoRAClient(NumPyClient):
    """Train the global adapter on one node's data and send back only the adapter.

    Parameters
    ----------
    cfg
        The experiment.
    partition_id, num_partitions
        Which share of the training pool this node owns.
    state
        The node's persistent ``ConfigRecord`` (from ``Context.state``), or None.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        partition_id: int,
        num_partitions: int,
        state: ConfigRecord | None = None,
    ) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        self.num_partitions = num_partitions
        self.state = state if state is not None else ConfigRecord()
        self.ws: Workspace = get_workspace(cfg)
        self.train_data, self.test_data = client_datasets(
            self.ws, cfg, partition_id, num_partitions
        )

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """Return the adapter's arrays (weight order)."""
        return self.ws.adapter.get_weights()

    def _receive(self, parameters: NDArrays) -> None:
        # Shape, dtype and value checks happen here; a mismatch is a clear error.
        self.ws.adapter.set_weights(parameters)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Set the global adapter, train locally, return the adapter arrays.

        Returns
        -------
        tuple
            Adapter arrays, number of local training examples (the FedAvg weight),
            metrics ``train_loss``, ``seconds``, ``num_tokens``, ``num_steps``.
        """
        self._receive(parameters)
        server_round = int(config.get(ROUND, 1))
        steps = int(
            config.get(LOCAL_STEPS, self.ws.trainer.num_steps_for(self.train_data))
        )
        lr = float(config.get(LR, self.cfg.train.lr))
        metrics = self.ws.trainer.train(
            self.train_data,
            steps=steps,
            lr=lr,
            seed=client_train_seed(self.cfg.seed, server_round, self.partition_id),
            progress=False,
        )
        previous = self.state.get(FIT_CALLS, 0)
        calls = (previous if isinstance(previous, int) else 0) + 1
        self.state[FIT_CALLS] = calls
        out: dict[str, Scalar] = {
            TRAIN_LOSS: metrics[TRAIN_LOSS],
            SECONDS: metrics[SECONDS],
            NUM_TOKENS: int(metrics[NUM_TOKENS]),
            NUM_STEPS: int(metrics[NUM_STEPS]),
            FIT_CALLS: calls,
            PARTITION_ID: self.partition_id,
            # Which worker process served the call and how many base models it has
            # built: the benchmark uses both (critical path, loads per worker).
            WORKER_PID: os.getpid(),
            MODEL_LOADS: model_load_count(),
        }
        return self.ws.adapter.get_weights(), len(self.train_data), out

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the global adapter on this node's local test split."""
        self._receive(parameters)
        if len(self.test_data) == 0:
            return 0.0, 0, {PARTITION_ID: self.partition_id}
        metrics = self.ws.trainer.evaluate(self.test_data, progress=False)
        out: dict[str, Scalar] = {PARTITION_ID: self.partition_id}
        for key in (ACCURACY, PERPLEXITY):
            if key in metrics:
                out[key] = metrics[key]
        return float(metrics["loss"]), len(self.test_data), out

    def save_adapter(self, path: str | Path) -> Path:
        """Save the adapter currently held by this client (PEFT directory)."""
        return self.ws.adapter.save(path)

    def load_adapter(self, path: str | Path) -> None:
        """Load an adapter (PEFT directory or JSON file) into this client."""
        self.ws.adapter.load(path)


def node_partition(context: Context, default_partitions: int) -> tuple[int, int]:
    """Read ``partition-id`` / ``num-partitions`` from the node config, checked."""
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError(
            "This SuperNode has no `partition-id` in its node config; start it with "
            '--node-config "partition-id=0 num-partitions=N"'
        )
    pid = int(node["partition-id"])
    num = int(node.get("num-partitions", default_partitions))
    if not 0 <= pid < num:
        raise ValueError(f"`partition-id`={pid} is outside [0, num-partitions={num})")
    return pid, num


def make_client_fn(
    cfg: ExperimentConfig | None = None,
) -> Callable[[Context], Client]:
    """Build ``client_fn``; without ``cfg`` the config comes from ``run_config``.

    ``flwr.simulation.run_simulation`` hands apps an empty run_config, so the
    in-process path passes the experiment in by closure.
    """

    def client_fn(context: Context) -> Client:
        exp = cfg if cfg is not None else ExperimentConfig.from_flat(context.run_config)
        pid, num = node_partition(context, exp.fed.num_clients)
        if STATE_KEY not in context.state.config_records:
            context.state.config_records[STATE_KEY] = ConfigRecord()
        state = context.state.config_records[STATE_KEY]
        client: Client = LoRAClient(exp, pid, num, state).to_client()
        return client

    return client_fn
