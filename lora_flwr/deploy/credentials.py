"""Throwaway TLS and SuperNode-authentication credentials, and their file layout.

A directory of credentials holds (file names are all that other code relies on):

* ``ca.pem``: a self-signed CA certificate (its private key is discarded once the
  server certificate is signed, so nothing else can ever be issued under it); the
  SuperLink's ``--ssl-ca-certfile``, each SuperNode's ``--root-certificates`` and
  the CLI connection's ``root-certificates``;
* ``server.pem`` / ``server.key``: the SuperLink's certificate and key, for
  ``--ssl-certfile`` / ``--ssl-keyfile``;
* ``node-<i>.key`` / ``node-<i>.pub``: one ECDSA P-384 key pair per SuperNode in
  OpenSSH format, what Flower 1.42 reads: the private key goes to
  ``flower-supernode --auth-supernode-private-key``, the public key to
  ``flwr supernode register``.

Private keys are written with mode 0600 and no file is ever overwritten.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lora_flwr.deploy.errors import DeployError

CA_CERT = "ca.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 30
CA_NAME = "lora-flwr throwaway CA"


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's authentication key pair (OpenSSH files)."""

    private: Path  # --auth-supernode-private-key
    public: Path  # flwr supernode register <public>


@dataclass(frozen=True)
class Credentials:
    """Paths of everything a TLS + SuperNode-auth deployment reads."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[NodeKey, ...]


def node_key_paths(directory: Path, index: int) -> NodeKey:
    """Where SuperNode ``index``'s key pair lives in ``directory``."""
    return NodeKey(directory / f"node-{index}.key", directory / f"node-{index}.pub")


def credential_paths(directory: str | Path, num_nodes: int) -> Credentials:
    """Lay out ``directory`` for ``num_nodes`` SuperNodes (nothing is checked)."""
    root = Path(directory).resolve()
    return Credentials(
        directory=root,
        ca_cert=root / CA_CERT,
        server_cert=root / SERVER_CERT,
        server_key=root / SERVER_KEY,
        node_keys=tuple(node_key_paths(root, i) for i in range(num_nodes)),
    )


def _all_files(creds: Credentials) -> list[Path]:
    """Every file of ``creds``: certificates and server key, then node key pairs."""
    files = [creds.ca_cert, creds.server_cert, creds.server_key]
    for key in creds.node_keys:
        files += [key.private, key.public]
    return files


def load_credentials(directory: str | Path, num_nodes: int) -> Credentials:
    """Check that ``directory`` holds every file of :func:`credential_paths`.

    Parameters
    ----------
    directory
        A directory written by :func:`generate_credentials`, or laid out the same
        way with certificates and keys from elsewhere.
    num_nodes
        How many SuperNode key pairs it must hold (``node-0`` ... ``node-<n-1>``).

    Returns
    -------
    Credentials
        The absolute paths.

    Raises
    ------
    FileNotFoundError
        Naming every missing file.
    """
    creds = credential_paths(directory, num_nodes)
    missing = [str(p) for p in _all_files(creds) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"TLS directory {creds.directory} lacks {', '.join(missing)} "
            "(create them with --generate-certs or scripts/deploy_tls.py)"
        )
    return creds


def write_private(path: Path, data: bytes) -> Path:
    """Create ``path`` with mode 0600 and write ``data``; never overwrite.

    The mode is given to ``os.open`` itself, so the key is never readable by
    others, not even between creating the file and a later ``chmod``.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _write_public(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Subject alternative names: IP addresses as IPs, the rest as DNS names."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Return the key usage of a CA (``signs_certificates``) or of a TLS server."""
    return x509.KeyUsage(
        digital_signature=not signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not signs_certificates,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_subject: x509.Name,
    start: datetime.datetime,
    end: datetime.datetime,
) -> x509.Certificate:
    """Build a self-signed CA certificate that may sign end certificates only."""
    return (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _server_certificate(
    server_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_subject: x509.Name,
    start: datetime.datetime,
    end: datetime.datetime,
) -> x509.Certificate:
    """Build the SuperLink's TLS server certificate for ``hosts``, signed by the CA."""
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))])
        )
        .issuer_name(ca_subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            False,
        )
        .sign(ca_key, hashes.SHA384())
    )


