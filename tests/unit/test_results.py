"""Round history: printed table, JSON/CSV round trip and PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from lora_flwr.results import (
    format_header,
    format_row,
    format_table,
    plot_history,
    read_history,
    write_history,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RECORDS: list[dict[str, Any]] = [
    {"round": 0, "test_loss": 0.6931, "test_accuracy": 0.5},
    {
        "round": 1,
        "train_loss": 0.65,
        "test_loss": 0.6,
        "test_accuracy": 0.7,
        "fit_ok": 2,
        "bytes_up": 11280,
        "bytes_down": 22560,
        "round_seconds": 1.25,
        "aggregated": True,
    },
    {
        "round": 2,
        "train_loss": 0.5,
        "test_loss": 0.45,
        "test_accuracy": 0.85,
        "fit_ok": 1,
        "bytes_up": 5640,
        "bytes_down": 22560,
        "round_seconds": 0.75,
        "aggregated": False,
    },
]


# --------------------------------------------------------------------- table
def test_format_table_shows_only_columns_with_values() -> None:
    # Prepare / Execute
    table = format_table(RECORDS)

    # Assert
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == [
        "round",
        "train_loss",
        "test_loss",
        "test_acc",
        "fit_ok",
        "bytes_up",
        "bytes_down",
        "seconds",
    ]
    assert "test_ppl" not in table and "fed_loss" not in table
    # Round 0 has no training: dashes in those columns.
    assert lines[1].split() == ["0", "-", "0.6931", "0.5000", "-", "-", "-", "-"]
    assert lines[2].split() == [
        "1",
        "0.6500",
        "0.6000",
        "0.7000",
        "2",
        "11280",
        "22560",
        "1.2",
    ]
    # Columns line up: every row is as wide as the header.
    assert {len(line) for line in lines} == {len(lines[0])}


def test_format_row_uses_the_columns_of_all_records() -> None:
    # Prepare
    shape = [{"round": 0, "test_loss": 0.0, "test_perplexity": 0.0}]

    # Execute
    header = format_header(shape)
    row = format_row({"round": 3, "test_loss": 2.0, "test_perplexity": 7.389}, shape)
    missing = format_row({"round": 4, "test_loss": float("nan")}, shape)

    # Assert
    assert header.split() == ["round", "test_loss", "test_ppl"]
    assert row.split() == ["3", "2.0000", "7.39"]
    assert missing.split() == ["4", "-", "-"]
    assert len(row) == len(header) == len(missing)


def test_format_row_falls_back_to_str_for_odd_values() -> None:
    # Prepare
    shape = [{"round": 0, "fit_ok": 0}]

    # Execute
    row = format_row({"round": 1, "fit_ok": "n/a"}, shape)

    # Assert
    assert row.split() == ["1", "n/a"]


# ------------------------------------------------------------------- history
def test_write_then_read_history_round_trips(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"

    # Execute
    write_history(RECORDS, run_dir)
    back = read_history(run_dir)

    # Assert
    assert back == RECORDS
    assert json.loads((run_dir / "history.json").read_text()) == RECORDS
    with (run_dir / "history.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert list(rows[0]) == [
        "round",
        "test_loss",
        "test_accuracy",
        "train_loss",
        "fit_ok",
        "bytes_up",
        "bytes_down",
        "round_seconds",
        "aggregated",
    ]
    assert rows[0]["train_loss"] == ""
    assert float(rows[2]["test_accuracy"]) == 0.85
    assert int(rows[1]["bytes_up"]) == 11280
    assert rows[2]["aggregated"] == "False"
    assert not list(run_dir.glob("*.tmp*"))


def test_write_history_overwrites(tmp_path: Path) -> None:
    # Prepare
    write_history(RECORDS, tmp_path)

    # Execute
    write_history(RECORDS[:1], tmp_path)

    # Assert
    assert read_history(tmp_path) == RECORDS[:1]


def test_write_history_stores_numpy_scalars_as_numbers(tmp_path: Path) -> None:
    # Prepare
    import numpy as np

    records = [{"round": 1, "test_loss": np.float32(0.5)}]

    # Execute
    write_history(records, tmp_path)

    # Assert
    assert read_history(tmp_path) == [{"round": 1, "test_loss": 0.5}]


def test_read_history_without_a_file_is_a_clear_error(tmp_path: Path) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(FileNotFoundError, match="No history.json in"):
        read_history(tmp_path)


def test_read_history_rejects_a_non_list(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "history.json").write_text('{"round": 1}')

    # Execute / Assert
    with pytest.raises(ValueError, match="should hold a list of round records"):
        read_history(tmp_path)


# --------------------------------------------------------------------- plots
def test_plot_history_writes_png_files(tmp_path: Path) -> None:
    # Prepare / Execute
    paths = plot_history(RECORDS, tmp_path)

    # Assert: no perplexity series, so no perplexity plot.
    assert [p.name for p in paths] == ["loss.png", "accuracy.png", "bytes.png"]
    for path in paths:
        assert path.parent == tmp_path
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 1000
    assert not (tmp_path / "perplexity.png").exists()


def test_plot_history_for_a_language_model(tmp_path: Path) -> None:
    # Prepare
    records = [
        {"round": 0, "test_loss": 4.0, "test_perplexity": 54.6},
        {"round": 1, "test_loss": 3.0, "test_perplexity": 20.1},
    ]

    # Execute
    paths = plot_history(records, tmp_path)

    # Assert
    assert [p.name for p in paths] == ["loss.png", "perplexity.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_plot_history_with_nothing_to_plot_writes_nothing(tmp_path: Path) -> None:
    # Prepare / Execute
    paths = plot_history([{"round": 0}], tmp_path)

    # Assert
    assert paths == []
    assert list(tmp_path.iterdir()) == []
