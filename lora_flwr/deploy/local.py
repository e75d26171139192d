"""One SuperLink and N SuperNodes on this machine, each a separate OS process.

Secure by default: TLS on every link and SuperNode authentication.

1. ``flower-superlink`` with TLS and ``--enable-supernode-auth`` on a free port;
2. a CLI connection ``[superlink.local-deployment]`` with ``root-certificates``
   in a private ``$FLWR_HOME/config.toml``;
3. ``flwr supernode register node-<i>.pub`` for every SuperNode, before any
   starts: the key -> node id -> partition table goes to ``nodes.json``;
4. N ``flower-supernode`` processes (own FLWR_HOME, own port, ``partition-id=i``);
   wait until ``flwr supernode list`` shows every registered node id ``online``;
5. ``flwr run . local-deployment --run-config <flat toml> --stream`` and the wait
   for the run (:func:`lora_flwr.deploy.cli.wait_for_run`);
6. stop every process started here and every helper they spawned, also on error,
   Ctrl-C or SIGTERM.

``insecure`` skips TLS and authentication (with a warning): any process on this
machine can then join as a SuperNode.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_flwr.config import ExperimentConfig
from lora_flwr.deploy.cli import (
    RUN_PROCESS,
    register_supernode,
    start_flwr_run,
    wait_for_run,
    wait_for_supernodes,
    write_cli_config,
)
from lora_flwr.deploy.commands import (
    cli_connection,
    node_config,
    superlink_argv,
    supernode_argv,
)
from lora_flwr.deploy.credentials import (
    Credentials,
    prepare_credentials,
    ssh_fingerprint,
)
from lora_flwr.deploy.errors import DeployError
from lora_flwr.deploy.options import DeployOptions
from lora_flwr.deploy.outcome import finish
from lora_flwr.deploy.processes import (
    Processes,
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

CONNECTION = "local-deployment"
# Seconds for every registered SuperNode to come online (≈6 s when idle; a loaded
# 2-core machine needs far more because each node imports flwr from scratch).
NODES_ONLINE_TIMEOUT = 300.0
INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no SuperNode authentication. Traffic is "
    "plain HTTP and any process that reaches the port can join as a SuperNode "
    "and receive the model. Use only for debugging on a trusted machine."
)


@dataclass(frozen=True)
class _Nodes:
    """How the SuperNodes of one deployment run on this machine."""

    count: int
    threads: int | None  # torch threads per node; see :func:`deploy`
    cpus: frozenset[int] | None  # pinned to these CPUs; None: not pinned


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


def _start_supernodes(
    procs: Processes,
    homes: Path,
    address: str,
    creds: Credentials | None,
    nodes: _Nodes,
) -> list[str]:
    """Start SuperNode ``i`` for partition ``i`` (own FLWR_HOME); return the names."""
    names = []
    for pid in range(nodes.count):
        name = f"supernode-{pid}"
        names.append(name)
        cores = len(nodes.cpus) if nodes.cpus else None
        argv = supernode_argv(
            address,
            free_port(),
            node_config(pid, nodes.count, nodes.threads, cores=cores),
            root_certificates=creds.ca_cert if creds else None,
            auth_key=creds.node_keys[pid].private if creds else None,
            insecure=creds is None,
        )
        procs.start(name, argv, procs.env(homes / name), cpus=nodes.cpus)
    return names


def _await_registered_nodes(
    env: dict[str, str],
    table: list[dict[str, Any]],
    timeout: float,
    procs: Processes,
    watch: list[str],
) -> None:
    """Wait until every registered node is online; write ``nodes.json`` by the logs."""
    online = wait_for_supernodes(
        env,
        CONNECTION,
        [row["node-id"] for row in table],
        min(NODES_ONLINE_TIMEOUT, timeout),
        procs,
        watch,
    )
    status = {str(n["node-id"]): n["status"] for n in online}
    for row in table:
        row["status"] = status[str(row["node-id"])]
    doc = {"tls": True, "supernode-auth": True, "nodes": table}
    (procs.log_dir / "nodes.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"all {len(table)} SuperNodes online (TLS + node auth)", flush=True)


def _credentials(
    insecure: bool,
    tls_dir: Path | None,
    generate: bool,
    num_supernodes: int,
    scratch: Path,
) -> Credentials | None:
    """Return the deployment's credentials; None (with a warning) when insecure."""
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
        return None
    return prepare_credentials(tls_dir, generate, num_supernodes, scratch)


