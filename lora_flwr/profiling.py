"""Profile mode (``compute.profile = true``): where the time of a round goes.

Pure standard library, so the server, the client and the trainer all use it. Off by
default; when off nothing here runs but a module import (no timers, no CUDA syncs).

Each client call (fit or evaluate) reports, in its metrics, seconds per phase:

=================  =========================================================
``startup_process``  fresh ``flwr-clientapp`` process only (deployment: one per
                     message): from process creation to the first import of
                     this app (interpreter, Flower, pulling the message)
``startup_imports``  same processes: importing the app (torch, transformers)
``startup_model``    getting the process's base model, adapter and trainer
                     (loads the model on a process's first call, else ~0)
``startup_data``     getting the node's tokenized partition (ditto)
``serialization``    adapter set from the payload, read back and encoded for
                     the reply (``fl.runner.prepare`` / ``finish``, codecs)
``data``             training: batch fetch, collate, copy to the device
``forward``          training: forward pass and loss (with FedProx's term)
``backward``         training: backward pass
``optimizer``        training: zero_grad, unscale, clipping, step
``evaluation``       local evaluation (evaluate calls)
``other``            the rest of the call (plan parsing, optimiser set-up,
                     bookkeeping)
=================  =========================================================

``total`` is their sum. The server times its own part of the round:
``server_serialization`` (payloads to bytes, replies from bytes and decoded),
``server_aggregation`` (validation, guards, the rule, the server optimizer),
``server_evaluation`` (centralised evaluation) and ``server_other`` (sampling,
plans). :func:`round_profile` splits the round's wall time along its critical
path: server phases, plus, for each stage (fit, evaluate), the phases of the
worker process whose calls took longest (one worker's calls run one after
another, workers run in parallel); ``flower`` is what is left: messaging,
scheduling, Flower's own (de)serialization on the client, process spawning.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

PREFIX = "prof_"
SUFFIX = "_s"

# Phases of one client call, in the order a deployed call meets them.
CLIENT_PHASES: tuple[str, ...] = (
    "startup_process",
    "startup_imports",
    "startup_model",
    "startup_data",
    "serialization",
    "data",
    "forward",
    "backward",
    "optimizer",
    "evaluation",
    "other",
)
# What LoRATrainer.train reports in profile mode.
TRAIN_PHASES: tuple[str, ...] = ("data", "forward", "backward", "optimizer")
SERVER_PHASES: tuple[str, ...] = (
    "server_serialization",
    "server_aggregation",
    "server_evaluation",
    "server_other",
)
# The round split (critical path); its seconds add up to the round's wall time.
ROUND_PHASES: tuple[str, ...] = (
    *(f"client_{p}" for p in CLIENT_PHASES),
    *SERVER_PHASES,
    "flower",
)
STAGES: tuple[str, ...] = ("fit", "evaluate")
# Not a phase of the split: the server's partition handshake (messages to nodes
# seen for the first time), reported apart; its time is inside ``flower``.
HANDSHAKE = "handshake"

# A deployed SuperNode runs each message in a new process of this name.
FRESH_PROCESS_NAME = "flwr-clientapp"


def key(phase: str) -> str:
    """Metric / history key of a phase: ``prof_<phase>_s``."""
    return f"{PREFIX}{phase}{SUFFIX}"


@dataclass
class _Open:
    phase: str
    start: float


class PhaseTimer:
    """Accumulate wall seconds per phase with ``perf_counter``.

    Two ways to time: :meth:`lap` charges the time since the previous lap (or
    :meth:`restart`) to a phase, for a loop cut into consecutive sections;
    :meth:`phase` is a context manager, and nested phases are exclusive (the
    outer one pauses while the inner runs).

    Parameters
    ----------
    sync
        Called before every reading of the clock (e.g. ``torch.cuda.synchronize``
        so that queued GPU work is charged to the phase that queued it).
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._sync = sync
        self._last = self._now()
        self._open: list[_Open] = []

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        """Charge ``seconds`` to ``phase``."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def restart(self) -> None:
        """Start the next lap now."""
        self._last = self._now()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to ``phase`` and start a new lap."""
        now = self._now()
        self.add(phase, now - self._last)
        self._last = now

    @contextlib.contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        """Time the block as ``phase`` (exclusive of phases nested inside it)."""
        now = self._now()
        if self._open:
            outer = self._open[-1]
            self.add(outer.phase, now - outer.start)
        entry = _Open(phase, now)
        self._open.append(entry)
        try:
            yield
        finally:
            now = self._now()
            self._open.remove(entry)
            self.add(phase, now - entry.start)
            if self._open:
                self._open[-1].start = now

    def snapshot(self) -> dict[str, float]:
        """Seconds per phase so far, open phases counted up to now."""
        now = time.perf_counter()
        out = dict(self.seconds)
        for entry in self._open:
            out[entry.phase] = out.get(entry.phase, 0.0) + now - entry.start
        return out


