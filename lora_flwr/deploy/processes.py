"""Child processes of a deployment: start, pin to CPUs, watch, and stop them all.

Every process started here gets ``TAG_VAR=<tag>`` in its environment, and every
helper it spawns (flower-superexec, flwr-serverapp, flwr-clientapp, Ray workers,
flwr's detached local SuperLink) inherits it, even from a session of its own; so
the tag finds exactly the processes a deployment is answerable for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from lora_flwr.deploy.cpus import format_cpus
from lora_flwr.deploy.errors import DeployError

# The Flower app: the checkout whose pyproject.toml holds [tool.flwr.app].
# `flwr run` packs it, and the Flower processes run from it.
APP_DIR = Path(__file__).resolve().parents[2]
TAG_VAR = "LORA_FLWR_DEPLOY_TAG"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str) -> str:
    """Path of a Flower executable: next to this Python first, then on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` not found; install flwr>=1.42 in this env")
    return found


def process_alive(pid: int) -> bool:
    """Tell whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def tagged_processes(tag: str) -> list[int]:
    """Live PIDs whose environment holds ``TAG_VAR=tag`` (Linux /proc)."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def tail(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` lines of a text file ('' if missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that ``finally`` cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class Processes:
    """Processes started here (each leading its own session) and their helpers.

    A SuperLink or SuperNode spawns helpers (flower-superexec, flwr-serverapp,
    flwr-clientapp, Ray), some in sessions of their own; all carry ``tag`` in
    their environment, which is how :meth:`stop_all` finds them.

    Parameters
    ----------
    log_dir
        Where ``<name>.log`` of each process and ``pids.json`` go.
    tag
        The value of ``TAG_VAR`` that every process started here inherits.
    """

    def __init__(self, log_dir: Path, tag: str) -> None:
        self.log_dir = log_dir
        self.tag = tag
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.adopted: dict[str, int] = {}  # started by flwr (its local SuperLink)
        self._files: list[IO[bytes]] = []

    def env(self, flwr_home: Path, **extra: str) -> dict[str, str]:
        """Environment of one Flower process: own FLWR_HOME, offline-safe, tagged."""
        env = os.environ.copy()
        env["FLWR_HOME"] = str(flwr_home)
        # Otherwise every run `uv sync`s the app's dependencies (fails offline).
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        # Flower sends a telemetry event on start and exit: loopback only here.
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        env[TAG_VAR] = self.tag
        # flwr and the SuperLink/SuperNodes start further Flower executables
        # (flower-superlink, flwr-serverapp, flwr-clientapp) by name: put this
        # environment's scripts first on PATH, even when the venv is not activated.
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env.update(extra)
        return env

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: Path = APP_DIR,
        cpus: frozenset[int] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session; stdout+stderr go to ``<name>.log``.

        ``cpus`` pins the process to those CPUs as soon as it exists, before it
        starts any helper (its SuperExec, ServerApp or ClientApp processes), which
        inherit the pinning.
        """
        log = (self.log_dir / f"{name}.log").open("wb")
        self._files.append(log)
        proc = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        if cpus is not None:
            os.sched_setaffinity(proc.pid, cpus)
        pinned = f"  cpus={format_cpus(cpus)}" if cpus is not None else ""
        print(f"started {name:<14} pid={proc.pid}  log={log.name}{pinned}", flush=True)
        self.write_pids()
        return proc

    def adopt(self, name: str, pid: int) -> None:
        """Take charge of a process started by a child (stopped at the end)."""
        self.adopted[name] = pid
        print(f"adopted {name:<14} pid={pid}", flush=True)
        self.write_pids()

    def pids(self) -> dict[str, int]:
        """Name -> PID of every process started or adopted here."""
        return {**{n: p.pid for n, p in self.procs.items()}, **self.adopted}

    def write_pids(self) -> None:
        """Record PIDs and the tag in ``pids.json`` (tests check them afterwards)."""
        doc = {"tag_var": TAG_VAR, "tag": self.tag, "pids": self.pids()}
        (self.log_dir / "pids.json").write_text(json.dumps(doc, indent=2) + "\n")

    def check_alive(self, names: Sequence[str]) -> None:
        """Raise with the log tail if one of ``names`` has exited."""
        for name in names:
            if name in self.adopted:
                if not process_alive(self.adopted[name]):
                    raise DeployError(f"{name} (pid {self.adopted[name]}) has died")
                continue
            proc = self.procs[name]
            if proc.poll() is not None:
                raise DeployError(
                    f"{name} (pid {proc.pid}) exited with code {proc.returncode}:\n"
                    + tail(self.log_dir / f"{name}.log")
                )

    def _left(self) -> set[int]:
        """PIDs still alive: started or adopted here, or carrying the tag."""
        for proc in self.procs.values():
            proc.poll()  # reap our direct children
        mine = {p for p in self.pids().values() if process_alive(p)}
        return mine | set(tagged_processes(self.tag))

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM everything, wait up to ``grace`` s, SIGKILL what is left; reap."""
        for pid in self._left():
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._left() and time.monotonic() < deadline:
            time.sleep(0.2)
        for _ in range(3):  # helpers may be spawned while the parents die
            survivors = self._left()
            if not survivors:
                break
            for pid in survivors:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for fh in self._files:
            fh.close()
        survivors = self._left()
        if survivors:
            print(f"WARNING: processes still alive: {sorted(survivors)}", flush=True)
        else:
            print("stopped every process started here", flush=True)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Give a process up to ``timeout`` s to exit by itself (no error if not)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
