"""Run the Flower app under ``flwr run`` in simulation, isolated and cleaned up.

    python scripts/flwr_run_sim.py [--config configs/smoke.toml] [--num-supernodes 2]
                                   [--set fed.num_rounds=3 ...] [--output-dir DIR]

What ``flwr run .`` does on a workstation, made safe for tests and CI:

* a private ``FLWR_HOME`` whose ``config.toml`` has one connection ``local`` with
  ``address = ":local:"``: ``flwr run`` uses the local SuperLink in simulation
  mode (the simulation runtime runs the SuperNodes on Ray);
* that SuperLink listens on free ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
  ``FLWR_LOCAL_CONTROL_API_PORT``), so it can never reuse another user's SuperLink
  on the default port 39091;
* it is started here, with the options ``flwr run`` would start it with, before
  ``flwr run``: flwr gives the one it starts 15 s to answer (fixed in flwr 1.42),
  which a loaded machine can exceed; finding it up, ``flwr run`` uses it;
* ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (no ``uv sync``; works offline);
* the experiment goes in as ``--run-config <flat toml>``, with an absolute
  ``output_dir``, and the simulation size as
  ``--federation-config "num-supernodes=N client-resources-num-cpus=C"``;
* success is read from ``flwr ls --format json`` (``flwr run`` exits 0 on failure);
* the SuperLink and all its helpers are stopped by PID at the end.

Results go to ``<output_dir>/<name>/``; logs, run config, runs.json and pids.json to
``<output_dir>/<name>/deploy/``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_local import (  # noqa: E402
    DeployError,
    Processes,
    binary,
    finish,
    free_port,
    parse_args,
    resolve_config,
    sigterm_as_interrupt,
    start_flwr_run,
    wait_for_run,
    write_cli_config,
    write_run_config,
)

CONNECTION = "local"
LOCAL_SUPERLINK = "local-superlink"
SUPERLINK_START_TIMEOUT = 180.0  # seconds; flwr itself waits 15 s


def simulate(
    cfg: Any, num_supernodes: int, timeout: float, keep_homes: bool = False
) -> Path:
    """Run ``cfg`` by ``flwr run`` on a private local SuperLink; return the run dir."""
    run_dir: Path = Path(cfg.output_dir) / str(cfg.name)
    deploy_dir = run_dir / "deploy"
    deploy_dir.mkdir(parents=True, exist_ok=True)
    # Only this script's own record of an earlier attempt: the results
    # (history.json included) belong to the ServerApp, which keeps, resumes or
    # clears them as ``on_existing`` says.
    (deploy_dir / "runs.json").unlink(missing_ok=True)
    run_config = write_run_config(cfg, deploy_dir / "run_config.toml")
    home = Path(tempfile.mkdtemp(prefix="lora-flwr-sim-"))
    procs = Processes(deploy_dir, tag=str(home))
    env = procs.env(
        home,
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    write_cli_config(home, CONNECTION, {"address": ":local:"})
    cpus = max(1, int(cfg.fed.client_num_cpus))
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus}"
    if cfg.fed.client_num_gpus > 0:
        federation += f" client-resources-num-gpus={cfg.fed.client_num_gpus}"
    start = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            _start_local_superlink(procs, env, home, SUPERLINK_START_TIMEOUT)
            start_flwr_run(
                procs, env, CONNECTION, run_config, ["--federation-config", federation]
            )
            run = wait_for_run(env, CONNECTION, timeout, procs, [LOCAL_SUPERLINK])
            with contextlib.suppress(subprocess.TimeoutExpired):
                procs.procs["flwr-run"].wait(timeout=15)  # last streamed lines
            seconds = time.perf_counter() - start
            finish(run, run_dir, deploy_dir, cfg.fed.num_rounds, seconds)
    finally:
        procs.stop_all()
        if not keep_homes:
            shutil.rmtree(home, ignore_errors=True)
    return run_dir


def _start_local_superlink(
    procs: Processes, env: dict[str, str], home: Path, timeout: float
) -> None:
    """Start the local SuperLink ``flwr run`` would start; wait until it answers.

    The options are those of ``flwr.cli.local_superlink`` (flwr 1.42), minus its
    log rotation: the log goes to ``deploy/local-superlink.log``. ``flwr run`` and
    ``flwr ls`` probe ``/health`` on ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` and use
    the SuperLink that answers.
    """
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    runtime = home / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    argv = [
        binary("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--database",
        str(runtime / "state.db"),
    ]
    procs.start(LOCAL_SUPERLINK, argv, env)
    url = f"http://127.0.0.1:{port}/health"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive([LOCAL_SUPERLINK])
        try:
            with direct.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise DeployError(f"the local SuperLink did not answer {url} within {timeout} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = parse_args(argv, __doc__)
    try:
        cfg = resolve_config(args.config, args.set, args.output_dir)
        num = args.num_supernodes or cfg.fed.num_clients
        if num != cfg.fed.num_clients:
            cfg = cfg.with_overrides([f"fed.num_clients={num}"])
        simulate(cfg, num, args.timeout, args.keep_homes)
    except (DeployError, ValueError, FileNotFoundError) as exc:
        print(f"\nERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; every process started here was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
