"""Everything that can be checked before the federated engine starts.

A bad data file, a model directory that does not exist or target modules that
match nothing should cost a second and one line, not a Ray start and a traceback.
:func:`preflight` loads the data and the base model in this process (the in-process
simulation's ServerApp then reuses both from the cache) and writes nothing.
"""

from __future__ import annotations

from lora_flwr.config import ExperimentConfig, check_cross_feature
from lora_flwr.data.partition import partition_indices
from lora_flwr.experiment import (
    get_workspace,
    heldout_data,
    resolve_model_config,
    splits,
)
from lora_flwr.readout import check_readout


def preflight(cfg: ExperimentConfig) -> None:
    """Check settings, data, labels, encoding, partition sizes, model and targets.

    Raises
    ------
    ValueError
        On settings that cannot run together (every one of the schema's
        cross-feature refusals ``cfg`` triggers, one per line), data the run
        cannot use (bad encoding or labels, too few rows for the clients, an
        empty partition, instruction data without responses), a model / LoRA
        target that does not fit, or a tokenizer without the chat template that
        instruction data needs.
    FileNotFoundError
        On a missing data file.
    """
    # The schema applies these when a config is built; repeated here (it costs
    # microseconds) so that this one call is a complete gate for whatever config
    # object it is handed, and reports every refusal at once.
    check_cross_feature(cfg)
    data = splits(cfg)  # reads the file: missing, encoding, columns
    resolve_model_config(cfg)  # task and labels against the model
    parts = partition_indices(data.train, cfg.data, cfg.fed.num_clients, seed=cfg.seed)
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise ValueError(
            f"{len(empty)} of fed.num_clients={cfg.fed.num_clients} partitions get no "
            f"training rows (partitions {empty[:5]}{'...' if len(empty) > 5 else ''}) "
            f"from {len(data.train)} rows split {cfg.data.partitioner!r}; use fewer "
            "clients or more data"
        )
    ws = get_workspace(cfg)  # the model directory, and target modules that match
    if data.train.messages is not None:
        # Instruction data: renders the held-out set with the chat template (a
        # tokenizer without one is refused here) and logs what max_length cut; the
        # in-process server reuses it.
        heldout_data(ws, cfg)
    check_readout(ws, cfg)  # a benchmark / samples the run could not produce
