"""Everything that leans on Flower 1.42's internals, behind one version guard.

Flower's public API (``ClientApp``, ``ServerApp``, ``NumPyClient``, ``Strategy``,
``run_simulation``) is used where it is needed. What is listed here goes further:
it patches an engine function, wraps a grid for its polling interval, or imports
from modules Flower does not export. Each was written against Flower 1.42 and may
silently do the wrong thing on another release, so every patch checks the version
when it is used (:func:`check_flower_version`) and refuses to run on any other:

* :func:`simulation_partitions`: replaces the simulation engine's private
  ``vce_api._register_node_info_stores`` for the duration of a run, to learn
  each virtual node's partition (:mod:`lora_flwr.fl.directory`).
* :func:`prompt_grid`: wraps a deployment's gRPC grid in
  :class:`~lora_flwr.fl.grid.PromptGrid`, whose reply polling replaces 1.42's
  fixed 3 s one; it tells the in-memory grid apart by its class name.
* ``ClientAppCallable`` and ``Mod``: the types of a ClientApp mod, which 1.42
  keeps in ``flwr.clientapp.typing``.
* :func:`one_line_failures`: a filter on Flower's logger that drops the traceback
  from the record 1.42 logs for an app's exception (``"%s raised an exception"``,
  ``exc_info=ex``, in ``simulation/app.py`` and ``superlink/runtime/
  run_serverapp.py``) when the exception is one the app already says in one line.

To move to a new Flower release: check each item above against it (the unit tests
of ``tests/unit/test_compat.py``, ``test_scale.py`` and ``test_grid.py`` exercise
them), then raise :data:`FLOWER_VERSION_TESTED`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import flwr
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import FLOWER_LOGGER
from flwr.server import Grid

from lora_flwr.fl import directory
from lora_flwr.fl.directory import PartitionDirectory
from lora_flwr.fl.grid import PromptGrid

__all__ = [
    "FLOWER_REQUIREMENT",
    "FLOWER_VERSION_TESTED",
    "ClientAppCallable",
    "FlowerVersionError",
    "Mod",
    "PromptGrid",
    "check_flower_version",
    "one_line_failures",
    "prompt_grid",
    "simulation_partitions",
]

# The Flower release (major.minor) every patch here was written and tested on,
# and the requirement that installs it (pyproject.toml pins the same range).
FLOWER_VERSION_TESTED = "1.42"
FLOWER_REQUIREMENT = "flwr[simulation]>=1.42,<1.43"

# What the simulation engine's in-process grid is called in 1.42.
_IN_MEMORY_GRID = "InMemoryGrid"


class FlowerVersionError(RuntimeError):
    """The installed Flower is not the release the patches were tested on."""


def check_flower_version(version: str | None = None) -> str:
    """Return the installed Flower version if it is 1.42.x; raise otherwise.

    Parameters
    ----------
    version
        The version to check (default: ``flwr.__version__``, read at call time).

    Raises
    ------
    FlowerVersionError
        With one line naming the installed version and what to do.
    """
    installed = flwr.__version__ if version is None else version
    if installed.split(".")[:2] != FLOWER_VERSION_TESTED.split("."):
        raise FlowerVersionError(
            f"Flower {installed} is installed but lora_flwr's Flower patches "
            f"(lora_flwr/fl/compat.py) are tested on {FLOWER_VERSION_TESTED}.x "
            f"only: install '{FLOWER_REQUIREMENT}', or port the patches that "
            "module lists to this version"
        )
    return installed


@contextmanager
def simulation_partitions() -> Iterator[PartitionDirectory]:
    """Record how the simulation engine assigns partitions while the block runs.

    :func:`lora_flwr.fl.directory.simulation_partitions` after the version check.

    Raises
    ------
    FlowerVersionError
        On a Flower other than 1.42.x, before anything is patched.
    """
    check_flower_version()
    with directory.simulation_partitions() as partitions:
        yield partitions


def prompt_grid(grid: Grid) -> Grid:
    """Return ``grid`` wrapped in a :class:`PromptGrid`, unless it is in-memory.

    A deployment's gRPC grid pulls replies every 3 s; the simulation's in-memory
    grid already pulls every 0.1 s and is returned as it is.

    Raises
    ------
    FlowerVersionError
        On a Flower other than 1.42.x.
    """
    check_flower_version()
    if type(grid).__name__ == _IN_MEMORY_GRID:
        return grid
    return PromptGrid(grid)


class _OneLine(logging.Filter):
    """Log an app exception of ``kind`` as its message alone, no traceback."""

    def __init__(self, kind: type[BaseException]) -> None:
        super().__init__()
        self.kind = kind

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.kind):
            entity = record.args[0] if isinstance(record.args, tuple) else "app"
            record.msg, record.args = "%s failed: %s", (entity, exc)
            record.exc_info, record.exc_text = None, None
        return True


def one_line_failures(kind: type[BaseException]) -> None:
    """Have Flower log an app's ``kind`` exception in one line (once per process).

    Flower 1.42 still marks the run ``finished:failed`` with the message as its
    details; only the traceback is left out of the log.

    Raises
    ------
    FlowerVersionError
        On a Flower other than 1.42.x.
    """
    check_flower_version()
    if not any(
        isinstance(f, _OneLine) and f.kind is kind for f in FLOWER_LOGGER.filters
    ):
        FLOWER_LOGGER.addFilter(_OneLine(kind))
