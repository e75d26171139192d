"""Tests of lora_flwr.data: corpora, global split, partitions, tokenisation."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from lora_flwr.config import DataConfig
from lora_flwr.data import (
    BUILTIN_DATASETS,
    IGNORE_INDEX,
    TextDataset,
    TokenizedDataset,
    client_data,
    collate,
    eval_subset,
    infinite_batches,
    iter_batches,
    load_splits,
    parse_play,
    partition_indices,
    tokenize,
)
from lora_flwr.data.partition import dirichlet_seed

PROPERTY_SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


# ------------------------------------------------------------------ helpers
def _word_tokenizer(
    texts: list[str] | tuple[str, ...], *, add_cls_sep: bool = False
) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer built in memory (no hub)."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for text in texts:
        for word in text.split():
            vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    if add_cls_sep:
        backend.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]"
    )


def _write_csv(path: Path, n: int = 50) -> Path:
    """A csv with unique texts, string labels and 5 groups."""
    lines = ["id,review,sentiment,user"]
    for i in range(n):
        sentiment = ["neg", "pos", "neutral"][i % 3]
        lines.append(f'{i},"review number {i}, fine",{sentiment},u{i % 5}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _unique_cfg(tmp_path: Path, **kwargs: object) -> DataConfig:
    """DataConfig over a csv of 50 unique texts."""
    path = _write_csv(tmp_path / "reviews.csv")
    return DataConfig(
        name=str(path),
        text_column="review",
        label_column="sentiment",
        group_column="user",
        **kwargs,  # type: ignore[arg-type]
    )


# ----------------------------------------------------------- global split
def test_split_is_disjoint_sized_and_deterministic(tmp_path: Path) -> None:
    # Prepare
    cfg = _unique_cfg(tmp_path, test_fraction=0.3)

    # Execute
    splits = load_splits(cfg, seed=0)
    again = load_splits(cfg, seed=0)
    other = load_splits(cfg, seed=1)

    # Assert
    train, test = set(splits.train.texts), set(splits.test.texts)
    assert len(splits.test) == round(0.3 * 50) == 15
    assert len(splits.train) == 35
    assert train.isdisjoint(test)
    assert train | test == {f"review number {i}, fine" for i in range(50)}
    assert again == splits
    assert set(other.test.texts) != test
    assert splits.task == "seq_cls"
    assert splits.num_labels == 3


def test_split_keeps_text_label_group_aligned(tmp_path: Path) -> None:
    # Prepare
    cfg = _unique_cfg(tmp_path)

    # Execute
    splits = load_splits(cfg, seed=3)

    # Assert: labels are sorted string classes: neg=0, neutral=1, pos=2
    assert splits.train.labels is not None
    for text, label, group in zip(
        splits.train.texts, splits.train.labels, splits.train.groups, strict=True
    ):
        i = int(text.split()[2].rstrip(","))
        assert label == {0: 0, 1: 2, 2: 1}[i % 3]
        assert group == f"u{i % 5}"


def test_max_examples_and_min_group_size(tmp_path: Path) -> None:
    # Prepare
    lines = ["text,who"] + [f"t{i},big" for i in range(30)] + ["s0,small", "s1,small"]
    path = tmp_path / "groups.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = {"name": str(path), "group_column": "who", "test_fraction": 0.25}

    # Execute
    sub = load_splits(DataConfig(max_examples=20, **base), seed=0)  # type: ignore[arg-type]
    filtered = load_splits(DataConfig(min_group_size=3, **base), seed=0)  # type: ignore[arg-type]

    # Assert
    assert len(sub.train) + len(sub.test) == 20
    assert len(filtered.train) + len(filtered.test) == 30
    assert "small" not in filtered.train.groups + filtered.test.groups
    assert filtered.task == "causal_lm"
    assert filtered.train.labels is None


def test_split_too_small_names_test_fraction(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "one.txt"
    path.write_text("only line\n", encoding="utf-8")

    # Execute / Assert
    with pytest.raises(ValueError, match="test_fraction"):
        load_splits(DataConfig(name=str(path)), seed=0)


def test_eval_subset_caps_and_is_seeded() -> None:
    # Prepare
    test = load_splits(DataConfig(name="synthetic"), seed=0).test

    # Execute
    capped = eval_subset(test, 7, seed=5)
    again = eval_subset(test, 7, seed=5)
    full = eval_subset(test, 0, seed=5)

    # Assert
    assert len(capped) == 7
    assert capped == again
    assert set(capped.texts) <= set(test.texts)
    assert full is test


# --------------------------------------------------------------- synthetic
def test_synthetic_is_learnable_and_label_skewed() -> None:
    # Prepare
    from lora_flwr.data.synthetic import _NEGATIVE, _POSITIVE

    # Execute
    splits = load_splits(DataConfig(name="synthetic"), seed=0)

    # Assert
    data = splits.train
    assert data.labels is not None
    assert len(splits.train) + len(splits.test) == 400
    assert len(set(data.groups)) == 8
    for text, label in zip(data.texts, data.labels, strict=True):
        words = set(text.split())
        cues, other = (_POSITIVE, _NEGATIVE) if label else (_NEGATIVE, _POSITIVE)
        assert words & set(cues)
        assert not words & set(other)
    share = {
        g: sum(lb for lb, gg in zip(data.labels, data.groups, strict=True) if gg == g)
        / data.groups.count(g)
        for g in set(data.groups)
    }
    assert share["g0"] < 0.3 < 0.7 < share["g7"]


def test_synthetic_lm_is_causal_with_8_groups() -> None:
    # Execute
    splits = load_splits(DataConfig(name="synthetic_lm"), seed=0)

    # Assert
    assert splits.task == "causal_lm"
    assert splits.num_labels == 0
    assert splits.train.labels is None
    assert len(set(splits.train.groups)) == 8
    assert all(text.endswith(".") for text in splits.train.texts)


# -------------------------------------------------------------- partitions
def _check_cover(parts: list[list[int]], n: int, num_partitions: int) -> None:
    """Every index in exactly one partition, none empty."""
    assert len(parts) == num_partitions
    assert all(parts)
    assert sorted(i for p in parts for i in p) == list(range(n))


@PROPERTY_SETTINGS
@given(
    partitioner=st.sampled_from(["iid", "dirichlet", "natural"]),
    num_partitions=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_partitions_cover_every_index_once(
    partitioner: str, num_partitions: int, seed: int
) -> None:
    # Prepare
    cfg = DataConfig(name="synthetic", partitioner=partitioner, dirichlet_alpha=1.0)  # type: ignore[arg-type]
    train = load_splits(cfg, seed=0).train

    # Execute
    parts = partition_indices(train, cfg, num_partitions, seed=seed)

    # Assert
    _check_cover(parts, len(train), num_partitions)


@PROPERTY_SETTINGS
@given(
    num_partitions=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_natural_keeps_each_group_in_one_partition(
    num_partitions: int, seed: int
) -> None:
    # Prepare: 8 groups, so 8 partitions use NaturalIdPartitioner, 4 (group_size 2)
    # GroupedNaturalIdPartitioner and 3, 5, 6, 7 the fallback.
    cfg = DataConfig(name="synthetic", partitioner="natural")
    train = load_splits(cfg, seed=0).train

    # Execute
    parts = partition_indices(train, cfg, num_partitions, seed=seed)

    # Assert
    _check_cover(parts, len(train), num_partitions)
    owner: dict[str, int] = {}
    for pid, part in enumerate(parts):
        for i in part:
            assert owner.setdefault(train.groups[i], pid) == pid
    groups_per_part = Counter(owner.values())
    assert max(groups_per_part.values()) - min(groups_per_part.values()) <= 1


def test_partitions_are_deterministic_per_seed() -> None:
    # Prepare
    cfg = DataConfig(name="synthetic", partitioner="iid")
    train = load_splits(cfg, seed=0).train

    # Execute
    first = partition_indices(train, cfg, 4, seed=1)
    again = partition_indices(train, cfg, 4, seed=1)
    other = partition_indices(train, cfg, 4, seed=2)

    # Assert
    assert first == again
    assert first != other
    assert [len(p) for p in first] == [80, 80, 80, 80]


def test_iid_partitions_are_shuffled() -> None:
    # Prepare: the pool is in corpus order, IidPartitioner alone would cut it into
    # contiguous blocks.
    cfg = DataConfig(name="synthetic", partitioner="iid")
    train = load_splits(cfg, seed=0).train

    # Execute
    parts = partition_indices(train, cfg, 4, seed=0)

    # Assert
    assert parts[0] != list(range(len(parts[0])))
    assert max(parts[0]) > len(train) // 2


def test_dirichlet_without_labels_names_the_fix() -> None:
    # Prepare
    cfg = DataConfig(name="synthetic_lm", partitioner="dirichlet")
    train = load_splits(cfg, seed=0).train

    # Execute / Assert
    with pytest.raises(ValueError, match="no labels.*'iid' or 'natural'"):
        partition_indices(train, cfg, 4, seed=0)


def test_natural_with_fewer_groups_than_partitions_errors() -> None:
    # Prepare
    cfg = DataConfig(name="synthetic", partitioner="natural")
    train = load_splits(cfg, seed=0).train

    # Execute / Assert
    with pytest.raises(ValueError, match="8 group.*for 9 partitions"):
        partition_indices(train, cfg, 9, seed=0)


def test_natural_on_corpus_without_groups_errors(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(f"line {i}" for i in range(20)), encoding="utf-8")
    cfg = DataConfig(name=str(path), partitioner="natural")
    train = load_splits(cfg, seed=0).train

    # Execute / Assert
    with pytest.raises(ValueError, match="1 group"):
        partition_indices(train, cfg, 2, seed=0)


def test_client_data_splits_the_partition() -> None:
    # Prepare
    cfg = DataConfig(name="synthetic", partitioner="natural", local_test_fraction=0.25)
    train = load_splits(cfg, seed=0).train
    part = partition_indices(train, cfg, 4, seed=0)[2]

    # Execute
    local_train, local_test = client_data(cfg, 2, 4, seed=0)

    # Assert
    assert len(local_test) == int(0.25 * len(part))
    assert len(local_train) + len(local_test) == len(part)
    assert Counter(local_train.texts + local_test.texts) == Counter(
        train.texts[i] for i in part
    )
    assert set(local_train.groups) | set(local_test.groups) == {
        train.groups[i] for i in part
    }


def test_client_data_without_local_test() -> None:
    # Prepare
    cfg = DataConfig(name="synthetic", partitioner="iid", local_test_fraction=0.0)

    # Execute
    local_train, local_test = client_data(cfg, 0, 4, seed=0)

    # Assert
    assert len(local_test) == 0
    assert len(local_train) == 80


@pytest.mark.parametrize("partition_id", [-1, 4])
def test_client_data_rejects_bad_partition_id(partition_id: int) -> None:
    # Prepare
    cfg = DataConfig(name="synthetic")

    # Execute / Assert
    with pytest.raises(ValueError, match="partition_id"):
        client_data(cfg, partition_id, 4, seed=0)


# ------------------------------------------------------------- local files
def test_jsonl_with_int_labels_and_groups(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "data.jsonl"
    rows = [{"t": f"text {i}", "y": i % 2, "g": f"a{i % 4}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = DataConfig(
        name=str(path), text_column="t", label_column="y", group_column="g"
    )

    # Execute
    splits = load_splits(cfg, seed=0)

    # Assert
    assert splits.task == "seq_cls"
    assert splits.num_labels == 2
    assert splits.train.labels is not None
    pairs = zip(splits.train.texts, splits.train.labels, strict=True)
    assert all(int(t.split()[1]) % 2 == y for t, y in pairs)
    assert set(splits.train.groups) <= {"a0", "a1", "a2", "a3"}


def test_csv_int_labels_written_as_strings(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ints.csv"
    lines = ["text,label"] + [f"x{i},{i % 3 * 5 % 3}" for i in range(30)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    # Execute
    splits = load_splits(DataConfig(name=str(path)), seed=0)

    # Assert: "10" > "2" as strings would break; kept as ints 0..2
    assert splits.num_labels == 3
    assert splits.train.labels is not None
    assert set(splits.train.labels) == {0, 1, 2}


def test_txt_is_causal_one_example_per_line(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n  second line  \nthird\nfourth\n", encoding="utf-8")

    # Execute
    splits = load_splits(DataConfig(name=str(path), test_fraction=0.25), seed=0)

    # Assert
    assert splits.task == "causal_lm"
    assert sorted(splits.train.texts + splits.test.texts) == sorted(
        ["first line", "second line", "third", "fourth"]
    )
    assert len(splits.test) == 1


def test_missing_text_column_names_existing_columns(tmp_path: Path) -> None:
    # Prepare
    path = _write_csv(tmp_path / "r.csv")

    # Execute / Assert
    with pytest.raises(ValueError, match=r"'body'.*\['id', 'review'"):
        load_splits(DataConfig(name=str(path), text_column="body"), seed=0)


def test_missing_group_column_errors(tmp_path: Path) -> None:
    # Prepare
    path = _write_csv(tmp_path / "r.csv")
    cfg = DataConfig(name=str(path), text_column="review", group_column="author")

    # Execute / Assert
    with pytest.raises(ValueError, match="group_column.*'author'"):
        load_splits(cfg, seed=0)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "nope.csv"

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_splits(DataConfig(name=str(path)), seed=0)


def test_unknown_name_lists_builtins() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="rotten_tomatoes, shakespeare, synthetic"):
        load_splits(DataConfig(name="imdb"), seed=0)
    assert "synthetic_lm" in BUILTIN_DATASETS


# ------------------------------------------------------------ Shakespeare
_TINY_PLAY = """\
A TINY PLAY

