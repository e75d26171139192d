"""Deploy the Flower app for real on this machine: one SuperLink, N SuperNodes.

    python scripts/deploy_local.py [--config configs/smoke.toml] [--num-supernodes 2]
                                   [--set fed.num_rounds=3 ...] [--output-dir DIR]
                                   [--tls-dir DIR [--generate-certs] | --insecure]
                                   [--node-threads N] [--server-cpus LIST]
                                   [--node-cpus LIST]

Every component is a separate OS process talking HTTPS over loopback, exactly as
on separate machines (see docs/DEPLOYMENT.md). Secure by default: TLS on every
link and SuperNode authentication, with throwaway credentials (a CA, the
SuperLink's certificate, one ECDSA key pair per SuperNode; scripts/deploy_tls.py)
written into the private temporary FLWR_HOME tree unless ``--tls-dir`` names
a directory that holds them (``--generate-certs`` writes fresh ones there first).

1. ``flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem
   --ssl-keyfile server.key --enable-supernode-auth`` on a free port;
2. a CLI connection ``[superlink.<name>]`` with ``root-certificates = ca.pem``
   in a private ``$FLWR_HOME/config.toml``;
3. ``flwr supernode register node-<i>.pub`` for every SuperNode: the SuperLink
   answers with the node id bound to that key; the key -> node id -> partition
   table goes to ``nodes.json``;
4. N ``flower-supernode --root-certificates ca.pem --auth-supernode-private-key
   node-<i>.key --superlink 127.0.0.1:PORT --port P_i --node-config
   "partition-id=i num-partitions=N"`` (own FLWR_HOME, own port); wait until
   ``flwr supernode list`` shows every registered node id ``online``;
5. ``flwr run . <name> --run-config <flat toml> --stream``;
6. wait for ``flwr run --stream`` to exit (its log stream ends with the run),
   then poll ``flwr ls --format json`` until the run is ``finished:*`` (``flwr
   run`` exits 0 even when the run failed, so its exit code proves nothing);
7. stop every process started here and every helper they spawned (found by the
   ``LORA_FLWR_DEPLOY_TAG`` environment tag they all inherit): SIGTERM, then
   SIGKILL; also on error, Ctrl-C or SIGTERM.

``--insecure`` (explicit opt-in, with a warning) skips TLS and authentication:
``--insecure`` on both binaries, ``insecure = true`` in the connection, no keys,
and any process on this machine can join as a SuperNode.

``--server-cpus`` / ``--node-cpus`` pin the SuperLink side (SuperLink, its
SuperExec, the ServerApp) and the SuperNodes (with their SuperExecs and ClientApp
processes) to CPU sets, so that on one machine the server can have cores of its
own, as it would on separate machines.

Results go to ``<output_dir>/<name>/`` (history.json, adapter/, checkpoints/); the
processes' logs, the run config sent, the final ``flwr ls`` answer (runs.json),
the node table (nodes.json, secure mode) and the PIDs (pids.json) go to
``<output_dir>/<name>/deploy/``. Exit code 0 only when the run finished as
``completed`` and wrote every round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from deploy_tls import (
    Credentials,
    generate_credentials,
    load_credentials,
    ssh_fingerprint,
)

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "local-deployment"
POLL_SECONDS = 2.0
LS_ATTEMPTS = 3  # consecutive failed `flwr ls` calls that end the wait
# Each `flwr ls` is a fresh Python process that imports Flower: 1.2-2 CPU-seconds.
# Polled every 2 s, it took a third of a core from the run it watched (27 calls,
# 40 CPU-seconds in a 128 s run on a 2-core machine). While `flwr run --stream`
# is alive (its stream ends when the run does), its exit is the signal, and
# `flwr ls` runs only rarely.
LS_WHILE_STREAMING_SECONDS = 60.0
STREAM_CHECK_SECONDS = 0.5
TAG_VAR = "LORA_FLWR_DEPLOY_TAG"
# Seconds for every registered SuperNode to come online (≈6 s when idle; a loaded
# 2-core machine needs far more because each node imports flwr from scratch).
NODES_ONLINE_TIMEOUT = 300.0
INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no SuperNode authentication. Traffic is "
    "plain HTTP and any process that reaches the port can join as a SuperNode "
    "and receive the model. Use only for debugging on a trusted machine."
)


class DeployError(RuntimeError):
    """The deployment or the run failed; the message says why."""


# ----------------------------------------------------------------- config
def resolve_config(
    config: str | Path, overrides: Sequence[str] = (), output_dir: str | None = None
) -> Any:
    """The experiment: ``config`` + ``--set`` overrides, with an absolute output_dir.

    The ServerApp runs in another process with another working directory, so a
    relative ``output_dir`` would land somewhere unexpected.
    """
    from lora_flwr.config import ExperimentConfig

    cfg = ExperimentConfig.from_toml(config).with_overrides(list(overrides))
    out = Path(output_dir if output_dir is not None else cfg.output_dir)
    if not out.is_absolute():
        out = Path.cwd() / out
    return cfg.with_overrides([f"output_dir={out.resolve()}"])


def toml_value(value: bool | int | float | str) -> str:
    """One TOML scalar (run-config values are bool/int/float/str only)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_run_config(cfg: Any, path: Path) -> Path:
    """Write the FULL experiment as a flat run-config TOML (dotted keys).

    ``flwr run --run-config FILE`` overrides ``[tool.flwr.app.config]`` (which is
    configs/default.toml) key by key and rejects TOML lists, so the file carries
    every key, with sequences as comma-separated strings: the run then uses
    exactly the experiment ``ExperimentConfig.from_toml`` reads.
    """
    lines = [f"{key} = {toml_value(v)}" for key, v in cfg.to_flat().items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# -------------------------------------------------------------- processes
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
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
    """True when ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def tagged_processes(tag: str) -> list[int]:
    """Live PIDs whose environment holds ``TAG_VAR=tag`` (Linux /proc).

    Every process started here gets the tag in its environment and every helper
    they spawn (flower-superexec, flwr-serverapp, flwr-clientapp, Ray workers,
    flwr's detached local SuperLink) inherits it, even when it starts a new
    session; so the tag finds exactly the processes this script is answerable for.
    """
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


class Processes:
    """Processes started here (each leading its own session) and their helpers.

    A SuperLink or SuperNode spawns helpers (flower-superexec, flwr-serverapp,
    flwr-clientapp, Ray), some in sessions of their own; all carry ``tag`` in
    their environment, which is how :meth:`stop_all` finds them.
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
        cwd: Path = REPO,
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

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM everything, wait up to ``grace`` s, SIGKILL what is left; reap."""

        def left() -> set[int]:
            for proc in self.procs.values():
                proc.poll()  # reap our direct children
            mine = {p for p in self.pids().values() if process_alive(p)}
            return mine | set(tagged_processes(self.tag))

        for pid in left():
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while left() and time.monotonic() < deadline:
            time.sleep(0.2)
        for _ in range(3):  # helpers may be spawned while the parents die
            survivors = left()
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
        survivors = left()
        if survivors:
            print(f"WARNING: processes still alive: {sorted(survivors)}", flush=True)
        else:
            print("stopped every process started here", flush=True)


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ('' if missing)."""
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


# --------------------------------------------------------------- flwr CLI
def write_cli_config(flwr_home: Path, connection: str, table: dict[str, Any]) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one default SuperLink connection."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    body = "\n".join(f"{k} = {toml_value(v)}" for k, v in table.items())
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n{body}\n'
    )
    return path


def flwr_json(argv: Sequence[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``flwr <argv> --format json``; return the answer, raise unless success."""
    out = subprocess.run(
        [binary("flwr"), *argv, "--format", "json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    text = out.stdout
    start = text.find("{")
    try:
        doc = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        doc = {}
    if not isinstance(doc, dict) or not doc.get("success", False):
        raise DeployError(f"`flwr {' '.join(argv)}` failed:\n{text}\n{out.stderr}")
    return doc


def list_runs(env: dict[str, str], connection: str) -> list[dict[str, Any]]:
    """``flwr ls <connection> --format json`` -> the list of runs."""
    runs: list[dict[str, Any]] = flwr_json(["ls", connection], env).get("runs", [])
    return runs


def register_supernode(
    env: dict[str, str], connection: str, public_key: Path, name: str
) -> int:
    """Register a SuperNode's public key with the SuperLink; return its node id.

    With ``--enable-supernode-auth`` the SuperLink accepts only nodes registered
    this way (through its Control API, by whoever holds the CLI connection); the
    node id it assigns stays bound to the key: every Fleet request is signed and
    the SuperLink checks that the signing key is the one registered for the node
    id in the request.
    """
    doc = flwr_json(
        ["supernode", "register", str(public_key), connection, "--name", name], env
    )
    return int(doc["node-id"])


def list_supernodes(env: dict[str, str], connection: str) -> list[dict[str, Any]]:
    """``flwr supernode list <connection> --format json`` -> the list of nodes.

    Each has ``node-id`` (a string), ``status`` (``registered``: never connected;
    ``online``; ``offline``; ...) and timestamps; no public key or name.
    """
    nodes: list[dict[str, Any]] = flwr_json(["supernode", "list", connection], env).get(
        "nodes", []
    )
    return nodes


def wait_for_supernodes(
    env: dict[str, str],
    connection: str,
    node_ids: Sequence[int],
    timeout: float,
    procs: Processes,
    watch: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Poll ``flwr supernode list`` until every node in ``node_ids`` is online.

    Raises at once (with its log tail) when a process in ``watch`` exits: a
    SuperNode that cannot verify the SuperLink's certificate or whose key is not
    registered exits with Flower's exit code 305.
    """
    wanted = {str(n) for n in node_ids}
    deadline = time.monotonic() + timeout
    status: dict[str, str] = {}
    while time.monotonic() < deadline:
        procs.check_alive(watch)
        nodes = list_supernodes(env, connection)
        status = {str(n["node-id"]): str(n["status"]) for n in nodes}
        if all(status.get(n) == "online" for n in wanted):
            return nodes
        time.sleep(POLL_SECONDS)
    raise DeployError(
        f"SuperNodes not online within {timeout:.0f} s: "
        + ", ".join(f"{n}={status.get(n, 'absent')}" for n in sorted(wanted))
    )


def start_flwr_run(
    procs: Processes,
    env: dict[str, str],
    connection: str,
    run_config: Path,
    extra: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start ``flwr run . <connection> --run-config FILE --stream``, echoing its log."""
    argv = [
        binary("flwr"),
        "run",
        str(REPO),
        connection,
        "--run-config",
        str(run_config),
        *extra,
        "--stream",
    ]
    print("$ " + " ".join(argv), flush=True)
    proc = procs.start("flwr-run", argv, env)
    threading.Thread(
        target=_follow, args=(procs.log_dir / "flwr-run.log", proc), daemon=True
    ).start()
    return proc


def _follow(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Echo a growing log file to stdout until ``proc`` exits."""
    with path.open("rb") as fh:
        while True:
            chunk = fh.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            elif proc.poll() is not None:
                return
            else:
                time.sleep(0.3)


def wait_for_run(
    env: dict[str, str],
    connection: str,
    timeout: float,
    procs: Processes,
    watch: Sequence[str] = (),
) -> dict[str, Any]:
    """Wait until the (only) run is finished; return its ``flwr ls`` record.

    While ``flwr run --stream`` (``procs.procs["flwr-run"]``) is alive, only its
    exit is watched, with one ``flwr ls`` every ``LS_WHILE_STREAMING_SECONDS``
    in case the stream hangs; once it has exited, ``flwr ls`` is polled every
    ``POLL_SECONDS`` until the run's status is ``finished:*``.
    """
    deadline = time.monotonic() + timeout
    stream = procs.procs["flwr-run"]
    last: dict[str, Any] = {}
    misses = 0
    next_ls = time.monotonic() + LS_WHILE_STREAMING_SECONDS
    while time.monotonic() < deadline:
        procs.check_alive(watch)
        streaming = stream.poll() is None
        if streaming and time.monotonic() < next_ls:
            time.sleep(STREAM_CHECK_SECONDS)
            continue
        try:
            runs = list_runs(env, connection)
        except DeployError:
            # One failed `flwr ls` on a loaded machine (its 0.4 s health probe of
            # a `:local:` SuperLink timed out, say) is not the run's verdict.
            misses += 1
            if misses >= LS_ATTEMPTS:
                raise
            time.sleep(POLL_SECONDS)
            continue
        misses = 0
        if runs:
            last = runs[-1]
            if str(last.get("status", "")).startswith("finished"):
                return last
        elif not streaming:
            raise DeployError(
                "`flwr run` exited without submitting a run:\n"
                + tail(procs.log_dir / "flwr-run.log")
            )
        next_ls = time.monotonic() + (
            LS_WHILE_STREAMING_SECONDS if streaming else POLL_SECONDS
        )
        time.sleep(STREAM_CHECK_SECONDS if streaming else POLL_SECONDS)
    status = last.get("status", "not submitted")
    raise DeployError(
        f"the run did not finish within {timeout:.0f} s (status: {status})"
    )


def check_results(run_dir: Path, num_rounds: int) -> list[dict[str, Any]]:
    """Raise unless ``run_dir`` holds history for every round and the adapter."""
    history_path = run_dir / "history.json"
    if not history_path.is_file():
        raise DeployError(f"the run wrote no {history_path}")
    history: list[dict[str, Any]] = json.loads(history_path.read_text())
    rounds = sorted(int(r["round"]) for r in history if int(r.get("round", 0)) > 0)
    if rounds != list(range(1, num_rounds + 1)):
        raise DeployError(f"history has rounds {rounds}, expected 1..{num_rounds}")
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    if not adapter.is_file():
        raise DeployError(f"the run wrote no final adapter {adapter}")
    return history


def finish(
    run: dict[str, Any], run_dir: Path, deploy_dir: Path, num_rounds: int, sec: float
) -> None:
    """Save the run record and check it completed with every round written."""
    (deploy_dir / "runs.json").write_text(json.dumps(run, indent=2) + "\n")
    status = run.get("status")
    if status != "finished:completed":
        raise DeployError(
            f"run {run.get('run-id')} ended as {status!r} "
            f"({run.get('status-details')}); logs in {deploy_dir}"
        )
    check_results(run_dir, num_rounds)
    print(
        f"\nrun {run.get('run-id')} finished:completed, {num_rounds} rounds in "
        f"{sec:.1f} s\nresults: {run_dir}\nlogs:    {deploy_dir}",
        flush=True,
    )


# ------------------------------------------------------------- deployment
def superlink_argv(port: int, creds: Credentials | None) -> list[str]:
    """``flower-superlink`` on ``127.0.0.1:port``: TLS + node auth, or insecure.

    One port serves the Fleet (SuperNodes), Control (CLI) and Runtime (ServerApp)
    APIs, all under the same certificate; ``--ssl-ca-certfile`` is what the
    SuperLink's own helpers (flower-superexec, flwr-serverapp) verify it with.
    Flower refuses ``--enable-supernode-auth`` without TLS.
    """
    argv = [
        binary("flower-superlink"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if creds is None:
        return [*argv, "--insecure"]
    return [
        *argv,
        "--ssl-ca-certfile",
        str(creds.ca_cert),
        "--ssl-certfile",
        str(creds.server_cert),
        "--ssl-keyfile",
        str(creds.server_key),
        "--enable-supernode-auth",
    ]


def supernode_argv(
    superlink: str,
    port: int,
    node_config: str | None = None,
    *,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    insecure: bool = False,
    max_retries: int | None = None,
) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` (host:port).

    Parameters
    ----------
    superlink
        The SuperLink's Fleet API address.
    port
        This node's own Runtime API port (its ClientApp processes talk to it).
    node_config
        ``--node-config`` value, e.g. ``"partition-id=0 num-partitions=2"``.
    root_certificates
        CA certificate that must have signed the SuperLink's certificate; without
        it the node trusts only the system CAs.
    auth_key
        The node's OpenSSH private key (``--auth-supernode-private-key``); without
        it the node makes up a key and asks to register itself, which a SuperLink
        with ``--enable-supernode-auth`` refuses.
    insecure
        Plain HTTP (no TLS, no authentication).
    max_retries
        ``--max-retries``: reconnection attempts before giving up (None: forever).

    Returns
    -------
    list of str
        The command line.
    """
    argv = [
        binary("flower-supernode"),
        "--superlink",
        superlink,
        "--port",
        str(port),
    ]
    if insecure:
        if root_certificates is not None or auth_key is not None:
            raise ValueError("`insecure` excludes `root_certificates` and `auth_key`")
        argv.append("--insecure")
    if root_certificates is not None:
        argv += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_key)]
    if node_config is not None:
        argv += ["--node-config", node_config]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    return argv


def cli_connection(address: str, creds: Credentials | None) -> dict[str, Any]:
    """The ``[superlink.<name>]`` table of the CLI's ``config.toml``."""
    if creds is None:
        return {"address": address, "insecure": True}
    return {"address": address, "root-certificates": str(creds.ca_cert)}


def parse_cpus(text: str) -> frozenset[int]:
    """Parse a CPU list such as ``0``, ``0-3`` or ``0,2-3`` (as ``taskset -c``).

    Raises
    ------
    argparse.ArgumentTypeError
        If the list is malformed or names a CPU this process may not use.
    """
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            first, last = int(low), int(high if dash else low)
            if first < 0 or last < first:
                raise ValueError(part)
            cpus.update(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a CPU list such as 0, 0-3 or 0,2-3"
        ) from None
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise argparse.ArgumentTypeError(
            f"CPUs {format_cpus(cpus - allowed)} are not available here "
            f"(this process may use {format_cpus(allowed)})"
        )
    return frozenset(cpus)


def format_cpus(cpus: Collection[int]) -> str:
    """``0,2,3`` for a set of CPUs."""
    return ",".join(str(c) for c in sorted(cpus))


def start_superlink(
    procs: Processes,
    flwr_home: Path,
    creds: Credentials | None,
    timeout: float = 60,
    cpus: frozenset[int] | None = None,
) -> str:
    """Start the SuperLink on a free port, wait until it listens; return host:port."""
    port = free_port()
    procs.start(
        "superlink", superlink_argv(port, creds), procs.env(flwr_home), cpus=cpus
    )
    _wait_listening(port, procs, timeout)
    return f"127.0.0.1:{port}"


def check_private_keys(creds: Credentials) -> None:
    """Refuse private keys that other users may read (as ssh does).

    Keys written by scripts/deploy_tls.py are 0600; a key copied in from
    elsewhere may not be.
    """
    keys = [creds.server_key, *(k.private for k in creds.node_keys)]
    loose = [
        f"{p} ({p.stat().st_mode & 0o777:o})" for p in keys if p.stat().st_mode & 0o077
    ]
    if loose:
        raise DeployError(
            "private keys readable by group or others (chmod 600 them): "
            + ", ".join(loose)
        )


def prepare_credentials(
    tls_dir: Path | None, generate: bool, num_supernodes: int, scratch: Path
) -> Credentials:
    """The credentials of a secure deployment (see :func:`parse_deploy_args`).

    ``tls_dir`` None: fresh throwaway ones in ``scratch`` (deleted with it);
    ``generate``: fresh ones written into ``tls_dir`` (never overwriting);
    otherwise the files already in ``tls_dir``.
    """
    if tls_dir is None:
        creds = generate_credentials(scratch, num_supernodes)
    elif generate:
        creds = generate_credentials(tls_dir, num_supernodes)
        print(f"wrote TLS credentials to {creds.directory}", flush=True)
    else:
        creds = load_credentials(tls_dir, num_supernodes)
    check_private_keys(creds)
    return creds


def register_nodes(
    env: dict[str, str], connection: str, creds: Credentials, num_partitions: int
) -> list[dict[str, Any]]:
    """Register every SuperNode's key; return the key -> node id -> partition table.

    SuperNode ``i`` holds ``node-<i>.key`` and is started with
    ``partition-id=i``. The table is the operator's record of which key (owner)
    is which node id in the SuperLink and in the ServerApp, and which
    partition that owner declared; see docs/DEPLOYMENT.md on what it does and
    does not guarantee.
    """
    table = []
    for i, key in enumerate(creds.node_keys):
        name = f"supernode-{i}"
        node_id = register_supernode(env, connection, key.public, name)
        table.append(
            {
                "name": name,
                "node-id": node_id,
                "public-key": str(key.public),
                "fingerprint": ssh_fingerprint(key.public),
                "partition-id": i,
                "num-partitions": num_partitions,
            }
        )
        print(f"registered {name:<13} node-id={node_id}", flush=True)
    return table


def node_config(
    pid: int, num_supernodes: int, node_threads: int | None, cores: int | None = None
) -> str:
    """The ``--node-config`` of SuperNode ``pid`` on this machine.

    ``node_threads`` None shares ``cores`` (default: the machine's; the pinned
    set under ``--node-cpus``) between the nodes, at least one each; 0 leaves
    ``num-threads`` out (torch's default: every core).
    """
    if node_threads is None:
        node_threads = max(1, (cores or os.cpu_count() or 1) // num_supernodes)
    text = f"partition-id={pid} num-partitions={num_supernodes}"
    return text + (f" num-threads={node_threads}" if node_threads > 0 else "")


def deploy(
    cfg: Any,
    num_supernodes: int,
    timeout: float,
    keep_homes: bool = False,
    *,
    insecure: bool = False,
    tls_dir: Path | None = None,
    generate_certs: bool = False,
    node_threads: int | None = None,
    server_cpus: frozenset[int] | None = None,
    node_cpus: frozenset[int] | None = None,
) -> Path:
    """Run ``cfg`` on a real local SuperLink + SuperNodes; return the run dir.

    Parameters
    ----------
    cfg
        The experiment (``ExperimentConfig`` with an absolute ``output_dir``).
    num_supernodes
        SuperNodes to start, one per partition.
    timeout
        Seconds the run may take.
    keep_homes
        Keep the per-process FLWR_HOME tree (and throwaway credentials).
    insecure
        No TLS and no SuperNode authentication.
    tls_dir
        Credentials directory (see :func:`prepare_credentials`); None: throwaway.
    generate_certs
        Write fresh credentials into ``tls_dir`` first.
    node_threads
        Torch threads per node (the node config's ``num-threads``). None: the
        machine's cores shared between the nodes, at least 1 (every node runs on
        this machine; with torch's default each would use every core, and two
        nodes on 2 cores trained 4x slower, see docs/BENCHMARKS.md). 0: not set.
    server_cpus, node_cpus
        CPUs the SuperLink side (SuperLink, its SuperExec, the ServerApp) and the
        SuperNodes (with their SuperExecs and ClientApp processes) are pinned to;
        None: not pinned. Disjoint sets give the server cores of its own, as on
        separate machines. Pinned nodes share ``node_cpus`` when ``node_threads``
        is None.

    Returns
    -------
    Path
        ``<output_dir>/<name>``.
    """
    run_dir: Path = Path(cfg.output_dir) / str(cfg.name)
    deploy_dir = run_dir / "deploy"
    deploy_dir.mkdir(parents=True, exist_ok=True)
    # Only this script's own records of an earlier attempt: the results
    # (history.json included) belong to the ServerApp, which keeps, resumes or
    # clears them as ``on_existing`` says.
    for stale in ("runs.json", "nodes.json"):
        (deploy_dir / stale).unlink(missing_ok=True)
    run_config = write_run_config(cfg, deploy_dir / "run_config.toml")
    homes = Path(tempfile.mkdtemp(prefix="lora-flwr-deploy-"))  # mode 0700
    procs = Processes(deploy_dir, tag=str(homes))
    start = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            creds = None
            if insecure:
                print(INSECURE_WARNING, file=sys.stderr, flush=True)
            else:
                creds = prepare_credentials(
                    tls_dir, generate_certs, num_supernodes, homes / "tls"
                )
            address = start_superlink(
                procs, homes / "superlink", creds, cpus=server_cpus
            )
            cli_home = homes / "cli"
            write_cli_config(cli_home, CONNECTION, cli_connection(address, creds))
            env = procs.env(cli_home)
            # Keys are registered before any SuperNode starts: an unregistered
            # node is refused at once and exits (Flower exit code 305).
            table = []
            if creds is not None:
                table = register_nodes(env, CONNECTION, creds, num_supernodes)
            nodes = []
            for pid in range(num_supernodes):
                name = f"supernode-{pid}"
                nodes.append(name)
                procs.start(
                    name,
                    supernode_argv(
                        address,
                        free_port(),
                        node_config(
                            pid,
                            num_supernodes,
                            node_threads,
                            cores=len(node_cpus) if node_cpus else None,
                        ),
                        root_certificates=creds.ca_cert if creds else None,
                        auth_key=creds.node_keys[pid].private if creds else None,
                        insecure=creds is None,
                    ),
                    procs.env(homes / name),
                    cpus=node_cpus,
                )
            if creds is not None:
                online = wait_for_supernodes(
                    env,
                    CONNECTION,
                    [row["node-id"] for row in table],
                    min(NODES_ONLINE_TIMEOUT, timeout),
                    procs,
                    ["superlink", *nodes],
                )
                status = {str(n["node-id"]): n["status"] for n in online}
                for row in table:
                    row["status"] = status[str(row["node-id"])]
                doc = {"tls": True, "supernode-auth": True, "nodes": table}
                (deploy_dir / "nodes.json").write_text(json.dumps(doc, indent=2) + "\n")
                print(
                    f"all {len(table)} SuperNodes online (TLS + node auth)", flush=True
                )
            start_flwr_run(procs, env, CONNECTION, run_config)
            run = wait_for_run(env, CONNECTION, timeout, procs, ["superlink", *nodes])
            _wait_exit(procs.procs["flwr-run"], 15.0)
            finish(
                run,
                run_dir,
                deploy_dir,
                cfg.fed.num_rounds,
                time.perf_counter() - start,
            )
    finally:
        procs.stop_all()
        if not keep_homes:
            shutil.rmtree(homes, ignore_errors=True)
    return run_dir


def _wait_listening(port: int, procs: Processes, timeout: float) -> None:
    """Wait until the SuperLink accepts TCP connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive(["superlink"])
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"the SuperLink did not listen on port {port} within {timeout} s")


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Give ``flwr run --stream`` a moment to print the last logs and exit."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


def build_parser(doc: str | None = __doc__) -> argparse.ArgumentParser:
    """Command-line options shared by the deployment and simulation scripts."""
    parser = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/smoke.toml", help="TOML file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set fed.num_rounds=3 (repeatable)",
    )
    parser.add_argument(
        "--output-dir", default=None, help="results root (default: config output_dir)"
    )
    parser.add_argument(
        "--num-supernodes",
        type=int,
        default=None,
        help="SuperNodes = partitions (default: fed.num_clients)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds to wait for the run"
    )
    parser.add_argument(
        "--keep-homes",
        action="store_true",
        help="keep the per-process FLWR_HOME dirs (state, installed FABs)",
    )
    return parser


def parse_args(
    argv: Sequence[str] | None, doc: str | None = __doc__
) -> argparse.Namespace:
    """Parse the shared options (scripts/flwr_run_sim.py uses this)."""
    return build_parser(doc).parse_args(argv)


def parse_deploy_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The shared options plus this script's security options."""
    parser = build_parser(__doc__)
    sec = parser.add_argument_group(
        "security (default: TLS + SuperNode auth with throwaway credentials)"
    )
    sec.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="credentials: ca.pem, server.pem, server.key (SANs 127.0.0.1, "
        "localhost), node-<i>.key / node-<i>.pub (OpenSSH ECDSA) for i < N",
    )
    sec.add_argument(
        "--generate-certs",
        action="store_true",
        help="write fresh throwaway credentials into --tls-dir first "
        "(refuses to overwrite)",
    )
    parser.add_argument(
        "--node-threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per SuperNode (node config num-threads); default: the "
        "cores shared between the nodes; 0: torch's default (every core)",
    )
    parser.add_argument(
        "--server-cpus",
        type=parse_cpus,
        default=None,
        metavar="LIST",
        help="pin the SuperLink, its SuperExec and the ServerApp to these CPUs "
        "(e.g. 0 or 0-1 or 0,2); default: not pinned",
    )
    parser.add_argument(
        "--node-cpus",
        type=parse_cpus,
        default=None,
        metavar="LIST",
        help="pin the SuperNodes and their ClientApp processes to these CPUs",
    )
    sec.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP, no SuperNode authentication (prints a warning)",
    )
    args = parser.parse_args(argv)
    if args.insecure and (args.tls_dir is not None or args.generate_certs):
        parser.error("--insecure excludes --tls-dir and --generate-certs")
    if args.generate_certs and args.tls_dir is None:
        parser.error("--generate-certs needs --tls-dir")
    if args.node_threads is not None and args.node_threads < 0:
        parser.error(f"--node-threads should be >= 0, not {args.node_threads}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = parse_deploy_args(argv)
    try:
        cfg = resolve_config(args.config, args.set, args.output_dir)
        num = args.num_supernodes or cfg.fed.num_clients
        if num < cfg.fed.min_available_clients:
            raise DeployError(
                f"--num-supernodes={num} < fed.min_available_clients="
                f"{cfg.fed.min_available_clients}: the run would wait forever"
            )
        if num != cfg.fed.num_clients:
            cfg = cfg.with_overrides([f"fed.num_clients={num}"])
        deploy(
            cfg,
            num,
            args.timeout,
            args.keep_homes,
            insecure=args.insecure,
            tls_dir=args.tls_dir,
            generate_certs=args.generate_certs,
            node_threads=args.node_threads,
            server_cpus=args.server_cpus,
            node_cpus=args.node_cpus,
        )
    except (DeployError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"\nERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; every process started here was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