def generate_ca_and_server_cert(
    directory: Path,
    hosts: Sequence[str] = LOOPBACK_HOSTS,
    days: int = VALID_DAYS,
    ca_name: str = CA_NAME,
) -> tuple[Path, Path, Path]:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` into ``directory``.

    Parameters
    ----------
    directory
        An existing directory without these files.
    hosts
        The names a client may use to reach the SuperLink (the certificate's
        subject alternative names): IP addresses or DNS names.
    days
        Validity of both certificates.
    ca_name
        The CA's common name (give a second CA another name in tests).

    Returns
    -------
    tuple of Path
        ``(ca_cert, server_cert, server_key)``.
    """
    if not hosts:
        raise ValueError("`hosts` should name at least one host but it is empty")
    # A minute of slack so that a slightly late clock does not reject a new cert.
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    end = start + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = _ca_certificate(ca_key, ca_subject, start, end)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, hosts, ca_key, ca_subject, start, end)
    # The CA key is not written anywhere: a throwaway CA signs this one server
    # certificate and can never vouch for anything else.
    pem = serialization.Encoding.PEM
    ca_path = _write_public(directory / CA_CERT, ca_cert.public_bytes(pem))
    cert_path = _write_public(directory / SERVER_CERT, server_cert.public_bytes(pem))
    key_path = write_private(
        directory / SERVER_KEY,
        server_key.private_bytes(
            pem,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return ca_path, cert_path, key_path


def generate_node_key(private: Path, public: Path) -> NodeKey:
    """Write one SuperNode's ECDSA P-384 key pair in OpenSSH format.

    Flower 1.42 reads the private key with ``load_ssh_private_key`` (unencrypted)
    and ``flwr supernode register`` wants the ``ecdsa-sha2-nistp384 ...`` public
    key line; both refuse keys that are not on a NIST curve.

    Parameters
    ----------
    private
        Path of the private key (created with mode 0600).
    public
        Path of the public key line.

    Returns
    -------
    NodeKey
        The two paths.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_public(public, line + b"\n")
    return NodeKey(private, public)


def generate_credentials(
    directory: str | Path,
    num_nodes: int,
    hosts: Sequence[str] = LOOPBACK_HOSTS,
    days: int = VALID_DAYS,
    ca_name: str = CA_NAME,
) -> Credentials:
    """Write a throwaway CA, the SuperLink's certificate and SuperNode key pairs.

    Parameters
    ----------
    directory
        Created if missing (mode 0700); must not hold any of the files yet, so
        existing credentials are never overwritten.
    num_nodes
        How many SuperNode key pairs to write (``node-0`` ... ``node-<n-1>``).
    hosts
        Subject alternative names of the server certificate.
    days
        Validity of the certificates.
    ca_name
        Common name of the CA.

    Returns
    -------
    Credentials
        The absolute paths of everything written.
    """
    if num_nodes < 0:
        raise ValueError(f"`num_nodes` should be >= 0 but the value is {num_nodes}")
    creds = credential_paths(directory, num_nodes)
    creds.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = [str(p) for p in _all_files(creds) if p.exists()]
    if existing:
        raise FileExistsError(
            f"refusing to overwrite existing credentials: {', '.join(existing)}"
        )
    generate_ca_and_server_cert(creds.directory, hosts, days, ca_name)
    for key in creds.node_keys:
        generate_node_key(key.private, key.public)
    return creds


def ssh_fingerprint(public_key: str | Path) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key file, as ``ssh-keygen -lf`` prints.

    Operators compare this short value, not the whole key, when they record which
    key belongs to which data owner.
    """
    fields = Path(public_key).read_text().split()
    if len(fields) < 2:
        raise ValueError(f"{public_key} is not an OpenSSH public key line")
    digest = hashlib.sha256(base64.b64decode(fields[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def check_private_keys(creds: Credentials) -> None:
    """Refuse private keys that other users may read (as ssh does).

    Keys written by :func:`generate_credentials` are 0600; a key copied in from
    elsewhere may not be.
    """
    keys = [creds.server_key, *(k.private for k in creds.node_keys)]
    loose = [
        f"{p} ({p.stat().st_mode & 0o777:o})" for p in keys if p.stat().st_mode & 0o077
    ]
    if loose:
        raise DeployError(
            "private keys readable by group or others (chmod 600 them): "
            + ", ".join(loose)
        )


def prepare_credentials(
    tls_dir: Path | None, generate: bool, num_supernodes: int, scratch: Path
) -> Credentials:
    """Return the credentials of a secure deployment, with private keys checked.

    ``tls_dir`` None: fresh throwaway ones in ``scratch`` (deleted with it);
    ``generate``: fresh ones written into ``tls_dir`` (never overwriting);
    otherwise the files already in ``tls_dir``.
    """
    if tls_dir is None:
        creds = generate_credentials(scratch, num_supernodes)
    elif generate:
        creds = generate_credentials(tls_dir, num_supernodes)
        print(f"wrote TLS credentials to {creds.directory}", flush=True)
    else:
        creds = load_credentials(tls_dir, num_supernodes)
    check_private_keys(creds)
    return creds
