"""``[tool.flwr.app.config]`` in pyproject.toml, generated from the schema.

``flwr run`` refuses run-config keys the app does not declare, and takes every
key it does not get from ``--run-config`` from this table. The table is therefore
the experiment the app runs by default (``configs/default.toml`` as the schema
reads it), flattened: every key of the schema, dotted, with lists written as
comma-separated strings (run-config values are bool/int/float/str only).

Regenerate it with ``python -m lora_flwr.config --app-config --write
pyproject.toml``; a unit test fails while the file and the schema disagree.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_flwr.config.load import toml_value
from lora_flwr.config.schema import ExperimentConfig

HEADER = "[tool.flwr.app.config]"
DEFAULT_CONFIG = "configs/default.toml"


def app_config_table(cfg: ExperimentConfig) -> str:
    """Return the table for ``cfg``: its header, then one ``key = value`` per key."""
    lines = [HEADER, *(f"{k} = {toml_value(v)}" for k, v in cfg.to_flat().items())]
    return "\n".join(lines) + "\n"


def table_lines(text: str) -> tuple[int, int]:
    """Line span ``[start, end)`` of the table in a pyproject.toml text.

    The table runs from its header to the first blank line, comment or header.

    Raises
    ------
    ValueError
        If the text has no ``[tool.flwr.app.config]`` header.
    """
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == HEADER)
    except StopIteration:
        raise ValueError(f"no {HEADER} table found") from None
    end = start + 1
    while end < len(lines) and lines[end].strip()[:1] not in ("", "#", "["):
        end += 1
    return start, end


def current_table(text: str) -> str:
    """Return the table as a pyproject.toml text holds it (as generated)."""
    start, end = table_lines(text)
    return "\n".join(text.splitlines()[start:end]) + "\n"


def replace_table(text: str, table: str) -> str:
    """``text`` with its table replaced by ``table``; every other line kept."""
    start, end = table_lines(text)
    lines = text.splitlines(keepends=True)
    return "".join(lines[:start]) + table + "".join(lines[end:])


def main(argv: Sequence[str] | None = None) -> int:
    """Print, write or check the table (``python -m lora_flwr.config``)."""
    parser = argparse.ArgumentParser(prog="python -m lora_flwr.config")
    parser.add_argument(
        "--app-config",
        action="store_true",
        help=f"print the {HEADER} table generated from the schema",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the app's defaults")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="PYPROJECT", help="replace its table")
    action.add_argument(
        "--check", metavar="PYPROJECT", help="exit 1 if its table differs"
    )
    args = parser.parse_args(argv)
    if not args.app_config:
        parser.print_help(sys.stderr)
        return 2
    table = app_config_table(ExperimentConfig.from_toml(args.config))
    if args.write:
        path = Path(args.write)
        path.write_text(replace_table(path.read_text(), table))
    elif args.check:
        if current_table(Path(args.check).read_text()) != table:
            print(f"{args.check}: {HEADER} differs from the schema", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(table)
    return 0
