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
``completed`` and wrote every round; 1 with the reason otherwise; 130 when
interrupted. The work is done by the ``lora_flwr.deploy`` package
(``lora_flwr/deploy/local.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lora_flwr.deploy.errors import DeployError
from lora_flwr.deploy.local import deploy_from_options
from lora_flwr.deploy.options import exit_code, parse_deploy_args

# Errors reported as one line: exit 2 for a config, data, model or run folder
# refused before any process starts (BadInput), else 1; anything else is a bug.
ERRORS = (DeployError, ValueError, FileNotFoundError, FileExistsError)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    options = parse_deploy_args(argv, __doc__)
    return exit_code(lambda: deploy_from_options(options), ERRORS)


if __name__ == "__main__":
    sys.exit(main())
