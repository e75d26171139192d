"""Per-process experiment objects: model + adapter + trainer, and tokenized data.

Loading a model and tokenizing a corpus are the expensive parts of a run, so both are
done once per process and reused by every client and round that process serves
(FlowerTune rebuilds the model every round). A client call only resets adapter
tensors. Used by the centralised CLI and by the Flower apps alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from lora_flwr.assets import cache_dir
from lora_flwr.config import (
    ComputeConfig,
    ExperimentConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
)
from lora_flwr.data import (
    DatasetSplits,
    TextDataset,
    TokenizedDataset,
    client_data,
    eval_subset,
    load_splits,
    node_cache,
    tokenize,
)
from lora_flwr.data.chat import report_cuts
from lora_flwr.data.datasets import source_stamp
from lora_flwr.lora import LoRAAdapter
from lora_flwr.models import ModelBundle, load_model
from lora_flwr.models.bundle import EncoderOnlyError
from lora_flwr.models.quantize import check_device, quantize_linears
from lora_flwr.training import LoRATrainer
from lora_flwr.training.trainer import resolve_device

_LOCK = threading.RLock()
logger = logging.getLogger(__name__)


# What a trainer is built from: train, loss, compute and the eval batch size.
_TrainerKey = tuple[TrainConfig, LossConfig, ComputeConfig, int]


@dataclass
class _Shared:
    """What every workspace of one (model, LoRA config, seed) shares in a process."""

    bundle: ModelBundle
    adapter: LoRAAdapter
    initial: dict[str, npt.NDArray[np.float32]]
    # one trainer per (train, loss, compute, eval batch size) it was built with
    trainers: dict[_TrainerKey, LoRATrainer] = field(default_factory=dict)


@dataclass
class Workspace:
    """A base model with its adapter and a trainer, owned by one process.

    One base model and adapter serve every rank tier, learning rate and rule of
    the process (the adapter runs at a rank <= its allocated one); only the
    trainer follows the ``TrainConfig`` the workspace was asked for.
    """

    bundle: ModelBundle
    adapter: LoRAAdapter
    trainer: LoRATrainer
    # The seeded starting adapter (A, zero B and the initial modules_to_save) by
    # weight name, captured when the base model was loaded.
    initial: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """``"seq_cls"`` or ``"causal_lm"``."""
        return self.bundle.task

    @property
    def initial_weights(self) -> list[npt.NDArray[np.float32]]:
        """The seeded starting adapter in weight order."""
        return [self.initial[n] for n in self.adapter.weight_names()]

    def reset_adapter(self) -> None:
        """Restore the seeded start: adapter, full rank, all trainable, base ``W0``.

        ``adapter.reset(seed)`` re-draws A and zeroes B but leaves a trained
        classifier head as it is, so a second run in the same process would not
        start from the same adapter as the first.
        """
        self.adapter.set_base_delta(None)
        self.adapter.set_named_weights(self.initial)
        self.adapter.set_trainable()


_SHARED: dict[tuple[ModelConfig, LoraConfig, int], _Shared] = {}
# Global splits (held-out set, centralised train pool): a few per process.
_TOKENIZED: dict[tuple[object, ...], TokenizedDataset] = {}
# Client partitions, most recently used last. Bounded: with 1,000 virtual clients
# one Ray actor serves hundreds of partitions over a run, and each would otherwise
# stay in memory for good; an evicted one is read back from the node cache on
# disk in milliseconds.
CLIENT_CACHE_SIZE = 64
_CLIENT_DATA: OrderedDict[
    tuple[object, ...], tuple[TokenizedDataset, TokenizedDataset]
] = OrderedDict()
_MODEL_CONFIGS: dict[tuple[ModelConfig, object, int], ModelConfig] = {}


def resolve_model_config(cfg: ExperimentConfig) -> ModelConfig:
    """Resolve ``model.task`` from the data and check the label count fits (once).

    Raises
    ------
    ValueError
        If the model's task does not match the dataset's, or the dataset has more
        classes than ``model.num_labels``.
    """
    key = (cfg.model, cfg.data, cfg.seed)
    with _LOCK:
        if key in _MODEL_CONFIGS:
            return _MODEL_CONFIGS[key]
    # A task resolved and checked by an earlier process (a deployed node's last
    # message) is read back instead of reading the whole corpus again.
    description = {
        "data": dataclasses.asdict(cfg.data),
        "corpus": source_stamp(cfg.data.name),
        "seed": cfg.seed,
        "model": dataclasses.asdict(cfg.model),
    }
    path = node_cache.task_path(cache_dir(), description)
    stored = node_cache.load_task(path, description)
    if stored is not None:
        resolved = dataclasses.replace(cfg.model, task=stored)  # type: ignore[arg-type]
        with _LOCK:
            _MODEL_CONFIGS[key] = resolved
        return resolved
    splits = load_splits(cfg.data, seed=cfg.seed)
    model_cfg = cfg.model
    if model_cfg.task == "auto":
        model_cfg = dataclasses.replace(model_cfg, task=splits.task)
    elif model_cfg.task == "seq_cls" and splits.task == "causal_lm":
        why = splits.unlabelled or f"dataset {cfg.data.name!r} has no labels"
        raise ValueError(
            f"`model.task` = 'seq_cls' needs labels but {why}; {_label_fix(why)}, "
            "or set model.task = 'causal_lm' for next-token training"
        )
    elif model_cfg.task != splits.task:
        raise ValueError(
            f"`model.task` is {model_cfg.task!r} but dataset {cfg.data.name!r} is a "
            f"{splits.task!r} dataset; set model.task = 'auto' or pick another dataset"
        )
    if splits.task == "seq_cls" and splits.num_labels > model_cfg.num_labels:
        raise ValueError(
            f"Dataset {cfg.data.name!r} has {splits.num_labels} classes (labels up "
            f"to {splits.num_labels - 1}) but `model.num_labels` is "
            f"{model_cfg.num_labels}; labels must be integers in [0, num_labels)"
        )
    if splits.task == "seq_cls":
        present = sorted(set(splits.train.labels or ()))
        if len(present) < 2:
            raise ValueError(
                f"Dataset {cfg.data.name!r} has a single class {present} in its "
                "training rows; a classifier needs at least two (check "
                f"`data.label_column` = {cfg.data.label_column!r})"
            )
    try:
        node_cache.save_task(path, description, model_cfg.task)
    except OSError as exc:  # a read-only or full disk costs speed, not the run
        logger.warning("could not cache the resolved task at %s: %s", path, exc)
    with _LOCK:
        _MODEL_CONFIGS[key] = model_cfg
    return model_cfg


def _no_labels_for_classifier(cfg: ExperimentConfig, exc: EncoderOnlyError) -> str:
    """Say why unlabelled data meets an encoder-only model, and the two fixes."""
    why = load_splits(cfg.data, seed=cfg.seed).unlabelled or (
        f"dataset {cfg.data.name!r} has no labels"
    )
    return (
        f"{why}, so the run would train next-token prediction, which "
        f"{cfg.model.name!r} (an encoder-only {exc.model_type} model) cannot do; "
        f"{_label_fix(why)}, or for next-token training set model.task = "
        "'causal_lm' with a causal model (e.g. model.name = 'smollm2-135m')"
    )


def _label_fix(why: str) -> str:
    """How to give the data labels, given why it has none."""
    if why.startswith("`data.label_column`"):
        return "set data.label_column to the column holding the classes"
    return "use a corpus with labels (a .csv or .jsonl with a label column)"


def get_workspace(cfg: ExperimentConfig) -> Workspace:
    """Return this process's workspace for ``cfg`` (base model built on first use).

    The base model and adapter are keyed on the model, the LoRA config and the
    seed only, so runs that differ in training settings, rule or rank tier share
    one base model. The adapter is initialised from ``cfg.seed``, so every process
    builds the same starting adapter (and the same new classifier head, if any).
    """
    model_cfg = resolve_model_config(cfg)
    key = (model_cfg, cfg.lora, cfg.seed)
    with _LOCK:
        shared = _SHARED.get(key)
        if shared is None:
            try:
                bundle = load_model(model_cfg, seed=cfg.seed)
            except EncoderOnlyError as exc:
                if cfg.model.task != "auto":
                    raise
                # The task came from the data: say why the data has no labels.
                raise ValueError(_no_labels_for_classifier(cfg, exc)) from None
            if model_cfg.quantization != "none":
                _quantize(bundle, cfg)
            adapter = LoRAAdapter(cfg.lora, seed=cfg.seed)
            adapter.apply(bundle.model)
            shared = _Shared(bundle, adapter, adapter.get_named_weights())
            _SHARED[key] = shared
        settings = (cfg.train, cfg.loss, cfg.compute, cfg.eval.batch_size)
        trainer = shared.trainers.get(settings)
        if trainer is None:
            trainer = LoRATrainer(
                shared.adapter,
                shared.bundle.task,
                cfg.train,
                loss=cfg.loss,
                compute=cfg.compute,
                eval_batch_size=cfg.eval.batch_size,
            )
            shared.trainers[settings] = trainer
        return Workspace(shared.bundle, shared.adapter, trainer, shared.initial)


def _quantize(bundle: ModelBundle, cfg: ExperimentConfig) -> None:
    """Swap the frozen base's linear layers for int8 / NF4 ones (model.quantization)."""
    mode = cfg.model.quantization
    check_device(mode, resolve_device(cfg.compute.device))
    names = quantize_linears(bundle.model, mode, skip=cfg.lora.modules_to_save)
    logger.info("model.quantization = %r: %d linear layers quantized", mode, len(names))


