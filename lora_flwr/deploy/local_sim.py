"""``flwr run`` in simulation on a private local SuperLink, isolated and cleaned up.

What ``flwr run .`` does on a workstation, made safe for tests and CI: a private
``FLWR_HOME`` whose ``local`` connection has ``address = ":local:"``; that local
SuperLink started here (with the options ``flwr run`` would use) on free ports, so
it never reuses another user's SuperLink on the default port; the experiment as a
flat run config; success read from ``flwr ls``; every process stopped at the end.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from lora_flwr.config import ExperimentConfig
from lora_flwr.deploy.cli import (
    RUN_PROCESS,
    start_flwr_run,
    wait_for_run,
    write_cli_config,
)
from lora_flwr.deploy.errors import DeployError
from lora_flwr.deploy.options import LaunchOptions
from lora_flwr.deploy.outcome import finish
from lora_flwr.deploy.processes import (
    Processes,
    binary,
    free_port,
    sigterm_as_interrupt,
    wait_exit,
)
from lora_flwr.deploy.run_config import (
    check_launch,
    launch_dir,
    resolve_config,
    with_supernodes,
    write_run_config,
)

CONNECTION = "local"
LOCAL_SUPERLINK = "local-superlink"
SUPERLINK_START_TIMEOUT = 180.0  # seconds; flwr itself waits 15 s


def federation_config(cfg: ExperimentConfig, num_supernodes: int) -> str:
    """``--federation-config`` of the simulation: its size and client resources."""
    cpus = max(1, int(cfg.compute.client_cpus))
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus}"
    if cfg.compute.client_gpus > 0:
        federation += f" client-resources-num-gpus={cfg.compute.client_gpus}"
    return federation


def simulate(
    cfg: ExperimentConfig, num_supernodes: int, timeout: float, keep_homes: bool = False
) -> Path:
    """Run ``cfg`` by ``flwr run`` on a private local SuperLink; return the run dir.

    Parameters
    ----------
    cfg
        The experiment, with an absolute ``output_dir``.
    num_supernodes
        Simulated SuperNodes (``num-supernodes`` of the federation config).
    timeout
        Seconds the run may take.
    keep_homes
        Keep the private FLWR_HOME.

    Returns
    -------
    Path
        ``<output_dir>/<name>``; logs, run config, runs.json and pids.json are in
        its ``deploy/`` folder.
    """
    run_dir, deploy_dir = launch_dir(cfg, ("runs.json",))
    run_config = write_run_config(cfg, deploy_dir / "run_config.toml")
    home = Path(tempfile.mkdtemp(prefix="lora-flwr-sim-"))
    procs = Processes(deploy_dir, tag=str(home))
    env = procs.env(
        home,
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    write_cli_config(home, CONNECTION, {"address": ":local:"})
    federation = ["--federation-config", federation_config(cfg, num_supernodes)]
    start = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            start_local_superlink(procs, env, home, SUPERLINK_START_TIMEOUT)
            start_flwr_run(procs, env, CONNECTION, run_config, federation)
            run = wait_for_run(env, CONNECTION, timeout, procs, [LOCAL_SUPERLINK])
            wait_exit(procs.procs[RUN_PROCESS], 15.0)  # its last streamed lines
            seconds = time.perf_counter() - start
            finish(run, run_dir, deploy_dir, cfg.fed.num_rounds, seconds)
    finally:
        procs.stop_all()
        if not keep_homes:
            shutil.rmtree(home, ignore_errors=True)
    return run_dir


def start_local_superlink(
    procs: Processes, env: dict[str, str], home: Path, timeout: float
) -> None:
    """Start the local SuperLink ``flwr run`` would start; wait until it answers.

    The options are those of ``flwr.cli.local_superlink`` (flwr 1.42), minus its
    log rotation: the log goes to ``deploy/local-superlink.log``. ``flwr run`` and
    ``flwr ls`` probe ``/health`` on ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` and use
    the SuperLink that answers. Started here because flwr gives the one it starts
    15 s to answer (fixed in flwr 1.42), which a loaded machine can exceed.
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


def simulate_from_options(options: LaunchOptions) -> Path:
    """Resolve the experiment of ``options`` and :func:`simulate` it."""
    cfg = resolve_config(options.config, options.overrides, options.output_dir)
    cfg, num = with_supernodes(cfg, options.num_supernodes)
    check_launch(cfg)
    return simulate(cfg, num, options.timeout, options.keep_homes)