class Timer(Protocol):
    """What a timed loop calls: a :class:`PhaseTimer`, or :data:`NULL_TIMER`."""

    @property
    def seconds(self) -> Mapping[str, float]:
        """Seconds per phase so far."""
        ...

    def restart(self) -> None:
        """Start the next lap now."""
        ...

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to ``phase``."""
        ...

    def phase(self, phase: str) -> contextlib.AbstractContextManager[None]:
        """Time the block as ``phase``."""
        ...


# One shared do-nothing context: nullcontext holds no state, so it can be reused
# and nested freely.
_NO_PHASE: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


class NullTimer:
    """A :class:`Timer` that times nothing: profiling off.

    Every method returns at once: no clock is read and no device is synchronised,
    so a loop timed through it runs as it would with no timing code at all, and
    :attr:`seconds` stays empty.
    """

    @property
    def seconds(self) -> Mapping[str, float]:
        """Always empty."""
        return {}

    def restart(self) -> None:
        """Do nothing."""

    def lap(self, phase: str) -> None:
        """Do nothing."""

    def phase(self, phase: str) -> contextlib.AbstractContextManager[None]:
        """Return the shared no-op context."""
        return _NO_PHASE


NULL_TIMER = NullTimer()


def maybe_phase(
    timer: PhaseTimer | CallProfile | None, phase: str
) -> contextlib.AbstractContextManager[None]:
    """``timer.phase(phase)``, or a no-op when profiling is off (``timer`` None)."""
    if timer is None:
        return _NO_PHASE
    return timer.phase(phase)


# ------------------------------------------------------- client start-up
_startup: dict[str, float] = {}


def _process_age() -> float | None:
    """Seconds since this process was created (Linux), or None where unknown."""
    try:
        stat = Path("/proc/self/stat").read_text()
        # Field 22 (starttime, clock ticks after boot); the name in field 2 may
        # hold spaces, so count from its closing parenthesis.
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        return max(0.0, now - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _note_imports_start() -> None:
    # Runs when this module is first imported: in a fresh ClientApp process that
    # is the first import of the app (fl/client_app.py imports it first).
    _startup["imports_start"] = time.perf_counter()
    age = _process_age()
    if age is not None:
        _startup["process_age"] = age


def mark_app_imports_done() -> None:
    """Note that the app's imports are done (``fl/client_app.py`` calls it)."""
    if "imports_done" not in _startup:
        _startup["imports_done"] = time.perf_counter()


def is_fresh_process() -> bool:
    """Whether this process exists to serve one message (a deployed ClientApp)."""
    return Path(sys.argv[0]).name == FRESH_PROCESS_NAME if sys.argv else False


def take_startup() -> dict[str, float]:
    """Return the process and import seconds of a fresh ClientApp process, once.

    The first call in a ``flwr-clientapp`` process returns ``startup_process``
    and ``startup_imports``; later calls, and any call in a long-lived process
    (a Ray actor, whose start-up precedes the round), return nothing.
    """
    if not is_fresh_process() or _startup.get("taken"):
        return {}
    _startup["taken"] = 1.0
    out: dict[str, float] = {}
    if "process_age" in _startup:
        out["startup_process"] = _startup["process_age"]
    if "imports_done" in _startup:
        out["startup_imports"] = _startup["imports_done"] - _startup["imports_start"]
    return out


_note_imports_start()