def clear_caches() -> None:
    """Forget every workspace and tokenized dataset of this process."""
    with _LOCK:
        _SHARED.clear()
        _MODEL_CONFIGS.clear()
        _TOKENIZED.clear()
        _CLIENT_DATA.clear()


def _tokenized(
    ws: Workspace, cfg: ExperimentConfig, key: tuple[object, ...], ds: TextDataset
) -> TokenizedDataset:
    full_key = (
        cfg.data,
        cfg.seed,
        cfg.model.name,
        cfg.model.max_length,
        cfg.model.fallback_template,
        *key,
    )
    with _LOCK:
        tok = _TOKENIZED.get(full_key)
        if tok is None:
            where = "the held-out set" if key[0] == "test" else "the train pool"
            tok = _tokenize(ws, cfg, ds, where)
            _TOKENIZED[full_key] = tok
        return tok


def _tokenize(
    ws: Workspace, cfg: ExperimentConfig, ds: TextDataset, where: str
) -> TokenizedDataset:
    """Tokenize ``ds`` for the model; report what truncation cut of responses."""
    tok = tokenize(
        ds,
        ws.bundle.tokenizer,
        ws.task,  # type: ignore[arg-type]
        cfg.model.max_length,
        fallback_template=cfg.model.fallback_template,
        model_name=cfg.model.name,
    )
    if ds.messages is not None:
        report_cuts(where, cfg.model.max_length, len(tok), tok.truncated, tok.dropped)
    return tok


