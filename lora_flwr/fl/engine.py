"""Flower's in-process simulation engine (Ray), as ``run_simulation.py`` uses it.

:mod:`lora_flwr.simulation` owns the command line, the run directory and the
summary; this module is the part that touches Flower: its logger, the engine's
backend settings and the ``run_simulation`` call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.common.logger import FLOWER_LOGGER
from flwr.simulation import run_simulation

from lora_flwr.config import ExperimentConfig
from lora_flwr.fl.client_app import make_client_app
from lora_flwr.fl.compat import simulation_partitions
from lora_flwr.fl.server_app import make_server_app


class _DropDeprecation(logging.Filter):
    """Hide Flower's "use flwr run" notice: this entry point is deliberate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED" not in record.getMessage()


def quiet_flower(verbose: bool) -> None:
    """Drop Flower's deprecation notice; unless ``verbose``, warnings and up only."""
    FLOWER_LOGGER.addFilter(_DropDeprecation())
    if not verbose:
        FLOWER_LOGGER.setLevel(logging.WARNING)


def backend_config(cfg: ExperimentConfig, verbose: bool) -> dict[str, Any]:
    """Return the Ray backend's settings: resources per client, Ray's log level."""
    return {
        "client_resources": {
            "num_cpus": cfg.compute.client_cpus,
            "num_gpus": cfg.compute.client_gpus,
        },
        "init_args": {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": True,
        },
    }


def run_engine(cfg: ExperimentConfig, run_dir: Path, *, verbose: bool) -> None:
    """Run ``cfg``'s ServerApp and ClientApp in the simulation engine until done.

    Parameters
    ----------
    cfg
        The experiment; the apps get it by closure (the engine hands them an
        empty run_config).
    run_dir
        Where the ServerApp writes the run's outputs.
    verbose
        Show Flower's and Ray's logs.
    """
    config = backend_config(cfg, verbose)
    # The engine's node -> partition map goes to the strategy directly: no
    # get_properties message to each of the (maybe 1,000) virtual nodes.
    with simulation_partitions() as partitions:
        run_simulation(
            server_app=make_server_app(cfg, run_dir, partitions),
            client_app=make_client_app(cfg),
            num_supernodes=cfg.fed.num_clients,
            backend_config=config,
            verbose_logging=verbose,
        )
