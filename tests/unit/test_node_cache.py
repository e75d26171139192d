"""The node's on-disk partition cache: hit, miss on any change, broken files rebuilt."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_flwr import experiment
from lora_flwr.config import DataConfig, ExperimentConfig, ModelConfig
from lora_flwr.data import node_cache

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**data: Any) -> ExperimentConfig:
    cfg = ExperimentConfig.from_toml(ROOT / "configs" / "smoke.toml")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))


def _files(root: Path) -> list[Path]:
    return sorted((root / "partitions").glob("*.safetensors"))


def _same(a: Any, b: Any) -> None:
    assert len(a) == len(b) and a.task == b.task and a.pad_token_id == b.pad_token_id
    for x, y in zip(a.input_ids, b.input_ids, strict=True):
        assert torch.equal(x, y)
    assert (a.labels is None) == (b.labels is None)
    if a.labels is not None:
        assert torch.equal(a.labels, b.labels)


def _forbid_partitioning(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = experiment.client_data

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "client_data", spy)
    return calls


def test_a_new_process_reads_the_partition_back_instead_of_rebuilding_it(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the first call builds and stores the partition.
    cfg = _cfg()
    ws = experiment.get_workspace(cfg)
    first = experiment.client_datasets(ws, cfg, 1, 2)
    assert len(_files(cache)) == 1
    experiment.clear_caches()  # as a fresh ClientApp process
    calls = _forbid_partitioning(monkeypatch)

    # Execute
    ws = experiment.get_workspace(cfg)
    second = experiment.client_datasets(ws, cfg, 1, 2)

    # Assert: no partitioning, identical token ids and labels.
    assert calls == []
    _same(first[0], second[0])
    _same(first[1], second[1])
    assert len(second[0]) > 0 and second[0].labels is not None


@pytest.mark.parametrize(
    "change",
    [
        {"partition": (0, 2)},
        {"partition": (1, 3)},
        {"seed": 1},
        {"data": {"test_fraction": 0.3}},
        {"data": {"local_test_fraction": 0.2}},
        {"model": {"max_length": 16}},
    ],
)
def test_any_change_to_what_produced_it_is_a_miss(
    cache: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, Any]
) -> None:
    # Prepare
    cfg = _cfg()
    experiment.client_datasets(experiment.get_workspace(cfg), cfg, 1, 2)
    experiment.clear_caches()
    calls = _forbid_partitioning(monkeypatch)
    pid, num = change.get("partition", (1, 2))
    if "seed" in change:
        cfg = dataclasses.replace(cfg, seed=change["seed"])
    if "data" in change:
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, **change["data"])
        )
    if "model" in change:
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, **change["model"])
        )

    # Execute
    experiment.client_datasets(experiment.get_workspace(cfg), cfg, pid, num)

    # Assert: built anew, stored next to the first.
    assert calls == [1]
    assert len(_files(cache)) == 2


def test_an_edited_local_corpus_is_a_miss(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a local CSV corpus, cached once, then edited.
    corpus = tmp_path / "reviews.csv"
    rows = [
        f"review number {i} is {'good' if i % 2 else 'bad'},{i % 2}" for i in range(40)
    ]
    corpus.write_text("text,label\n" + "\n".join(rows) + "\n")
    cfg = _cfg(name=str(corpus))
    experiment.client_datasets(experiment.get_workspace(cfg), cfg, 0, 2)
    experiment.clear_caches()
    corpus.write_text(corpus.read_text().replace("review number 3 ", "review 3 "))
    os.utime(corpus, (1, 1))  # a different size and time, as any edit
    calls = _forbid_partitioning(monkeypatch)

    # Execute
    train, _ = experiment.client_datasets(experiment.get_workspace(cfg), cfg, 0, 2)

    # Assert
    assert calls == [1]
    assert len(_files(cache)) == 2


@pytest.mark.parametrize("damage", ["truncate", "other_description", "bad_lengths"])
def test_a_broken_or_foreign_file_is_ignored_and_rebuilt(
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    # Prepare
    cfg = _cfg()
    ws = experiment.get_workspace(cfg)
    good = experiment.client_datasets(ws, cfg, 1, 2)
    (path,) = _files(cache)
    description = experiment._partition_description(ws, cfg, 1, 2)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "other_description":
        other = {**description, "seed": 99}
        node_cache.save_partition(path, other, {"train": good[0], "test": good[1]})
    else:
        # Lengths that no longer add up to the stored ids.
        raw = load_file(str(path))
        raw["train.lengths"][0] += 1
        save_file(raw, str(path), metadata={"lora_flwr": _meta(path)})
    experiment.clear_caches()
    calls = _forbid_partitioning(monkeypatch)

    # Execute
    with caplog.at_level(logging.WARNING, logger="lora_flwr.data.node_cache"):
        again = experiment.client_datasets(experiment.get_workspace(cfg), cfg, 1, 2)

    # Assert: a warning, a rebuild, the right data, and a good file again.
    assert calls == [1]
    assert "ignoring the cached partition" in caplog.text
    _same(good[0], again[0])
    assert node_cache.load_partition(path, description) is not None


def _meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return str((f.metadata() or {})["lora_flwr"])


def test_a_tokenizer_is_described_by_its_files() -> None:
    # Prepare: the tiny tokenizer is built in code (no directory); a fake one
    # loaded from a directory lists that directory's files.
    class Tok:
        name_or_path = str(ROOT / "configs")
        pad_token_id = 0

        def __len__(self) -> int:
            return 7

    # Execute
    identity = node_cache.tokenizer_identity(Tok())

    # Assert
    assert identity["vocab"] == 7 and identity["pad"] == 0
    assert "smoke.toml" in identity["files"]


def test_model_and_data_configs_are_part_of_the_description() -> None:
    # Prepare / Execute / Assert: the key changes with any field.
    base = {"data": dataclasses.asdict(DataConfig()), "model": "m"}
    keys = {
        node_cache.cache_key(base),
        node_cache.cache_key({**base, "model": "n"}),
        node_cache.cache_key(
            {**base, "data": dataclasses.asdict(DataConfig(dirichlet_alpha=0.3))}
        ),
        node_cache.cache_key({**base, "model_cfg": dataclasses.asdict(ModelConfig())}),
    }
    assert len(keys) == 4


def test_a_resolved_task_is_read_back_without_the_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a first process resolves the task from the corpus
    monkeypatch.setenv("LORA_FLWR_CACHE", str(tmp_path))
    cfg = ExperimentConfig.from_flat(
        {"model.name": "tiny-bert", "data.name": "synthetic"}
    )
    experiment.clear_caches()
    first = experiment.resolve_model_config(cfg)
    experiment.clear_caches()  # a fresh process: nothing in memory
    calls: list[object] = []

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(args)
        raise AssertionError("the corpus should not be read again")

    monkeypatch.setattr(experiment, "load_splits", spy)

    # Execute
    second = experiment.resolve_model_config(cfg)

    # Assert
    assert first.task == second.task == "seq_cls"
    assert calls == []
    assert len(list((tmp_path / "tasks").glob("*.json"))) == 1


def test_a_broken_task_file_is_ignored(tmp_path: Path) -> None:
    # Prepare
    description = {"data": "x"}
    path = node_cache.task_path(tmp_path, description)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")

    # Execute / Assert
    assert node_cache.load_task(path, description) is None
    node_cache.save_task(path, description, "causal_lm")
    assert node_cache.load_task(path, description) == "causal_lm"
    assert node_cache.load_task(path, {"data": "y"}) is None
