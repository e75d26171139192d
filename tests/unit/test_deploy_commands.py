"""lora_flwr.deploy: Flower command lines, the CLI connection, and no flwr import."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import lora_flwr.deploy
from lora_flwr.deploy.cli import write_cli_config
from lora_flwr.deploy.commands import cli_connection, superlink_argv, supernode_argv
from lora_flwr.deploy.credentials import credential_paths

REPO = Path(__file__).resolve().parents[2]


def test_the_secure_superlink_has_tls_and_node_auth(tmp_path: Path) -> None:
    # Prepare
    creds = credential_paths(tmp_path, 1)

    # Execute
    secure = superlink_argv(9092, creds)
    insecure = superlink_argv(9092, None)

    # Assert
    assert Path(secure[0]).name == "flower-superlink"
    assert secure[1:] == [
        "--host",
        "127.0.0.1",
        "--port",
        "9092",
        "--disable-runtime-dependency-installation",
        "--ssl-ca-certfile",
        str(creds.ca_cert),
        "--ssl-certfile",
        str(creds.server_cert),
        "--ssl-keyfile",
        str(creds.server_key),
        "--enable-supernode-auth",
    ]
    assert insecure[1:] == secure[1:6] + ["--insecure"]


def test_a_supernode_line_and_its_insecure_refusal(tmp_path: Path) -> None:
    # Prepare
    creds = credential_paths(tmp_path, 1)

    # Execute
    argv = supernode_argv(
        "127.0.0.1:9092",
        9094,
        "partition-id=0 num-partitions=1",
        root_certificates=creds.ca_cert,
        auth_key=creds.node_keys[0].private,
        max_retries=2,
    )

    # Assert
    assert argv[1:] == [
        "--superlink",
        "127.0.0.1:9092",
        "--port",
        "9094",
        "--root-certificates",
        str(creds.ca_cert),
        "--auth-supernode-private-key",
        str(creds.node_keys[0].private),
        "--node-config",
        "partition-id=0 num-partitions=1",
        "--max-retries",
        "2",
    ]
    with pytest.raises(ValueError, match="`insecure` excludes"):
        supernode_argv("a:1", 2, insecure=True, auth_key=creds.node_keys[0].private)


def test_the_cli_connection_is_the_default_one(tmp_path: Path) -> None:
    # Prepare
    creds = credential_paths(tmp_path / "tls", 0)

    # Execute
    path = write_cli_config(
        tmp_path / "home", "local-deployment", cli_connection("127.0.0.1:9", creds)
    )
    plain = write_cli_config(
        tmp_path / "plain", "c", cli_connection("127.0.0.1:9", None)
    )

    # Assert
    doc = tomllib.loads(path.read_text())
    assert doc["superlink"]["default"] == "local-deployment"
    assert doc["superlink"]["local-deployment"] == {
        "address": "127.0.0.1:9",
        "root-certificates": str(creds.ca_cert),
    }
    assert tomllib.loads(plain.read_text())["superlink"]["c"] == {
        "address": "127.0.0.1:9",
        "insecure": True,
    }


def test_the_deploy_package_never_imports_flower() -> None:
    # Prepare: every module of the package, in a fresh interpreter.
    names = [
        f"lora_flwr.deploy.{m.name}"
        for m in pkgutil.iter_modules(lora_flwr.deploy.__path__)
    ]
    code = (
        "import json, sys\n"
        + "".join(f"import {n}\n" for n in names)
        + "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] == 'flwr' or m.startswith('lora_flwr.fl'))))"
    )

    # Execute
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )

    # Assert
    assert len(names) >= 10
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
