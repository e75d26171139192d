"""Command lines of the Flower processes: SuperLink, SuperNode, CLI connection."""

from __future__ import annotations

import os
from pathlib import Path

from lora_flwr.deploy.credentials import Credentials
from lora_flwr.deploy.processes import binary
from lora_flwr.deploy.run_config import Scalar


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


def node_config(
    pid: int, num_supernodes: int, node_threads: int | None, cores: int | None = None
) -> str:
    """Return the ``--node-config`` of SuperNode ``pid`` on this machine.

    ``node_threads`` None shares ``cores`` (default: the machine's; the pinned
    set under ``--node-cpus``) between the nodes, at least one each; 0 leaves
    ``num-threads`` out (torch's default: every core).
    """
    if node_threads is None:
        node_threads = max(1, (cores or os.cpu_count() or 1) // num_supernodes)
    text = f"partition-id={pid} num-partitions={num_supernodes}"
    return text + (f" num-threads={node_threads}" if node_threads > 0 else "")


def cli_connection(address: str, creds: Credentials | None) -> dict[str, Scalar]:
    """Return the ``[superlink.<name>]`` table of the CLI's ``config.toml``."""
    if creds is None:
        return {"address": address, "insecure": True}
    return {"address": address, "root-certificates": str(creds.ca_cert)}
