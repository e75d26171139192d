"""LoRAClient: a Flower NumPyClient that follows the server's per-round plan.

The seed's ``TrainRound`` / ``UpdateAdapter`` / ``SaveAdapter`` / ``LoadAdapter`` on
Flower. ``fit`` reads the :class:`~lora_flwr.protocol.Plan` from the config, sets
the adapter up from the payload (:func:`lora_flwr.fl.runner.prepare`: base-weight
fold, factor groups, rank, trainable groups), trains on this node's partition and
returns only the groups the plan sends. The base model, tokenizer and tokenized
partitions come from the per-process workspace (:mod:`lora_flwr.experiment`) and
are built on first use, so a ``get_properties`` call costs nothing. What the node
keeps between rounds (FedSA's B, a merged base delta) lives in Flower's
``Context.state``, the same in simulation and deployment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from flwr.client import Client, NumPyClient
from flwr.common import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from lora_flwr.compression import check_codec
from lora_flwr.config import ExperimentConfig
from lora_flwr.fl.runner import (
    NodeStore,
    check_secagg_range,
    compress_reply,
    finish,
    layout_of,
    prepare,
)
from lora_flwr.lifecycle import after_round, on_process_start
from lora_flwr.profiling import CallProfile, maybe_phase, take_startup
from lora_flwr.protocol import (
    ACCURACY,
    BASE_VERSION,
    COMPRESSION,
    FIT_CALLS,
    HEAD_STATS,
    LOCAL_STEPS,
    LR,
    MODEL_LOADS,
    NUM_STEPS,
    NUM_TOKENS,
    PARTITION_ID,
    PERPLEXITY,
    PROX_MU,
    RESPONSES_DROPPED,
    RESPONSES_TRUNCATED,
    ROUND,
    SECONDS,
    TOPK_FRACTION,
    TRAIN_LOSS,
    WORKER_PID,
    Plan,
    Scalar,
)

if TYPE_CHECKING:
    # torch, transformers and the data stack load only when a message needs the
    # model (see LoRAClient.ws): flwr-clientapp imports this module for EVERY
    # message, SecAgg+ stages and the get_properties handshake included.
    from lora_flwr.data import TokenizedDataset
    from lora_flwr.experiment import Workspace

NDArray = npt.NDArray[np.float32]
NDArrays = list[NDArray]

STATE_KEY = "lora_flwr"
PRIVATE_KEY = "lora_flwr.private"
DELTA_KEY = "lora_flwr.base_delta"
RESIDUAL_KEY = "lora_flwr.residual"  # top-k error feedback (compression.codec)


def client_train_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of one client's local training in one round (distinct per pair)."""
    return seed * 1_000_003 + server_round * 10_007 + partition_id


class ContextStore(NodeStore):
    """A node's persistent state in Flower's ``Context.state`` (a RecordDict).

    Scalars go to a ``ConfigRecord``, tensors to ``ArrayRecord``s, so they survive
    between rounds in simulation and in deployment alike.
    """

    def __init__(self, state: RecordDict) -> None:
        self.state = state
        if STATE_KEY not in state.config_records:
            state[STATE_KEY] = ConfigRecord()

    @property
    def config(self) -> ConfigRecord:
        """The node's scalar record."""
        record: ConfigRecord = self.state.config_records[STATE_KEY]
        return record

    def _arrays(self, key: str) -> dict[str, NDArray]:
        if key not in self.state.array_records:
            return {}
        record = self.state.array_records[key]
        return {name: record[name].numpy() for name in record}

    def _set_arrays(self, key: str, arrays: Mapping[str, NDArray]) -> None:
        self.state[key] = ArrayRecord(
            array_dict={n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()}
        )

    def base_version(self) -> int:
        """Version of the held base delta."""
        value = self.config.get(BASE_VERSION, 0)
        return value if isinstance(value, int) else 0

    def base_delta(self) -> dict[str, NDArray]:
        """Return the held delta per module."""
        return self._arrays(DELTA_KEY)

    def set_base(self, version: int, delta: Mapping[str, NDArray]) -> None:
        """Replace the held delta and its version."""
        self._set_arrays(DELTA_KEY, delta)
        self.config[BASE_VERSION] = version

    def private(self) -> dict[str, NDArray]:
        """Privately kept adapter tensors."""
        return self._arrays(PRIVATE_KEY)

    def set_private(self, arrays: Mapping[str, NDArray]) -> None:
        """Replace the privately kept tensors."""
        self._set_arrays(PRIVATE_KEY, arrays)

    def residual(self) -> dict[str, NDArray]:
        """Top-k's error feedback: what this node computed but has not sent."""
        return self._arrays(RESIDUAL_KEY)

    def set_residual(self, arrays: Mapping[str, NDArray]) -> None:
        """Replace the top-k residual."""
        self._set_arrays(RESIDUAL_KEY, arrays)

    def count_fit(self) -> int:
        """Count one more fit call served by this node and return the total."""
        previous = self.config.get(FIT_CALLS, 0)
        calls = (previous if isinstance(previous, int) else 0) + 1
        self.config[FIT_CALLS] = calls
        return calls


