"""[tool.flwr.app.config] in pyproject.toml is generated from the schema."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lora_flwr.config import ExperimentConfig
from lora_flwr.config.app_config import (
    HEADER,
    app_config_table,
    current_table,
    main,
    replace_table,
)

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
DEFAULT = ROOT / "configs" / "default.toml"
REGENERATE = "python -m lora_flwr.config --app-config --write pyproject.toml"


def _generated() -> str:
    return app_config_table(ExperimentConfig.from_toml(DEFAULT))


def test_pyproject_table_is_the_generated_one() -> None:
    # Prepare
    expected = _generated()

    # Execute
    found = current_table(PYPROJECT.read_text())

    # Assert
    assert found == expected, f"pyproject.toml is out of date; run: {REGENERATE}"


def test_pyproject_table_declares_exactly_the_schema_keys() -> None:
    # Prepare
    with PYPROJECT.open("rb") as fh:
        table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    flat = {
        f"{section}.{key}" if isinstance(values, dict) else section
        for section, values in table.items()
        for key in (values if isinstance(values, dict) else [None])
    }

    # Execute
    schema = set(ExperimentConfig().to_flat())

    # Assert
    assert flat == schema


def test_the_table_holds_only_flower_run_config_scalars() -> None:
    # Prepare / Execute
    table = tomllib.loads(_generated())["tool"]["flwr"]["app"]["config"]
    leaves = [
        v for s in table.values() for v in (s.values() if isinstance(s, dict) else [s])
    ]

    # Assert: Flower's run config takes bool/int/float/str, no lists or tables
    assert leaves and all(type(v) in (bool, int, float, str) for v in leaves)


def test_the_table_reads_back_as_the_default_experiment() -> None:
    # Prepare
    text = _generated().replace(HEADER, "")

    # Execute
    cfg = ExperimentConfig.from_dict(tomllib.loads(text))

    # Assert
    assert cfg == ExperimentConfig.from_toml(DEFAULT)


def test_write_replaces_only_the_table(tmp_path: Path) -> None:
    # Prepare: a copy whose table is stale (a key missing, one value changed)
    original = PYPROJECT.read_text()
    stale_table = (
        _generated().replace("fed.num_rounds = 8\n", "").replace("seed = 0", "seed = 5")
    )
    stale = tmp_path / "pyproject.toml"
    stale.write_text(replace_table(original, stale_table))

    args = ["--app-config", "--config", str(DEFAULT)]

    # Execute
    checked = main([*args, "--check", str(stale)])
    written = main([*args, "--write", str(stale)])

    # Assert: the table is regenerated and every other line is kept as it was
    assert checked == 1 and written == 0
    assert stale.read_text() == replace_table(original, _generated())
    assert main([*args, "--check", str(stale)]) == 0
    assert replace_table(original, current_table(original)) == original


def test_module_entry_prints_the_table() -> None:
    # Prepare / Execute
    out = subprocess.run(
        [sys.executable, "-m", "lora_flwr.config", "--app-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    # Assert
    assert out == _generated()


def test_a_text_without_the_table_is_refused() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=r"no \[tool.flwr.app.config\] table"):
        current_table("[project]\nname = 'x'\n")