PERSONS REPRESENTED.

KING OF NOWHERE.
Ber., a soldier.


ACT I.

SCENE I. A hall.

[Enter KING and Bernardo.]

KING.
Good morrow, friend.
How fares the watch?

Ber.
Well, my lord.
[Aside.] Too well.

Ber.
Run to my post.

[Exit KING.]

Alone at last.

ALL. Farewell.

THESEUS
Now, fair Hippolyta.

SCENE II. Elsewhere.

Westminster Abbey.
"""


def test_parse_play_reads_speakers_and_skips_directions() -> None:
    # Execute
    speeches = parse_play(_TINY_PLAY)

    # Assert
    assert speeches == [
        ("KING", "Good morrow, friend.\nHow fares the watch?"),
        ("BER", "Well, my lord.\nToo well."),
        ("BER", "Run to my post.\nAlone at last."),
        ("ALL", "Farewell."),
        ("THESEUS", "Now, fair Hippolyta."),
    ]


def test_parse_play_without_acts_is_a_poem() -> None:
    # Execute / Assert
    assert parse_play("SONNET I.\nFrom fairest creatures we desire increase,\n") == []


# ------------------------------------------------------------ tokenisation
def test_tokenize_truncates_and_keeps_special_tokens() -> None:
    # Prepare
    ds = TextDataset(("a b c d e f", "a b"), (1, 0), ("", ""))
    tokenizer = _word_tokenizer(ds.texts, add_cls_sep=True)

    # Execute
    tok = tokenize(ds, tokenizer, "seq_cls", max_length=4)

    # Assert
    cls, sep = 2, 3
    assert tok.input_ids[0].tolist() == [cls, 4, 5, sep]
    assert tok.input_ids[1].tolist() == [cls, 4, 5, sep]
    assert tok.input_ids[0].dtype == torch.long
    assert tok.labels is not None
    assert tok.labels.tolist() == [1, 0]
    assert tok.num_tokens == 8
    assert len(tok) == 2
    assert tok.pad_token_id == 0


def test_tokenize_seq_cls_without_labels_errors() -> None:
    # Prepare
    ds = TextDataset(("a b",), None, ("",))

    # Execute / Assert
    with pytest.raises(ValueError, match="seq_cls"):
        tokenize(ds, _word_tokenizer(ds.texts), "seq_cls", max_length=8)


def test_collate_pads_right_and_masks() -> None:
    # Prepare
    ds = TextDataset(("a b c", "d", "e f"), (0, 1, 1), ("", "", ""))
    tok = tokenize(ds, _word_tokenizer(ds.texts), "seq_cls", max_length=16)

    # Execute
    batch = collate(tok, [1, 0])

    # Assert
    assert batch["input_ids"].tolist() == [[7, 0, 0], [4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [1, 0]


def test_collate_causal_labels_ignore_pads() -> None:
    # Prepare
    ds = TextDataset(("a b c", "d"), None, ("", ""))
    tok = tokenize(ds, _word_tokenizer(ds.texts), "causal_lm", max_length=16)

    # Execute
    batch = collate(tok, [0, 1])

    # Assert
    assert tok.labels is None
    assert batch["labels"].tolist() == [[4, 5, 6], [7, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["input_ids"].tolist() == [[4, 5, 6], [7, 0, 0]]


def _numbered(n: int) -> tuple[TextDataset, PreTrainedTokenizerFast]:
    """n one-word texts whose token id identifies the example (id = i + 4)."""
    texts = tuple(f"w{i}" for i in range(n))
    ds = TextDataset(texts, tuple(i % 2 for i in range(n)), ("",) * n)
    return ds, _word_tokenizer(texts)


def test_iter_batches_seeded_and_covers_each_example_once() -> None:
    # Prepare
    ds, tokenizer = _numbered(10)
    tok = tokenize(ds, tokenizer, "seq_cls", max_length=4)

    def epoch(seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return [
            (b["input_ids"][:, 0] - 4).tolist()
            for b in iter_batches(tok, 4, shuffle=True, generator=gen)
        ]

    # Execute
    first, again, other = epoch(0), epoch(0), epoch(1)
    plain = [
        (b["input_ids"][:, 0] - 4).tolist() for b in iter_batches(tok, 4, shuffle=False)
    ]
    dropped = list(iter_batches(tok, 4, shuffle=False, drop_last=True))

    # Assert
    assert first == again
    assert first != other
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(dropped) == 2


def test_infinite_batches_reshuffles_every_epoch() -> None:
    # Prepare
    ds, tokenizer = _numbered(6)
    tok = tokenize(ds, tokenizer, "seq_cls", max_length=4)
    stream = infinite_batches(tok, 3, generator=torch.Generator().manual_seed(0))

    # Execute
    batches = [(next(stream)["input_ids"][:, 0] - 4).tolist() for _ in range(6)]

    # Assert
    epochs = [batches[0] + batches[1], batches[2] + batches[3], batches[4] + batches[5]]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


# ------------------------------------------------------- real corpora (slow)
@pytest.mark.slow
def test_rotten_tomatoes_counts() -> None:
    # Execute
    start = time.perf_counter()
    splits = load_splits(DataConfig(name="rotten_tomatoes", test_fraction=0.2), seed=0)
    elapsed = time.perf_counter() - start

    # Assert
    everything = splits.train.groups + splits.test.groups
    labels = (splits.train.labels or ()) + (splits.test.labels or ())
    assert len(everything) == 12_808
    assert len(set(everything)) == 508
    assert Counter(labels) == {1: 7_403, 0: 5_405}
    assert len(splits.test) == round(0.2 * 12_808)
    assert splits.num_labels == 2
    assert elapsed < 10


@pytest.mark.slow
def test_rotten_tomatoes_natural_partitions() -> None:
    # Prepare
    cfg = DataConfig(name="rotten_tomatoes", partitioner="natural", test_fraction=0.2)
    train = load_splits(cfg, seed=0).train

    # Execute
    parts = partition_indices(train, cfg, 10, seed=0)

    # Assert
    _check_cover(parts, len(train), 10)
    movies = [len({train.groups[i] for i in p}) for p in parts]
    assert sorted(movies) == [50, 50] + [51] * 8


@pytest.mark.slow
def test_shakespeare_counts_and_a_speech() -> None:
    # Execute
    start = time.perf_counter()
    splits = load_splits(DataConfig(name="shakespeare"), seed=0)
    elapsed = time.perf_counter() - start

    # Assert
    texts = splits.train.texts + splits.test.texts
    groups = splits.train.groups + splits.test.groups
    roles = Counter(groups)
    assert splits.task == "causal_lm"
    assert 29_000 < len(texts) < 32_000
    assert 1_300 < len(roles) < 1_450
    assert 180 <= sum(1 for c in roles.values() if c >= 50) <= 200
    assert len({g.split("/")[0] for g in groups}) == 37
    assert roles["hamlet/HAM"] > 300
    to_be = [t for t in texts if t.startswith("To be, or not to be")]
    assert len(to_be) == 1
    assert groups[texts.index(to_be[0])] == "hamlet/HAM"
    assert "Whether 'tis nobler in the mind to suffer" in to_be[0]
    assert not any("[" in t or "]" in t for t in texts)
    assert elapsed < 10


@pytest.mark.slow
def test_tokenize_rotten_tomatoes_with_minilm() -> None:
    # Prepare
    model_dir = Path.home() / ".cache" / "lora_flwr" / "minilm" / "model"
    if not (model_dir / "tokenizer.json").is_file():
        pytest.skip(f"MiniLM tokenizer not cached at {model_dir}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    splits = load_splits(DataConfig(name="rotten_tomatoes"), seed=0)

    # Execute
    start = time.perf_counter()
    tok = tokenize(splits.train, tokenizer, "seq_cls", max_length=64)
    elapsed = time.perf_counter() - start

    # Assert
    assert len(tok) == len(splits.train)
    assert max(int(ids.numel()) for ids in tok.input_ids) <= 64
    assert all(ids[0] == tokenizer.cls_token_id for ids in tok.input_ids)
    assert elapsed < 30


def _varied_lengths(n: int, seed: int = 0) -> TokenizedDataset:
    """``n`` examples whose first token is their index and whose lengths vary."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 40, size=n)
    ids = tuple(
        torch.cat([torch.tensor([i + 4]), torch.full((int(k) - 1,), 7)])
        for i, k in enumerate(lengths)
    )
    labels = torch.tensor([i % 2 for i in range(n)])
    return TokenizedDataset(ids, labels, "seq_cls", pad_token_id=0)


