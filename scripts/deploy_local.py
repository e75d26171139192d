"""Deploy the Flower app for real on this machine: one SuperLink, N SuperNodes.

    python scripts/deploy_local.py [--config configs/smoke.toml] [--num-supernodes 2]
                                   [--set fed.num_rounds=3 ...] [--output-dir DIR]

Every component is a separate OS process talking HTTP over loopback, exactly as on
separate machines (see docs/DEPLOYMENT.md):

1. ``flower-superlink --insecure`` on a free port;
2. N ``flower-supernode --insecure --superlink 127.0.0.1:PORT --port P_i
   --node-config "partition-id=i num-partitions=N"`` (own FLWR_HOME, own port);
3. a CLI connection ``[superlink.<name>]`` in a private ``$FLWR_HOME/config.toml``;
4. ``flwr run . <name> --run-config <flat toml> --stream``;
5. poll ``flwr ls --format json`` until the run is ``finished:*`` (``flwr run``
   exits 0 even when the run failed, so its exit code proves nothing);
6. stop every process started here and every helper they spawned (found by the
   ``LORA_FLWR_DEPLOY_TAG`` environment tag they all inherit): SIGTERM, then
   SIGKILL; also on error, Ctrl-C or SIGTERM.

Results go to ``<output_dir>/<name>/`` (history.json, adapter/, checkpoints/); the
processes' logs, the run config sent, the final ``flwr ls`` answer (runs.json) and
the PIDs (pids.json) go to ``<output_dir>/<name>/deploy/``. Exit code 0 only when
the run finished as ``completed`` and wrote every round.
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "local-deployment"
POLL_SECONDS = 2.0
LS_ATTEMPTS = 3  # consecutive failed `flwr ls` calls that end the wait
TAG_VAR = "LORA_FLWR_DEPLOY_TAG"


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


def _alive(pid: int) -> bool:
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
        if needle in environ.split(b"\0") and _alive(int(entry.name)):
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
        self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path = REPO
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session; stdout+stderr go to ``<name>.log``."""
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
        print(f"started {name:<14} pid={proc.pid}  log={log.name}", flush=True)
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
                if not _alive(self.adopted[name]):
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
            mine = {p for p in self.pids().values() if _alive(p)}
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


def list_runs(env: dict[str, str], connection: str) -> list[dict[str, Any]]:
    """``flwr ls <connection> --format json`` -> the list of runs."""
    out = subprocess.run(
        [binary("flwr"), "ls", connection, "--format", "json"],
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
    if not doc.get("success", False):
        raise DeployError(f"`flwr ls` failed:\n{text}\n{out.stderr}")
    runs: list[dict[str, Any]] = doc.get("runs", [])
    return runs


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
    """Poll ``flwr ls`` until the (only) run is finished; return its record."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    misses = 0
    while time.monotonic() < deadline:
        procs.check_alive(watch)
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
        elif procs.procs["flwr-run"].poll() is not None:
            raise DeployError(
                "`flwr run` exited without submitting a run:\n"
                + tail(procs.log_dir / "flwr-run.log")
            )
        time.sleep(POLL_SECONDS)
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
def deploy(
    cfg: Any, num_supernodes: int, timeout: float, keep_homes: bool = False
) -> Path:
    """Run ``cfg`` on a real local SuperLink + SuperNodes; return the run dir."""
    run_dir: Path = Path(cfg.output_dir) / str(cfg.name)
    deploy_dir = run_dir / "deploy"
    deploy_dir.mkdir(parents=True, exist_ok=True)
    # Only this script's own record of an earlier attempt: the results
    # (history.json included) belong to the ServerApp, which keeps, resumes or
    # clears them as ``on_existing`` says.
    (deploy_dir / "runs.json").unlink(missing_ok=True)
    run_config = write_run_config(cfg, deploy_dir / "run_config.toml")
    homes = Path(tempfile.mkdtemp(prefix="lora-flwr-deploy-"))
    procs = Processes(deploy_dir, tag=str(homes))
    start = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            port = free_port()
            address = f"127.0.0.1:{port}"
            procs.start(
                "superlink",
                [
                    binary("flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                ],
                procs.env(homes / "superlink"),
            )
            nodes = []
            for pid in range(num_supernodes):
                name = f"supernode-{pid}"
                nodes.append(name)
                procs.start(
                    name,
                    [
                        binary("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        address,
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f"partition-id={pid} num-partitions={num_supernodes}",
                    ],
                    procs.env(homes / name),
                )
            cli_home = homes / "cli"
            write_cli_config(
                cli_home, CONNECTION, {"address": address, "insecure": True}
            )
            env = procs.env(cli_home)
            _wait_listening(port, procs, 30.0)
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


def parse_args(
    argv: Sequence[str] | None, doc: str | None = __doc__
) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = parse_args(argv)
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
        deploy(cfg, num, args.timeout, args.keep_homes)
    except (DeployError, ValueError, FileNotFoundError) as exc:
        print(f"\nERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; every process started here was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
