"""Throwaway TLS and SuperNode-authentication credentials for a loopback deployment.

    python scripts/deploy_tls.py DIR [--num-nodes 2] [--host 127.0.0.1 ...]

Writes into ``DIR`` (created with mode 0700; every private key with mode 0600,
never overwriting an existing file):

* ``ca.pem``: a self-signed CA certificate (the CA's private key is discarded
  once the server certificate is signed, so nothing else can ever be issued
  under it); the SuperLink's ``--ssl-ca-certfile``, each SuperNode's
  ``--root-certificates`` and the CLI connection's ``root-certificates``;
* ``server.pem`` / ``server.key``: the SuperLink's certificate (subject
  alternative names 127.0.0.1 and localhost by default) and its key, for
  ``--ssl-certfile`` / ``--ssl-keyfile``;
* ``node-<i>.key`` / ``node-<i>.pub``: one ECDSA P-384 key pair per SuperNode in
  OpenSSH format, what Flower 1.42 reads: the private key goes to
  ``flower-supernode --auth-supernode-private-key``, the public key to
  ``flwr supernode register``.

For anything beyond a loopback test, use certificates from your own CA; only the
file names matter to ``scripts/deploy_local.py --tls-dir``. The files are written
by ``lora_flwr/deploy/credentials.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lora_flwr.deploy.credentials import (
    LOOPBACK_HOSTS,
    generate_credentials,
    ssh_fingerprint,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where to write (must not hold them yet)")
    parser.add_argument("--num-nodes", type=int, default=2, help="SuperNode keys")
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        help="server certificate name (repeatable; default 127.0.0.1 and localhost)",
    )
    args = parser.parse_args(argv)
    try:
        creds = generate_credentials(
            args.directory, args.num_nodes, tuple(args.host or LOOPBACK_HOSTS)
        )
    except (FileExistsError, ValueError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {creds.ca_cert}, {creds.server_cert}, {creds.server_key}")
    for key in creds.node_keys:
        print(f"wrote {key.private} ({ssh_fingerprint(key.public)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
