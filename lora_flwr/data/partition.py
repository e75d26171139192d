"""Split the global train pool across clients with Flower Datasets' partitioners.

* ``iid``: :class:`~flwr_datasets.partitioner.IidPartitioner` on a seeded shuffle
  (the partitioner itself cuts contiguous shards and does not shuffle).
* ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` over the
  labels with concentration ``dirichlet_alpha`` (label skew); for data without
  labels, over the categories of ``data.group_column`` (instruction data split by
  task category, as Shepherd splits Dolly).
* ``natural``: whole groups (movies, ``play/ROLE``) per client.
  :class:`~flwr_datasets.partitioner.NaturalIdPartitioner` when there are exactly
  as many groups as partitions, else
  :class:`~flwr_datasets.partitioner.GroupedNaturalIdPartitioner` over a seeded order
  of the groups.

``flwr_datasets`` (and Hugging Face ``datasets``) take ~2 s to import, so they are
imported on first use.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lora_flwr.config import DataConfig
from lora_flwr.data.datasets import TextDataset, load_splits

if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

# Seed streams (see datasets.py): distinct from the global split's.
_PARTITION_STREAM = 10
_LOCAL_SPLIT_STREAM = 11

# Smallest Dirichlet partition asked of flwr_datasets (its default is 10), lowered
# for small pools so that sampling does not give up.
_DIRICHLET_MIN_SIZE = 10
# flwr_datasets gives up after 10 draws with one seed; at alpha = 0.1 over two
# labels that happens for most seeds. Further tries use seeds derived from the
# experiment's (try 0 is the seed itself, so partitions found there never change).
_DIRICHLET_SEED_TRIES = 50

INDEX_COLUMN = "idx"
LABEL_COLUMN = "label"
GROUP_COLUMN = "group"


def partition_indices(
    train: TextDataset, cfg: DataConfig, num_partitions: int, *, seed: int
) -> list[list[int]]:
    """Assign every example of ``train`` to one of ``num_partitions`` clients.

    Parameters
    ----------
    train
        The global train pool (``DatasetSplits.train``).
    cfg
        The data section; ``partitioner`` and ``dirichlet_alpha`` are used.
    num_partitions
        Number of clients.
    seed
        Seed of the shuffle (iid), the Dirichlet draws or the group order (natural).

    Returns
    -------
    list[list[int]]
        For each partition, sorted indices into ``train``. Every index appears in
        exactly one partition and no partition is empty. Cached per process.

    Raises
    ------
    ValueError
        When the partitioner cannot give ``num_partitions`` non-empty partitions:
        ``dirichlet`` without labels, fewer natural groups than partitions, or a
        partition left empty.
    """
    if num_partitions < 1:
        raise ValueError(
            f"`num_partitions` should be >= 1 but the value passed is {num_partitions}"
        )
    # Unlabelled data with a category column: Dirichlet skew over the categories.
    by_group = train.labels is None and bool(cfg.group_column)
    result = _partition_cached(
        train, cfg.partitioner, cfg.dirichlet_alpha, num_partitions, seed, by_group
    )
    return [list(p) for p in result]


def client_data(
    cfg: DataConfig, partition_id: int, num_partitions: int, *, seed: int
) -> tuple[TextDataset, TextDataset]:
    """Return one client's ``(local_train, local_test)``.

    The client's partition of the global train pool is split by a seeded
    permutation; ``local_test`` holds ``floor(cfg.local_test_fraction * n)``
    examples, so it is empty when the fraction is 0 or the partition is tiny.

    Parameters
    ----------
    cfg
        The data section.
    partition_id
        Which client, in ``[0, num_partitions)`` (Flower's ``partition-id``).
    num_partitions
        Number of clients (Flower's ``num-partitions``).
    seed
        Experiment seed (global split, partition and local split).

    Returns
    -------
    tuple[TextDataset, TextDataset]
        Disjoint local train and local test sets.

    Raises
    ------
    ValueError
        For a ``partition_id`` out of range, or see :func:`partition_indices`.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"`partition_id` should be in [0, {num_partitions}) (num_partitions = "
            f"{num_partitions}) but the value passed is {partition_id}"
        )
    train = load_splits(cfg, seed=seed).train
    part = partition_indices(train, cfg, num_partitions, seed=seed)[partition_id]
    n_test = int(cfg.local_test_fraction * len(part))
    rng = np.random.default_rng([seed, _LOCAL_SPLIT_STREAM, partition_id])
    perm = rng.permutation(len(part))
    test_idx = sorted(part[i] for i in perm[:n_test])
    train_idx = sorted(part[i] for i in perm[n_test:])
    return train.subset(train_idx), train.subset(test_idx)


# ---------------------------------------------------------------- internals
@functools.lru_cache(maxsize=32)
def _partition_cached(
    train: TextDataset,
    partitioner: str,
    alpha: float,
    num_partitions: int,
    seed: int,
    by_group: bool = False,
) -> tuple[tuple[int, ...], ...]:
    """Compute the partitions (see :func:`partition_indices`)."""
    n = len(train)
    if n < num_partitions:
        raise ValueError(
            f"The train pool has {n} examples, fewer than the {num_partitions} "
            "partitions; use fewer clients (`fed.num_clients`) or more data "
            "(`data.max_examples`, `data.test_fraction`)"
        )
    if partitioner == "iid":
        parts = _iid(train, num_partitions, seed)
    elif partitioner == "dirichlet":
        parts = _dirichlet(train, alpha, num_partitions, seed, by_group)
    elif partitioner == "natural":
        parts = _natural(train, num_partitions, seed)
    else:
        raise ValueError(
            f"`data.partitioner` should be one of 'iid', 'dirichlet', 'natural' but "
            f"the value passed is {partitioner!r}"
        )
    for pid, part in enumerate(parts):
        if not part:
            raise ValueError(
                f"Partition {pid} of {num_partitions} is empty with "
                f"`data.partitioner` = {partitioner!r}; use fewer clients "
                "(`fed.num_clients`), more data, or a larger `data.dirichlet_alpha`"
            )
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(n)), "partitions must cover every example once"
    return tuple(tuple(sorted(part)) for part in parts)


