"""The simulation engine's Flower side, with the engine itself stood in."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import pytest
from flwr.common.logger import FLOWER_LOGGER

from lora_flwr.config import ExperimentConfig
from lora_flwr.fl import engine
from lora_flwr.fl.directory import PartitionDirectory

ROOT = Path(__file__).resolve().parents[2]


def test_the_backend_gets_the_clients_resources_and_rays_log_level() -> None:
    # Prepare
    cfg = ExperimentConfig().with_overrides(
        ["compute.client_cpus=2.0", "compute.client_gpus=0.5"]
    )

    # Execute
    quiet = engine.backend_config(cfg, verbose=False)
    loud = engine.backend_config(cfg, verbose=True)

    # Assert
    assert quiet["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert quiet["init_args"] == {"logging_level": logging.ERROR, "log_to_driver": True}
    assert loud["init_args"]["logging_level"] == logging.INFO


def test_run_engine_hands_the_apps_and_the_partition_map_to_flower(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare
    cfg = ExperimentConfig().with_overrides(["fed.num_clients=3"])
    seen: dict[str, Any] = {}

    def server_app(c: ExperimentConfig, run_dir: Path, parts: Any) -> str:
        seen["server"] = (c, run_dir, parts)
        return "server-app"

    def run_simulation(**kwargs: Any) -> None:
        seen["run"] = kwargs

    monkeypatch.setattr(engine, "make_server_app", server_app)
    monkeypatch.setattr(engine, "make_client_app", lambda c: f"client-app {c.name}")
    monkeypatch.setattr(engine, "run_simulation", run_simulation)

    # Execute
    engine.run_engine(cfg, tmp_path, verbose=False)

    # Assert
    assert seen["server"][:2] == (cfg, tmp_path)
    assert isinstance(seen["server"][2], PartitionDirectory)
    assert seen["run"] == {
        "server_app": "server-app",
        "client_app": f"client-app {cfg.name}",
        "num_supernodes": 3,
        "backend_config": engine.backend_config(cfg, verbose=False),
        "verbose_logging": False,
    }


def test_quiet_flower_drops_the_deprecation_notice_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    monkeypatch.setattr(FLOWER_LOGGER, "filters", list(FLOWER_LOGGER.filters))
    monkeypatch.setattr(FLOWER_LOGGER, "level", FLOWER_LOGGER.level)

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord("flwr", logging.WARNING, "", 0, text, None, None)

    # Execute
    engine.quiet_flower(verbose=False)

    # Assert
    assert FLOWER_LOGGER.level == logging.WARNING
    assert not FLOWER_LOGGER.filter(record("DEPRECATED FEATURE: use flwr run"))
    assert FLOWER_LOGGER.filter(record("a round failed"))


def test_the_simulation_module_imports_no_flower() -> None:
    # Prepare
    tree = ast.parse((ROOT / "lora_flwr" / "simulation.py").read_text())

    # Execute
    found = [
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]

    # Assert
    assert found and not [m for m in found if m.split(".")[0] == "flwr"]