class CallProfile:
    """Phases of one client call (fit or evaluate), from its start to :meth:`metrics`.

    Parameters
    ----------
    startup
        Start-up seconds that precede the call (:func:`take_startup`).
    """

    def __init__(self, startup: Mapping[str, float] | None = None) -> None:
        self.timer = PhaseTimer()
        self.startup = dict(startup or {})
        self._start = time.perf_counter()

    def phase(self, phase: str) -> contextlib.AbstractContextManager[None]:
        """Time the block as ``phase``."""
        return self.timer.phase(phase)

    def add_train(self, metrics: Mapping[str, float]) -> None:
        """Take the training phases LoRATrainer reported (``prof_<phase>_s``)."""
        for phase in TRAIN_PHASES:
            value = metrics.get(key(phase))
            if value is not None:
                self.timer.add(phase, float(value))

    def metrics(self) -> dict[str, float]:
        """Every client phase and ``total``, as ``prof_<phase>_s`` metrics."""
        in_call = time.perf_counter() - self._start
        timed = self.timer.snapshot()
        unknown = set(timed) - set(CLIENT_PHASES)
        if unknown:
            raise ValueError(f"not client phases: {sorted(unknown)}")
        seconds = {
            p: self.startup.get(p, 0.0) + timed.get(p, 0.0) for p in CLIENT_PHASES
        }
        # Whatever the named phases leave of the call (they never overlap).
        seconds["other"] = max(0.0, in_call - sum(timed.values()))
        out = {key(p): seconds[p] for p in CLIENT_PHASES}
        out[key("total")] = sum(seconds.values())
        return out


# ------------------------------------------------------------ the round
@dataclass(frozen=True)
class ClientCall:
    """One client call's phases as the server received them."""

    stage: str  # "fit" or "evaluate"
    worker: str  # the process that served it (calls of one worker run in turn)
    seconds: Mapping[str, float]  # every CLIENT_PHASES entry, >= 0

    @property
    def total(self) -> float:
        """Seconds of the whole call."""
        return sum(self.seconds.values())


def client_call(
    stage: str, metrics: Mapping[str, object], worker: object
) -> ClientCall | None:
    """Read a call's phases from its metrics; None if it sent none or a bad one.

    A phase must be a finite number >= 0 (a broken or hostile client's profile
    is left out, never trusted into the split); a missing phase counts as 0.
    """
    if stage not in STAGES:
        raise ValueError(f"`stage` should be one of {list(STAGES)}, not {stage!r}")
    if key("total") not in metrics:
        return None
    seconds: dict[str, float] = {}
    for phase in CLIENT_PHASES:
        value = metrics.get(key(phase), 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not (math.isfinite(value) and value >= 0):
            return None
        seconds[phase] = float(value)
    return ClientCall(stage, str(worker), seconds)


def round_profile(
    round_seconds: float,
    server: Mapping[str, float],
    calls: Sequence[ClientCall],
) -> dict[str, float | int]:
    """Split one round's wall time into phases; add per-stage sums and medians.

    Parameters
    ----------
    round_seconds
        The round's wall time on the server (``configure_fit`` to the round's end).
    server
        Seconds per server phase (``SERVER_PHASES``; others such as the
        handshake are reported as they are and stay inside ``flower``).
    calls
        The round's client calls with a profile.

    Returns
    -------
    dict
        ``prof_round_s``; ``prof_<phase>_s`` for every ``ROUND_PHASES`` entry
        (critical path; they add up to ``prof_round_s`` unless the measured
        parts exceed it, then ``flower`` is 0 and ``prof_overlap_s`` says by how
        much); ``prof_<stage>_calls``; ``prof_<stage>_<phase>_sum_s`` and
        ``..._median_s`` over that stage's calls, ``total`` included.
    """
    out: dict[str, float | int] = {key("round"): round_seconds}
    split = {p: 0.0 for p in ROUND_PHASES}
    for phase in SERVER_PHASES:
        split[phase] = max(0.0, float(server.get(phase, 0.0)))
    for stage in STAGES:
        mine = [c for c in calls if c.stage == stage]
        out[f"{PREFIX}{stage}_calls"] = len(mine)
        if not mine:
            continue
        by_worker: dict[str, list[ClientCall]] = {}
        for call in mine:
            by_worker.setdefault(call.worker, []).append(call)
        critical = max(by_worker.values(), key=lambda cs: sum(c.total for c in cs))
        for phase in CLIENT_PHASES:
            split[f"client_{phase}"] += sum(c.seconds[phase] for c in critical)
        for phase in (*CLIENT_PHASES, "total"):
            values = [c.total if phase == "total" else c.seconds[phase] for c in mine]
            out[f"{PREFIX}{stage}_{phase}_sum{SUFFIX}"] = sum(values)
            out[f"{PREFIX}{stage}_{phase}_median{SUFFIX}"] = statistics.median(values)
    rest = round_seconds - sum(v for p, v in split.items() if p != "flower")
    split["flower"] = max(0.0, rest)
    out.update({key(p): v for p, v in split.items()})
    out[key("overlap")] = max(0.0, -rest)
    if HANDSHAKE in server:
        out[key(HANDSHAKE)] = server[HANDSHAKE]
    return out