def _to_hf(train: TextDataset, order: Sequence[int] | None = None) -> datasets.Dataset:
    """Build a Hugging Face dataset; ``idx`` holds each row's position in train."""
    import datasets

    idx = list(range(len(train))) if order is None else [int(i) for i in order]
    columns: dict[str, list[object]] = {
        INDEX_COLUMN: list(idx),
        "text": [train.texts[i] for i in idx],
        GROUP_COLUMN: [train.groups[i] for i in idx],
    }
    if train.labels is not None:
        labels = train.labels
        columns[LABEL_COLUMN] = [labels[i] for i in idx]
    return datasets.Dataset.from_dict(columns)


def _read_partitions(partitioner: Partitioner, num_partitions: int) -> list[list[int]]:
    """Original positions of the rows of every partition."""
    got = partitioner.num_partitions
    if got != num_partitions:
        raise ValueError(
            f"{type(partitioner).__name__} produced {got} partitions instead of "
            f"{num_partitions}"
        )
    return [
        [int(i) for i in partitioner.load_partition(pid)[INDEX_COLUMN]]
        for pid in range(num_partitions)
    ]


def _iid(train: TextDataset, num_partitions: int, seed: int) -> list[list[int]]:
    """Equal random shards."""
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner takes contiguous shards of the dataset as given (no shuffle),
    # and our pool is in corpus order (sorted by movie / play): shuffle first.
    order = np.random.default_rng([seed, _PARTITION_STREAM]).permutation(len(train))
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = _to_hf(train, order.tolist())
    return _read_partitions(partitioner, num_partitions)