def _run_deployment(
    procs: Processes,
    homes: Path,
    creds: Credentials | None,
    nodes: _Nodes,
    run_config: Path,
    timeout: float,
    server_cpus: frozenset[int] | None,
) -> dict[str, Any]:
    """Start the SuperLink, the CLI connection and the SuperNodes; run; wait."""
    address = start_superlink(procs, homes / "superlink", creds, cpus=server_cpus)
    cli_home = homes / "cli"
    write_cli_config(cli_home, CONNECTION, cli_connection(address, creds))
    env = procs.env(cli_home)
    # Keys are registered before any SuperNode starts: an unregistered
    # node is refused at once and exits (Flower exit code 305).
    table = []
    if creds is not None:
        table = register_nodes(env, CONNECTION, creds, nodes.count)
    watch = ["superlink", *_start_supernodes(procs, homes, address, creds, nodes)]
    if creds is not None:
        _await_registered_nodes(env, table, timeout, procs, watch)
    start_flwr_run(procs, env, CONNECTION, run_config)
    run = wait_for_run(env, CONNECTION, timeout, procs, watch)
    wait_exit(procs.procs[RUN_PROCESS], 15.0)  # its last streamed lines
    return run


def deploy(
    cfg: ExperimentConfig,
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
        The experiment, with an absolute ``output_dir``
        (:func:`lora_flwr.deploy.run_config.resolve_config`).
    num_supernodes
        SuperNodes to start, one per partition.
    timeout
        Seconds the run may take.
    keep_homes
        Keep the per-process FLWR_HOME tree (and throwaway credentials).
    insecure
        No TLS and no SuperNode authentication.
    tls_dir
        Credentials directory
        (:func:`lora_flwr.deploy.credentials.prepare_credentials`); None:
        throwaway.
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
        ``<output_dir>/<name>``; its ``deploy/`` folder holds the processes'
        logs, ``run_config.toml``, ``runs.json``, ``pids.json`` and, in secure
        mode, ``nodes.json``.

    Raises
    ------
    DeployError
        If a process dies, the run fails or does not finish in time, or its
        results are incomplete; every process started is stopped first.
    """
    run_dir, deploy_dir = launch_dir(cfg, ("runs.json", "nodes.json"))
    run_config = write_run_config(cfg, deploy_dir / "run_config.toml")
    homes = Path(tempfile.mkdtemp(prefix="lora-flwr-deploy-"))  # mode 0700
    procs = Processes(deploy_dir, tag=str(homes))
    nodes = _Nodes(num_supernodes, node_threads, node_cpus)
    start = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            creds = _credentials(
                insecure, tls_dir, generate_certs, num_supernodes, homes / "tls"
            )
            run = _run_deployment(
                procs, homes, creds, nodes, run_config, timeout, server_cpus
            )
            seconds = time.perf_counter() - start
            finish(run, run_dir, deploy_dir, cfg.fed.num_rounds, seconds)
    finally:
        procs.stop_all()
        if not keep_homes:
            shutil.rmtree(homes, ignore_errors=True)
    return run_dir


def deploy_from_options(options: DeployOptions) -> Path:
    """Resolve the experiment of ``options`` and :func:`deploy` it.

    Raises
    ------
    DeployError
        If fewer SuperNodes than ``sampling.min_available`` are asked for
        (the run would wait forever), or as :func:`deploy` does.
    """
    cfg = resolve_config(options.config, options.overrides, options.output_dir)
    num = options.num_supernodes or cfg.fed.num_clients
    if num < cfg.sampling.min_available:
        raise DeployError(
            f"--num-supernodes={num} < sampling.min_available="
            f"{cfg.sampling.min_available}: the run would wait forever"
        )
    cfg, num = with_supernodes(cfg, num)
    check_launch(cfg)
    return deploy(
        cfg,
        num,
        options.timeout,
        options.keep_homes,
        insecure=options.insecure,
        tls_dir=options.tls_dir,
        generate_certs=options.generate_certs,
        node_threads=options.node_threads,
        server_cpus=options.server_cpus,
        node_cpus=options.node_cpus,
    )