def splits(cfg: ExperimentConfig) -> DatasetSplits:
    """Return the train pool and global held-out split (cached per process)."""
    return load_splits(cfg.data, seed=cfg.seed)


def centralized_train_data(ws: Workspace, cfg: ExperimentConfig) -> TokenizedDataset:
    """All training data, tokenized: the centralised reference trains on this."""
    return _tokenized(ws, cfg, ("train",), splits(cfg).train)


def heldout_data(ws: Workspace, cfg: ExperimentConfig) -> TokenizedDataset:
    """Return the global held-out set (capped by ``eval.max_examples``)."""
    subset = eval_subset(splits(cfg).test, cfg.eval.max_examples, seed=cfg.seed)
    return _tokenized(ws, cfg, ("test",), subset)


def client_datasets(
    ws: Workspace, cfg: ExperimentConfig, partition_id: int, num_partitions: int
) -> tuple[TokenizedDataset, TokenizedDataset]:
    """One client's local train and local test data, tokenized (cached).

    Cached in the process (the :data:`CLIENT_CACHE_SIZE` most recently used
    partitions), and on disk under ``$LORA_FLWR_CACHE/partitions`` (see
    :mod:`lora_flwr.data.node_cache`): a deployed node's next ClientApp process,
    or an actor that dropped the partition from memory, reads it back instead of
    partitioning the corpus again.
    """
    key = (
        cfg.data,
        cfg.seed,
        cfg.model.name,
        cfg.model.max_length,
        cfg.model.fallback_template,
        partition_id,
        num_partitions,
    )
    with _LOCK:
        cached = _CLIENT_DATA.get(key)
        if cached is not None:
            _CLIENT_DATA.move_to_end(key)
            return cached
    description = _partition_description(ws, cfg, partition_id, num_partitions)
    path = node_cache.cache_path(cache_dir(), description)
    stored = node_cache.load_partition(path, description)
    if stored is None:
        train, test = client_data(cfg.data, partition_id, num_partitions, seed=cfg.seed)
        where = f"partition {partition_id}'s local"
        stored = {
            "train": _tokenize(ws, cfg, train, f"{where} train set"),
            "test": _tokenize(ws, cfg, test, f"{where} test set"),
        }
        try:
            node_cache.save_partition(path, description, stored)
        except OSError as exc:  # a read-only or full disk costs speed, not the run
            logger.warning(
                "could not cache partition %d at %s: %s", partition_id, path, exc
            )
    with _LOCK:
        data = _CLIENT_DATA.setdefault(key, (stored["train"], stored["test"]))
        _CLIENT_DATA.move_to_end(key)
        while len(_CLIENT_DATA) > CLIENT_CACHE_SIZE:
            _CLIENT_DATA.popitem(last=False)
        return data


def _partition_description(
    ws: Workspace, cfg: ExperimentConfig, partition_id: int, num_partitions: int
) -> dict[str, object]:
    """Everything a node's tokenized partition depends on (its cache key)."""
    return {
        "data": dataclasses.asdict(cfg.data),
        "corpus": source_stamp(cfg.data.name),
        "seed": cfg.seed,
        "partition": [partition_id, num_partitions],
        "task": ws.task,
        "model": cfg.model.name,
        "max_length": cfg.model.max_length,
        "tokenizer": node_cache.tokenizer_identity(ws.bundle.tokenizer),
        # instruction data: the template it is rendered with
        "chat_template": _template_digest(ws, cfg),
    }


def _template_digest(ws: Workspace, cfg: ExperimentConfig) -> str:
    """SHA-256 of the chat template instruction data would be rendered with."""
    own = getattr(ws.bundle.tokenizer, "chat_template", None)
    text = json.dumps([own, cfg.model.fallback_template], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