def _dirichlet(
    train: TextDataset,
    alpha: float,
    num_partitions: int,
    seed: int,
    by_group: bool = False,
) -> list[list[int]]:
    """Per-class (or per-category) Dirichlet(alpha) proportions across partitions."""
    from flwr_datasets.partitioner import DirichletPartitioner

    if train.labels is None and not by_group:
        raise ValueError(
            "`data.partitioner` = 'dirichlet' splits by label but this corpus has no "
            "labels (causal LM); use `data.partitioner` = 'iid' or 'natural', or "
            "name a category column in `data.group_column`"
        )
    min_size = max(1, min(_DIRICHLET_MIN_SIZE, len(train) // (2 * num_partitions)))
    dataset = _to_hf(train)
    last: ValueError | None = None
    for attempt in range(_DIRICHLET_SEED_TRIES):
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=GROUP_COLUMN if by_group else LABEL_COLUMN,
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=dirichlet_seed(seed, attempt),
        )
        partitioner.dataset = dataset
        try:
            with warnings.catch_warnings():
                # One warning per failed draw; the final error says it all.
                warnings.filterwarnings("ignore", message="The specified min_partition")
                return _read_partitions(partitioner, num_partitions)
        except ValueError as exc:
            last = exc
    raise ValueError(
        f"Dirichlet partitioning with `data.dirichlet_alpha` = {alpha} could not "
        f"give each of {num_partitions} partitions {min_size} examples in "
        f"{_DIRICHLET_SEED_TRIES} seeds x 10 draws ({last}); use a larger "
        "dirichlet_alpha, fewer clients or more data"
    )


def dirichlet_seed(seed: int, attempt: int) -> int:
    """Seed of the ``attempt``-th Dirichlet partitioning try (try 0: ``seed``)."""
    if attempt == 0:
        return seed
    state = np.random.SeedSequence([seed, _PARTITION_STREAM, attempt]).generate_state(1)
    return int(state[0])


def _natural(train: TextDataset, num_partitions: int, seed: int) -> list[list[int]]:
    """Whole groups per partition, as even in number of groups as possible."""
    from flwr_datasets.partitioner import (
        GroupedNaturalIdPartitioner,
        NaturalIdPartitioner,
    )

    groups = sorted(set(train.groups))
    n_groups = len(groups)
    if n_groups < num_partitions:
        raise ValueError(
            f"`data.partitioner` = 'natural' needs at least one group per partition "
            f"but the train pool has {n_groups} group(s) for {num_partitions} "
            "partitions; use fewer clients (`fed.num_clients`), a lower "
            "`data.min_group_size`, or `data.partitioner` = 'iid'"
        )
    if n_groups == num_partitions:
        partitioner: Partitioner = NaturalIdPartitioner(partition_by=GROUP_COLUMN)
        hf = _to_hf(train)
    else:
        # GroupedNaturalIdPartitioner takes the groups in order of first appearance
        # and cuts them into len // group_size chunks (np.array_split, mode
        # "allow-bigger"). Present the rows group by group in a seeded group order
        # so that which groups share a client depends on the seed, not the alphabet.
        rng = np.random.default_rng([seed, _PARTITION_STREAM])
        rank = {g: r for r, g in enumerate(rng.permutation(groups).tolist())}
        order = sorted(range(len(train)), key=lambda i: (rank[train.groups[i]], i))
        hf = _to_hf(train, order)
        group_size = n_groups // num_partitions
        if n_groups // group_size == num_partitions:
            partitioner = GroupedNaturalIdPartitioner(
                partition_by=GROUP_COLUMN, group_size=group_size, mode="allow-bigger"
            )
        else:
            # No group_size gives exactly num_partitions chunks (e.g. 25 groups on
            # 10 clients). Same array_split of the seeded group order, written as
            # a client column for NaturalIdPartitioner.
            chunks = np.array_split(np.arange(n_groups), num_partitions)
            client_of_rank = {
                int(r): f"{c:06d}" for c, chunk in enumerate(chunks) for r in chunk
            }
            hf = hf.add_column(
                "client", [client_of_rank[rank[train.groups[i]]] for i in order]
            )
            partitioner = NaturalIdPartitioner(partition_by="client")
    partitioner.dataset = hf
    return _read_partitions(partitioner, num_partitions)