def _epoch(
    tok: TokenizedDataset, seed: int, bucket: int
) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return list(
        iter_batches(tok, 8, shuffle=True, generator=gen, bucket_batches=bucket)
    )


@pytest.mark.parametrize("bucket", [2, 4, 100])
def test_bucketed_batches_visit_each_example_once_with_less_padding(
    bucket: int,
) -> None:
    # Prepare
    tok = _varied_lengths(203)

    # Execute
    plain = _epoch(tok, 0, 0)
    bucketed = _epoch(tok, 0, bucket)
    again = _epoch(tok, 0, bucket)

    # Assert: the same examples once each, seeded, fewer padded positions
    def seen(batches: list[dict[str, torch.Tensor]]) -> list[int]:
        return sorted(int(i) - 4 for b in batches for i in b["input_ids"][:, 0])

    assert seen(bucketed) == list(range(203))
    assert [b["input_ids"].tolist() for b in bucketed] == [
        b["input_ids"].tolist() for b in again
    ]
    padded = sum(int(b["input_ids"].numel()) for b in bucketed)
    assert padded < sum(int(b["input_ids"].numel()) for b in plain)
    real = sum(int(b["attention_mask"].sum()) for b in bucketed)
    assert real == sum(int(t.numel()) for t in tok.input_ids)
    # Labels still follow their examples.
    for b in bucketed:
        assert (b["labels"] == (b["input_ids"][:, 0] - 4) % 2).all()


