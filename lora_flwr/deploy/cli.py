"""The Flower CLI (``flwr``): its connection file, its JSON calls, and a run's wait.

Each ``flwr`` call is a fresh Python process that imports Flower: 1.2-2 CPU
seconds. Polled every 2 s, ``flwr ls`` took a third of a core from the run it
watched (27 calls, 40 CPU seconds in a 128 s run on a 2-core machine). So while
``flwr run --stream`` is alive (its stream ends when the run does), its exit is
the signal, and ``flwr ls`` runs only rarely.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_flwr.deploy.errors import DeployError
from lora_flwr.deploy.processes import APP_DIR, Processes, binary, tail
from lora_flwr.deploy.run_config import Scalar, toml_value

POLL_SECONDS = 2.0
LS_ATTEMPTS = 3  # consecutive failed `flwr ls` calls that end the wait
LS_WHILE_STREAMING_SECONDS = 60.0
STREAM_CHECK_SECONDS = 0.5
RUN_PROCESS = "flwr-run"  # the name `flwr run --stream` is started under


def write_cli_config(
    flwr_home: Path, connection: str, table: Mapping[str, Scalar]
) -> Path:
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
        cwd=APP_DIR,
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
        str(APP_DIR),
        connection,
        "--run-config",
        str(run_config),
        *extra,
        "--stream",
    ]
    print("$ " + " ".join(argv), flush=True)
    proc = procs.start(RUN_PROCESS, argv, env)
    threading.Thread(
        target=_follow, args=(procs.log_dir / f"{RUN_PROCESS}.log", proc), daemon=True
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

    Raises
    ------
    DeployError
        When a process in ``watch`` exits, the stream ends without a run,
        ``LS_ATTEMPTS`` ``flwr ls`` calls in a row fail, or ``timeout`` s pass.
    """
    deadline = time.monotonic() + timeout
    stream = procs.procs[RUN_PROCESS]
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
                + tail(procs.log_dir / f"{RUN_PROCESS}.log")
            )
        next_ls = time.monotonic() + (
            LS_WHILE_STREAMING_SECONDS if streaming else POLL_SECONDS
        )
        time.sleep(STREAM_CHECK_SECONDS if streaming else POLL_SECONDS)
    status = last.get("status", "not submitted")
    raise DeployError(
        f"the run did not finish within {timeout:.0f} s (status: {status})"
    )
