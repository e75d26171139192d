"""``--config FILE`` and ``--set key=value`` for the commands that run experiments."""

from __future__ import annotations

import argparse

from lora_flwr.config.schema import ExperimentConfig


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and repeatable ``--set key=value`` to a CLI parser."""
    parser.add_argument("--config", default="configs/default.toml", help="TOML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set fed.num_rounds=3",
    )


def config_from_arguments(args: argparse.Namespace) -> ExperimentConfig:
    """Load ``args.config`` and apply ``args.overrides`` (see add_config_arguments)."""
    cfg = ExperimentConfig.from_toml(args.config)
    return cfg.with_overrides(args.overrides)
