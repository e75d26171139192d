"""Corpora, the global split, client partitions and tokenised batches.

Nothing here imports Flower itself; ``flwr_datasets`` is imported on first use of
:func:`partition_indices`.
"""

from lora_flwr.config import Task
from lora_flwr.data.corpus import TextDataset
from lora_flwr.data.datasets import (
    BUILTIN_DATASETS,
    DatasetSplits,
    eval_subset,
    load_splits,
)
from lora_flwr.data.partition import client_data, partition_indices
from lora_flwr.data.shakespeare import parse_play
from lora_flwr.data.tokenize import (
    IGNORE_INDEX,
    TokenizedDataset,
    collate,
    infinite_batches,
    iter_batches,
    tokenize,
)

__all__ = [
    "BUILTIN_DATASETS",
    "IGNORE_INDEX",
    "DatasetSplits",
    "Task",
    "TextDataset",
    "TokenizedDataset",
    "client_data",
    "collate",
    "eval_subset",
    "infinite_batches",
    "iter_batches",
    "load_splits",
    "parse_play",
    "partition_indices",
    "tokenize",
]