@pytest.mark.parametrize("bucket", [0, 1])
def test_bucketing_off_gives_the_plain_shuffle(bucket: int) -> None:
    tok = _varied_lengths(50)
    off = [b["input_ids"].tolist() for b in _epoch(tok, 3, bucket)]
    assert off == [b["input_ids"].tolist() for b in _epoch(tok, 3, 0)]


def test_bucketed_batch_order_is_random_not_sorted() -> None:
    tok = _varied_lengths(400)
    longest = [int(b["input_ids"].shape[1]) for b in _epoch(tok, 0, 50)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_negative_bucket_batches_is_refused() -> None:
    with pytest.raises(ValueError, match="`bucket_batches` should be >= 0.*-1"):
        next(iter_batches(_varied_lengths(4), 2, shuffle=True, bucket_batches=-1))


def test_extreme_dirichlet_retries_with_derived_seeds() -> None:
    # Prepare: 320 synthetic examples, 6 partitions of >= 10 at alpha = 0.1; one
    # flwr_datasets seed (10 draws) fails for each of seeds 0-4 here, as it did for
    # seeds 1 and 2 of the real label-skew task (10 clients).
    cfg = DataConfig(name="synthetic", partitioner="dirichlet", dirichlet_alpha=0.1)
    train = load_splits(cfg, seed=0).train
    labels = np.asarray(train.labels)

    # Execute
    found = {s: partition_indices(train, cfg, 6, seed=s) for s in range(5)}
    again = partition_indices(train, cfg, 6, seed=3)

    # Assert: every seed gets skewed partitions of the minimum size, deterministically
    assert again == found[3]
    for parts in found.values():
        _check_cover(parts, len(train), 6)
        assert min(len(p) for p in parts) >= 10
        shares = [labels[p].mean() for p in parts]
        assert max(shares) - min(shares) > 0.5
    assert found[0] != found[1]


def test_dirichlet_try_zero_keeps_the_experiment_seed() -> None:
    # Partitions found by the first try are the ones earlier releases produced.
    assert dirichlet_seed(7, 0) == 7
    assert len({dirichlet_seed(7, a) for a in range(1, 50)}) == 49


# ---------------------------------------- errors name lines, never content
SECRET = "s3cr3t-v4lue"


@pytest.mark.parametrize(
    ("name", "body", "cfg", "where"),
    [
        # a header that is not a row of column names
        ("a.csv", f"user:{SECRET}:/home\nx:y:z\n", {}, "line 1"),
        # a label cell left empty on line 3 (a quoted cell spans lines 2-3 first)
        (
            "b.csv",
            f'text,label\n"two\nlines {SECRET}",1\n{SECRET},\n',
            {},
            "line 4",
        ),
        # JSON that does not parse, and JSON that is not an object
        ("c.jsonl", f'{{"text": "a", "label": 1}}\n{{"text": {SECRET}\n', {}, "2"),
        ("d.jsonl", f'{{"text": "a", "label": 1}}\n["{SECRET}"]\n', {}, "2"),
        # a missing text column among keys that are not column names
        ("e.jsonl", f'{{"{SECRET}/x:y": "a"}}\n', {}, "keys"),
        # a missing group column
        (
            "f.csv",
            f"text,label\n{SECRET},1\n",
            {"group_column": "user"},
            "'user'",
        ),
    ],
)
def test_a_data_file_error_names_the_line_not_the_content(
    tmp_path: Path, name: str, body: str, cfg: dict[str, str], where: str
) -> None:
    # Prepare
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")

    # Execute
    with pytest.raises(ValueError) as info:
        load_splits(DataConfig(name=str(path), **cfg), seed=0)  # type: ignore[arg-type]

    # Assert
    message = str(info.value)
    assert SECRET not in message, message
    assert str(path) in message and where in message, message


def test_a_csv_without_its_label_column_says_why_it_has_no_labels(
    tmp_path: Path,
) -> None:
    # Prepare
    path = tmp_path / "t.csv"
    path.write_text("text,id\n" + "".join(f"x {i},{i}\n" for i in range(20)))

    # Execute
    splits = load_splits(DataConfig(name=str(path)), seed=0)

    # Assert
    assert splits.task == "causal_lm"
    assert splits.unlabelled == (
        f"`data.label_column` = 'label' is not a column of {path} "
        "(its columns are ['text', 'id'])"
    )