class LoRAClient(NumPyClient):
    """Train the adapter on one node's data as the round's plan says.

    Parameters
    ----------
    cfg
        The experiment.
    partition_id, num_partitions
        Which share of the training pool this node owns.
    state
        The node's persistent ``Context.state``, or None for a fresh one.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        partition_id: int,
        num_partitions: int,
        state: RecordDict | None = None,
    ) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        self.num_partitions = num_partitions
        self.store = ContextStore(state if state is not None else RecordDict())

    # Built on first use: the server's get_properties handshake must stay cheap.
    @cached_property
    def ws(self) -> Workspace:
        """Return the process's base model, adapter and trainer."""
        # Imported here, not at the top: it pulls in torch and the model code.
        from lora_flwr.experiment import get_workspace

        return get_workspace(self.cfg)

    @cached_property
    def _data(self) -> tuple[TokenizedDataset, TokenizedDataset]:
        from lora_flwr.experiment import client_datasets  # torch: only when needed

        return client_datasets(
            self.ws, self.cfg, self.partition_id, self.num_partitions
        )

    @property
    def train_data(self) -> TokenizedDataset:
        """Return the node's local training split, tokenized."""
        return self._data[0]

    @property
    def test_data(self) -> TokenizedDataset:
        """Return the node's local test split, tokenized."""
        return self._data[1]

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """Tell the server which partition this node owns (seeded sampling)."""
        return {PARTITION_ID: self.partition_id}

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """Return the adapter's arrays (weight order, allocated rank)."""
        return self.ws.adapter.get_weights()

    def _profile(self) -> CallProfile | None:
        """Start timing this call (``compute.profile``), model and data first.

        The workspace and the partition are built here, before the payload is
        read, so that their cost is charged to their own phases.
        """
        if not self.cfg.compute.profile:
            return None
        prof = CallProfile(take_startup())
        with prof.phase("startup_model"):
            _ = self.ws
        with prof.phase("startup_data"):
            _ = self._data
        return prof

    def _prepare(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[Plan, dict[str, NDArray]]:
        plan = Plan.from_config(config)
        start = prepare(self.ws.adapter, self.ws.initial, plan, parameters, self.store)
        return plan, start

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[list[npt.NDArray[np.generic]], int, dict[str, Scalar]]:
        """Set the adapter up as planned, train locally, return the sent groups.

        Returns
        -------
        tuple
            The plan's ``send`` arrays in wire order (encoded as the config's
            ``compression`` says, see :mod:`lora_flwr.compression`), the number of
            local training examples (the aggregation weight ``n_k``), and metrics
            ``train_loss``, ``seconds``, ``num_tokens``, ``num_steps``,
            ``base_version``; for instruction data ``responses_truncated`` and
            ``responses_dropped`` (the local training set's cut counts); with
            ``compute.profile`` the call's phases (:mod:`lora_flwr.profiling`).
        """
        from lora_flwr.models import model_load_count  # loaded with the model
        from lora_flwr.training.progress import show_progress_lines

        show_progress_lines()  # a Ray worker's logging is not configured

        prof = self._profile()
        codec = check_codec(str(config.get(COMPRESSION, "none")))
        with maybe_phase(prof, "serialization"):
            plan, start = self._prepare(parameters, config)
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
            prox_mu=float(config.get(PROX_MU, 0.0)),
            name=f"client {self.partition_id} (round {server_round})",
        )
        with maybe_phase(prof, "serialization"):
            reply = finish(self.ws.adapter, plan, self.store)
        secagg = self.cfg.secagg
        if secagg.enabled:
            check_secagg_range(
                reply, len(self.train_data), secagg.clip, secagg.max_weight
            )
        names = [n for n, _ in layout_of(self.ws.adapter).reply_spec(plan)]
        with maybe_phase(prof, "serialization"):
            sent = compress_reply(
                reply,
                start,
                names,
                self.store,
                codec,
                float(config.get(TOPK_FRACTION, 1.0)),
            )
        out: dict[str, Scalar] = {
            TRAIN_LOSS: metrics[TRAIN_LOSS],
            SECONDS: metrics[SECONDS],
            NUM_TOKENS: int(metrics[NUM_TOKENS]),
            NUM_STEPS: int(metrics[NUM_STEPS]),
            FIT_CALLS: self.store.count_fit(),
            PARTITION_ID: self.partition_id,
            BASE_VERSION: self.store.base_version(),
            # Which worker process served the call and how many base models it has
            # built: the benchmark uses both (critical path, loads per worker).
            WORKER_PID: os.getpid(),
            MODEL_LOADS: model_load_count(),
        }
        if self.train_data.targets is not None:  # instruction data
            out[RESPONSES_TRUNCATED] = self.train_data.truncated
            out[RESPONSES_DROPPED] = self.train_data.dropped
        if prof is not None:
            prof.add_train(metrics)
            out.update(prof.metrics())
        after_round("client")  # an actor serves many clients: give pages back
        return sent, len(self.train_data), out

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the planned model (global, or personalised) on the local split."""
        prof = self._profile()
        with maybe_phase(prof, "serialization"):
            self._prepare(parameters, config)
        out: dict[str, Scalar] = {
            PARTITION_ID: self.partition_id,
            BASE_VERSION: self.store.base_version(),
        }
        loss = 0.0
        num_examples = len(self.test_data)
        if config.get(HEAD_STATS):
            # Not a test: the statistics the server's LDA head is fitted to.
            with maybe_phase(prof, "evaluation"):
                out[HEAD_STATS] = self.head_stats(int(config.get(ROUND, 0)))
            num_examples = len(self.train_data)
        elif num_examples > 0:
            with maybe_phase(prof, "evaluation"):
                metrics = self.ws.trainer.evaluate(self.test_data, progress=False)
            for key in (ACCURACY, PERPLEXITY):
                if key in metrics:
                    out[key] = metrics[key]
            loss = float(metrics["loss"])
        if prof is not None:
            # The server finds the critical path of the stage by worker process.
            out[WORKER_PID] = os.getpid()
            out.update(prof.metrics())
        return loss, num_examples, out

    def head_stats(self, server_round: int = 0) -> bytes:
        """Class statistics of the head's inputs on the local training split.

        What the server's LDA head is fitted to (``head.calibration``):
        counts, per-class sums and second moments, encoded for the wire; with
        ``head.lda_max_examples`` set, estimated from a stratified sample of the
        split (seeded per round and partition), the counts exact.
        """
        from lora_flwr.aggregation.lda import class_stats, encode_stats, stats_sample

        num_labels = self.cfg.model.num_labels
        layer = self.ws.adapter.head_layer(num_labels)[1]
        data = self.train_data
        labels = np.zeros(0, np.int64) if data.labels is None else data.labels.numpy()
        counts = np.bincount(labels, minlength=num_labels)
        seed = client_train_seed(self.cfg.seed, server_round, self.partition_id)
        keep = stats_sample(labels, self.cfg.head.lda_max_examples, seed)
        x, y = self.ws.trainer.head_inputs(data.subset(keep.tolist()), layer)
        if len(y) == 0:
            x = np.zeros((0, layer.in_features), np.float32)
        return encode_stats(class_stats(x, y, num_labels, counts=counts))

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


def node_threads(context: Context) -> int | None:
    """Read the node's ``num-threads`` (torch threads per ClientApp process).

    Several SuperNodes on one machine each run torch with every core by default;
    an operator gives each its share with ``--node-config "... num-threads=N"``.
    None when the node does not set it (``compute.num_threads`` then applies).

    Raises
    ------
    ValueError
        If the value is not a positive integer.
    """
    value = context.node_config.get("num-threads")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"`num-threads`={value!r} should be a positive integer")
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(
            f"`num-threads`={value!r} in the node config should be a positive integer"
        )
    return threads


def make_client_fn(
    cfg: ExperimentConfig | None = None,
) -> Callable[[Context], Client]:
    """Build ``client_fn``; without ``cfg`` the config comes from ``run_config``.

    ``flwr.simulation.run_simulation`` hands apps an empty run_config, so the
    in-process path passes the experiment in by closure.
    """

    def client_fn(context: Context) -> Client:
        # One malloc arena: a client process's freed activations then go back to
        # the system on trim instead of staying in per-thread arenas.
        on_process_start("client")
        exp = cfg if cfg is not None else ExperimentConfig.from_flat(context.run_config)
        pid, num = node_partition(context, exp.fed.num_clients)
        threads = node_threads(context)
        if threads is not None and threads != exp.compute.num_threads:
            exp = dataclasses.replace(
                exp, compute=dataclasses.replace(exp.compute, num_threads=threads)
            )
        client: Client = LoRAClient(exp, pid, num, context.state).to_client()
        return client

    return client_fn
