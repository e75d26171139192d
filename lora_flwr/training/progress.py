"""Progress lines inside a local training call, throttled by time.

A round of an LLM takes minutes; the server logs a line per finished round only.
A client logs ``client 3 (round 2): step 40/100, loss 1.873, 2150 tokens/s`` at
most once every ``compute.progress_every`` seconds, so 20 clients print a few lines
a minute each, not one per step. The rate is over the steps since the last line.

In the simulation each client runs in a Ray worker process whose output Ray sends
to the driver's console, but whose ``logging`` is not configured: a record below
WARNING would go nowhere. :func:`show_progress_lines` gives :data:`PROGRESS_LOGGER`
a handler of its own in such a process.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

PROGRESS_LOGGER = "lora_flwr.progress"
logger = logging.getLogger(PROGRESS_LOGGER)


class ProgressLine:
    """Decide when a training call logs its progress, and what.

    Parameters
    ----------
    name
        Who trains, first in the line (``"client 3 (round 2)"``).
    total
        Optimiser steps of the call.
    every
        Seconds between two lines; 0: never.
    clock
        Monotonic seconds (tests pass a fake one).
    emit
        Where a line goes (default: :data:`PROGRESS_LOGGER` at INFO).
    """

    def __init__(
        self,
        name: str,
        total: int,
        every: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.total = total
        self.every = every
        self.clock = clock
        self.emit = emit if emit is not None else logger.info
        self._last = clock()  # the call's start, then the last line's time
        self._tokens = 0  # tokens since then

    def step(self, step: int, loss: float, tokens: int) -> str | None:
        """Count step ``step`` (1-based) of ``tokens``; return the line if logged."""
        self._tokens += tokens
        if self.every <= 0:
            return None
        now = self.clock()
        elapsed = now - self._last
        if elapsed < self.every:
            return None
        line = (
            f"{self.name}: step {step}/{self.total}, loss {loss:.4g}, "
            f"{self._tokens / elapsed:.0f} tokens/s"
        )
        self._last, self._tokens = now, 0
        self.emit(line)
        return line


def show_progress_lines() -> None:
    """Make :data:`PROGRESS_LOGGER`'s INFO lines reach stderr in this process.

    Where logging is configured (the simulation's driver, a script calling
    ``logging.basicConfig``) the lines propagate to that handler; elsewhere (a Ray
    worker, a SuperNode's ClientApp process) the logger gets its own stderr
    handler, once.
    """
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not logger.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def progress_bar(it: range | Iterator[Any], show: bool, desc: str) -> Iterator[Any]:
    """Iterate ``it``, under a tqdm bar when ``show``."""
    if not show:
        yield from it
        return
    from tqdm.auto import tqdm

    yield from tqdm(it, desc=desc, leave=False)
