"""lora_flwr.deploy.credentials: throwaway TLS certificates and SuperNode keys."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from lora_flwr.deploy.credentials import (
    check_private_keys,
    generate_credentials,
    load_credentials,
    prepare_credentials,
    ssh_fingerprint,
)
from lora_flwr.deploy.errors import DeployError


def test_generated_credentials_chain_to_their_ca_and_keep_keys_private(
    tmp_path: Path,
) -> None:
    # Execute
    creds = generate_credentials(tmp_path / "tls", 2)

    # Assert: the server certificate is signed by the CA and names the loopback.
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1"
    ]
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is True and basic.path_length == 0
    private = [creds.server_key, *(k.private for k in creds.node_keys)]
    assert [p.stat().st_mode & 0o777 for p in private] == [0o600] * 3
    assert creds.directory.stat().st_mode & 0o777 == 0o700
    assert [k.public.name for k in creds.node_keys] == ["node-0.pub", "node-1.pub"]
    assert load_credentials(creds.directory, 2) == creds


def test_existing_credentials_are_never_overwritten(tmp_path: Path) -> None:
    # Prepare
    creds = generate_credentials(tmp_path, 1)
    before = creds.ca_cert.read_bytes()

    # Execute / Assert
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_credentials(tmp_path, 1)
    assert creds.ca_cert.read_bytes() == before


def test_loading_names_every_missing_file(tmp_path: Path) -> None:
    # Prepare: credentials for one node, asked for two.
    generate_credentials(tmp_path, 1)

    # Execute / Assert
    with pytest.raises(FileNotFoundError) as info:
        load_credentials(tmp_path, 2)
    assert "node-1.key" in str(info.value) and "node-1.pub" in str(info.value)
    assert "node-0" not in str(info.value)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_fingerprint_is_what_ssh_keygen_prints(tmp_path: Path) -> None:
    # Prepare
    key = generate_credentials(tmp_path, 1).node_keys[0]

    # Execute
    printed = subprocess.run(
        ["ssh-keygen", "-lf", str(key.public)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]

    # Assert
    assert ssh_fingerprint(key.public) == printed
    assert printed.startswith("SHA256:")


def test_a_private_key_others_can_read_is_refused(tmp_path: Path) -> None:
    # Prepare
    creds = generate_credentials(tmp_path, 1)
    creds.node_keys[0].private.chmod(0o640)

    # Execute / Assert
    with pytest.raises(DeployError, match=r"node-0.key \(640\)"):
        check_private_keys(creds)
    with pytest.raises(DeployError, match="chmod 600"):
        prepare_credentials(tmp_path, False, 1, tmp_path / "unused")


def test_throwaway_credentials_go_to_the_scratch_directory(tmp_path: Path) -> None:
    # Execute
    creds = prepare_credentials(None, False, 2, tmp_path / "scratch")

    # Assert
    assert creds.directory == (tmp_path / "scratch").resolve()
    assert all(k.private.is_file() for k in creds.node_keys)
