"""Per-process experiment objects: model + adapter + trainer, and tokenized data.

Loading a model and tokenizing a corpus are the expensive parts of a run, so both are
done once per process and reused by every client and round that process serves
(FlowerTune rebuilds the model every round). A client call only resets adapter
tensors. Used by the centralised CLI and by the Flower apps alike.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from lora_flwr.config import ExperimentConfig, LoraConfig, ModelConfig, TrainConfig
from lora_flwr.data import (
    DatasetSplits,
    TextDataset,
    TokenizedDataset,
    client_data,
    eval_subset,
    load_splits,
    tokenize,
)
from lora_flwr.lora import LoRAAdapter
from lora_flwr.models import ModelBundle, load_model
from lora_flwr.training import LoRATrainer

_LOCK = threading.RLock()


@dataclass
class Workspace:
    """A base model with its adapter and trainer, owned by one process."""

    bundle: ModelBundle
    adapter: LoRAAdapter
    trainer: LoRATrainer
    # The seeded starting adapter (A, zero B and the initial modules_to_save),
    # captured when the workspace was built.
    initial_weights: list[npt.NDArray[np.float32]] = field(default_factory=list)

    @property
    def task(self) -> str:
        """``"seq_cls"`` or ``"causal_lm"``."""
        return self.bundle.task

    def reset_adapter(self) -> None:
        """Restore the seeded starting adapter, ``modules_to_save`` included.

        ``adapter.reset(seed)`` re-draws A and zeroes B but leaves a trained
        classifier head as it is, so a second run in the same process would not
        start from the same adapter as the first.
        """
        self.adapter.set_weights(self.initial_weights)


_WORKSPACES: dict[tuple[ModelConfig, LoraConfig, TrainConfig, int], Workspace] = {}
_TOKENIZED: dict[tuple[object, ...], TokenizedDataset] = {}


def _model_config(cfg: ExperimentConfig) -> ModelConfig:
    """Resolve ``model.task`` from the data and check the label count fits."""
    splits = load_splits(cfg.data, seed=cfg.seed)
    model_cfg = cfg.model
    if model_cfg.task == "auto":
        model_cfg = dataclasses.replace(model_cfg, task=splits.task)
    elif model_cfg.task != splits.task:
        raise ValueError(
            f"`model.task` is {model_cfg.task!r} but dataset {cfg.data.name!r} is a "
            f"{splits.task!r} dataset; set model.task = 'auto' or pick another dataset"
        )
    if splits.task == "seq_cls" and splits.num_labels > model_cfg.num_labels:
        raise ValueError(
            f"Dataset {cfg.data.name!r} has {splits.num_labels} classes but "
            f"`model.num_labels` is {model_cfg.num_labels}"
        )
    return model_cfg


def get_workspace(cfg: ExperimentConfig) -> Workspace:
    """Return this process's workspace for ``cfg`` (built on first use).

    The adapter is initialised from ``cfg.seed``, so every process builds the same
    starting adapter (and the same new classifier head, if any).
    """
    model_cfg = _model_config(cfg)
    key = (model_cfg, cfg.lora, cfg.train, cfg.seed)
    with _LOCK:
        ws = _WORKSPACES.get(key)
        if ws is None:
            bundle = load_model(model_cfg, seed=cfg.seed)
            adapter = LoRAAdapter(cfg.lora, seed=cfg.seed)
            adapter.apply(bundle.model)
            trainer = LoRATrainer(adapter, bundle.task, cfg.train)
            ws = Workspace(
                bundle=bundle,
                adapter=adapter,
                trainer=trainer,
                initial_weights=adapter.get_weights(),
            )
            _WORKSPACES[key] = ws
        return ws


def clear_caches() -> None:
    """Forget every workspace and tokenized dataset of this process."""
    with _LOCK:
        _WORKSPACES.clear()
        _TOKENIZED.clear()


def _tokenized(
    ws: Workspace, cfg: ExperimentConfig, key: tuple[object, ...], ds: TextDataset
) -> TokenizedDataset:
    full_key = (cfg.data, cfg.seed, cfg.model.name, cfg.model.max_length, *key)
    with _LOCK:
        tok = _TOKENIZED.get(full_key)
        if tok is None:
            tok = tokenize(ds, ws.bundle.tokenizer, ws.task, cfg.model.max_length)  # type: ignore[arg-type]
            _TOKENIZED[full_key] = tok
        return tok


def splits(cfg: ExperimentConfig) -> DatasetSplits:
    """Return the train pool and global held-out split (cached per process)."""
    return load_splits(cfg.data, seed=cfg.seed)


def centralized_train_data(ws: Workspace, cfg: ExperimentConfig) -> TokenizedDataset:
    """All training data, tokenized: the centralised reference trains on this."""
    return _tokenized(ws, cfg, ("train",), splits(cfg).train)


def heldout_data(ws: Workspace, cfg: ExperimentConfig) -> TokenizedDataset:
    """Return the global held-out set (capped by ``data.eval_max_examples``)."""
    subset = eval_subset(splits(cfg).test, cfg.data, seed=cfg.seed)
    return _tokenized(ws, cfg, ("test",), subset)


def client_datasets(
    ws: Workspace, cfg: ExperimentConfig, partition_id: int, num_partitions: int
) -> tuple[TokenizedDataset, TokenizedDataset]:
    """One client's local train and local test data, tokenized (cached)."""
    train, test = client_data(cfg.data, partition_id, num_partitions, seed=cfg.seed)
    key = ("client", partition_id, num_partitions)
    return (
        _tokenized(ws, cfg, (*key, "train"), train),
        _tokenized(ws, cfg, (*key, "test"), test),
    )
