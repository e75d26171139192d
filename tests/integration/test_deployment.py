"""A real Flower deployment on loopback: scripts/deploy_local.py end to end.

The script starts ``flower-superlink`` with TLS and ``--enable-supernode-auth``,
registers one ECDSA key per SuperNode with ``flwr supernode register``, starts two
``flower-supernode --root-certificates ca.pem --auth-supernode-private-key
node-<i>.key --node-config "partition-id=i num-partitions=2"`` processes (own
FLWR_HOME and port each), writes a ``[superlink.local-deployment]`` CLI connection
with ``root-certificates``, runs ``flwr run . local-deployment --run-config <smoke>
--stream``, polls ``flwr ls --format json`` and stops every process it started.
It runs FedIT, FedSA (B kept in each node's Context.state) and FedIT with the
server's LDA head refit (class statistics asked of every SuperNode).

The second half starts one secure SuperLink (credentials made here with
``cryptography``) and checks who may join: a registered node that trusts the CA
comes online; a node without the CA, or trusting another CA, fails the TLS
handshake; a node with an unregistered key, or with no key, is refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lda_check import assert_head_is_lda

from lora_flwr.config import ExperimentConfig
from lora_flwr.deploy import cli, commands, credentials, local, processes

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"
TIMEOUT = 1500  # seconds; a deployment round costs ≈ 12-16 s of polling when idle
# A refused SuperNode exits by itself (Flower exit code 305): ≈ 15-18 s after launch
# on the loaded 2-core machine, mostly importing flwr. Bounded, with a wide margin.
REFUSAL_TIMEOUT = 240
ONLINE_TIMEOUT = 300


def _tagged(var: str, tag: str) -> list[int]:
    """Live PIDs whose environment holds ``var=tag`` (what the script started)."""
    needle = f"{var}={tag}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ and processes.process_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _processes_left(deploy_dir: Path) -> dict[str, Any]:
    doc = json.loads((deploy_dir / "pids.json").read_text())
    deadline = time.monotonic() + 10  # helpers notice their parent's death
    while True:
        named = {n: p for n, p in doc["pids"].items() if processes.process_alive(p)}
        tagged = _tagged(doc["tag_var"], doc["tag"])
        if not (named or tagged) or time.monotonic() > deadline:
            return {"named": named, "tagged": tagged, "pids": doc["pids"]}
        time.sleep(0.5)


# What each deployment run sets on top of the smoke config.
VARIANTS = {
    # The server evaluates round t while round t + 1 travels and trains.
    "fedit": ["fed.aggregation=fedit", "eval.overlap=true"],
    "fedsa": ["fed.aggregation=fedsa"],
    # The server's head refit asks every SuperNode for its class statistics.
    "lda": ["fed.aggregation=fedit", "head.calibration=lda"],
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "tls"),
    [("fedit", "throwaway"), ("fedsa", "tls-dir"), ("lda", "throwaway")],
)
def test_deploy_local_two_supernodes_smoke(
    variant: str, tls: str, tmp_path: Path
) -> None:
    # Prepare: fedit and lda run with the script's own throwaway credentials, fedsa
    # with credentials made here and passed in with --tls-dir.
    name = f"deploy-{variant}"
    overrides = VARIANTS[variant]
    security: list[str] = []
    creds = None
    if tls == "tls-dir":
        creds = credentials.generate_credentials(tmp_path / "tls", 2)
        security = ["--tls-dir", str(creds.directory)]

    # Execute
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "deploy_local.py"),
            "--config",
            str(SMOKE),
            "--num-supernodes",
            "2",
            "--output-dir",
            str(tmp_path),
            "--set",
            f"name={name}",
            *[arg for o in overrides for arg in ("--set", o)],
            "--timeout",
            str(TIMEOUT - 100),
            *security,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    seconds = time.perf_counter() - start
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / name
    deploy_dir = run_dir / "deploy"

    # Assert: no SuperLink, SuperNode or helper it started is left, whatever the
    # outcome.
    left = _processes_left(deploy_dir)
    assert left["named"] == {} and left["tagged"] == [], left
    assert set(left["pids"]) == {"superlink", "supernode-0", "supernode-1", "flwr-run"}
    for pid in left["pids"].values():
        assert f"pid={pid}" in proc.stdout  # the script printed what it started
    assert proc.returncode == 0, log
    assert f"results: {run_dir.resolve()}" in proc.stdout

    run = json.loads((deploy_dir / "runs.json").read_text())
    assert run["status"] == "finished:completed", run
    _check_secure_run(deploy_dir, proc.stdout + proc.stderr, creds)
    assert run["network-traffic"]["total-bytes"] > 0  # messages really travelled
    print(f"deployment smoke: {seconds:.1f} s, run elapsed {run['elapsed']:.1f} s")

    cfg = ExperimentConfig.from_toml(SMOKE).with_overrides(
        [f"name={name}", f"output_dir={tmp_path.resolve()}", *overrides]
    )
    assert ExperimentConfig.from_toml(run_dir / "config.toml") == cfg

    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history] == list(range(cfg.fed.num_rounds + 1))
    # A SuperNode's Context.state outlives the per-message flwr-clientapp process.
    assert [r["client_fit_calls_max"] for r in history[1:]] == [1, 2]
    if variant == "fedsa":
        _check_fedsa(cfg, history, run_dir, tmp_path)
        return
    for rec in history[1:]:
        assert rec["fit_sampled"] == 2 and rec["fit_ok"] == 2, rec
        assert rec["fit_failed"] == 0 and rec["fit_dropped"] == 0, rec
        assert rec["aggregated"] is True
        assert rec["eval_ok"] == 2
        assert np.isfinite(rec["train_loss"]) and np.isfinite(rec["test_loss"])
        assert rec["bytes_up"] > 0

    # The global adapter moved away from the seeded initial one.
    from lora_flwr.experiment import get_workspace

    ws = get_workspace(cfg)
    ws.reset_adapter()
    names = ws.adapter.weight_names()
    initial = ws.adapter.get_weights()
    ws.adapter.load(run_dir / "adapter")
    final = ws.adapter.get_weights()
    ws.reset_adapter()
    assert [a.shape for a in final] == [a.shape for a in initial]
    assert all(np.isfinite(a).all() for a in final)
    changed = [
        n
        for n, a, b in zip(names, initial, final, strict=True)
        if not np.allclose(a, b)
    ]
    assert changed, "the global adapter did not change from its seeded initial value"
    b_names = [n for n in names if "lora_B" in n]
    assert b_names and all(n in changed for n in b_names)  # B starts at 0, is trained
    if variant == "lda":
        _check_lda(cfg, history, run_dir)
    if cfg.eval.overlap:
        # Round 1's checkpoint holds round 1's adapter, written after round 2 began.
        ws.adapter.load(run_dir / "checkpoints" / "round-001")
        first = ws.adapter.get_weights()
        ws.adapter.load(run_dir / "checkpoints" / "round-002")
        last = ws.adapter.get_weights()
        ws.reset_adapter()
        assert all(np.array_equal(a, b) for a, b in zip(last, final, strict=True))
        assert not all(np.array_equal(a, b) for a, b in zip(first, last, strict=True))


def _check_lda(cfg: ExperimentConfig, history: list[Any], run_dir: Path) -> None:
    """The head refit went through the SuperLink to both SuperNodes and back.

    Each node's statistics come from a ``head_stats`` evaluate message, answered by
    a fresh flwr-clientapp process; the saved head must be the discriminant of what
    the two nodes compute under the saved adapter.
    """
    assert [r["calib_clients"] for r in history] == [2] * (cfg.fed.num_rounds + 1)
    assert all("calib_error" not in r for r in history), history
    assert all(r["bytes_up_calib"] > 0 for r in history)
    assert_head_is_lda(cfg, run_dir, 2)


def _check_fedsa(
    cfg: ExperimentConfig, history: list[Any], run_dir: Path, tmp_path: Path
) -> None:
    """FedSA's B lives only in each SuperNode's Context.state (array records).

    Each node's B is written by one flwr-clientapp process (fit) and read by the
    next (evaluate, next round's fit), so the personalised metrics equal those of
    the in-process simulation of the same config only if it survived.
    """
    import dataclasses

    from lora_flwr.simulation import run

    for rec in history[1:]:
        assert rec["fit_ok"] == 2 and rec["eval_ok"] == 2, rec
        assert rec["bytes_up"] > 0 and "test_loss" not in rec
    sim_dir = run(dataclasses.replace(cfg, name="sim", output_dir=str(tmp_path)))
    sim = json.loads((sim_dir / "history.json").read_text())
    for key in ("personal_loss", "personal_accuracy", "train_loss"):
        got = [r[key] for r in history[1:]]
        want = [r[key] for r in sim[1:]]
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)
    # B never left the nodes: the global adapter's B is still the seeded zero.
    from lora_flwr.experiment import get_workspace

    ws = get_workspace(cfg)
    ws.reset_adapter()
    ws.adapter.load(run_dir / "adapter")
    for name, array in zip(
        ws.adapter.weight_names(), ws.adapter.get_weights(), strict=True
    ):
        if "lora_B" in name:
            assert not array.any(), name
    ws.reset_adapter()


def _check_secure_run(
    deploy_dir: Path, output: str, creds: credentials.Credentials | None
) -> None:
    """TLS and node auth were on, and only the registered keys took part.

    ``creds`` None: the script made throwaway credentials (and must have deleted
    them); otherwise the ones the test passed in with ``--tls-dir``.
    """
    assert "--insecure" not in output and "WARNING: --insecure" not in output
    link_log = (deploy_dir / "superlink.log").read_text(errors="replace")
    assert "Uvicorn running on https://127.0.0.1:" in link_log
    assert "SuperNode authentication is disabled" not in link_log
    doc = json.loads((deploy_dir / "nodes.json").read_text())
    assert doc["tls"] is True and doc["supernode-auth"] is True
    rows = doc["nodes"]
    assert [r["partition-id"] for r in rows] == [0, 1]
    assert [r["status"] for r in rows] == ["online", "online"]
    ids = {str(r["node-id"]) for r in rows}
    assert len(ids) == 2
    for row in rows:
        assert f"registered {row['name']:<13} node-id={row['node-id']}" in output
    # The node ids the SuperLink activated and took replies from are exactly the
    # ids it assigned to the registered keys.
    activated = set(re.findall(r"Activated node_id=(\d+)", link_log))
    replied = set(re.findall(r"Push replies from node_id=(\d+)", link_log))
    assert activated == ids and replied == ids, (activated, replied, ids)
    if creds is None:
        # Throwaway credentials lived in the temporary FLWR_HOME tree, now gone.
        for row in rows:
            assert not Path(row["public-key"]).exists(), row
        return
    for row, key in zip(rows, creds.node_keys, strict=True):
        assert row["public-key"] == str(key.public)
        assert row["fingerprint"] == credentials.ssh_fingerprint(key.public)
        assert row["fingerprint"].startswith("SHA256:")
        assert key.private.stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------ who may join a SuperLink
@dataclass
class SecureLink:
    """A running SuperLink with TLS + node auth, and what the tests need of it."""

    procs: processes.Processes
    address: str
    env: dict[str, str]  # the CLI's environment (its FLWR_HOME holds the connection)
    creds: credentials.Credentials  # node-0 and node-1 are registered
    other: credentials.Credentials  # another CA; its node-0 key is not registered
    node_ids: list[int]  # ids the SuperLink assigned to node-0 and node-1
    homes: Path
    log_dir: Path


@pytest.fixture(scope="module")
def secure_link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureLink]:
    """One SuperLink for the admission tests, with a registered node online.

    The node that joins (node-0's key, the right CA) is the control: it shows
    that the SuperLink accepts a correct node, so a refusal below is down to
    what the refused node lacks.
    """
    root = tmp_path_factory.mktemp("secure-link")
    creds = credentials.generate_credentials(root / "tls", 2)
    other = credentials.generate_credentials(root / "other", 1, ca_name="other CA")
    log_dir = root / "logs"
    log_dir.mkdir()
    homes = root / "homes"
    procs = processes.Processes(log_dir, tag=str(homes))
    try:
        address = local.start_superlink(procs, homes / "superlink", creds)
        cli.write_cli_config(
            homes / "cli",
            local.CONNECTION,
            commands.cli_connection(address, creds),
        )
        env = procs.env(homes / "cli")
        node_ids = [
            cli.register_supernode(env, local.CONNECTION, key.public, f"node-{i}")
            for i, key in enumerate(creds.node_keys)
        ]
        procs.start(
            "good",
            commands.supernode_argv(
                address,
                processes.free_port(),
                "partition-id=0 num-partitions=2",
                root_certificates=creds.ca_cert,
                auth_key=creds.node_keys[0].private,
            ),
            procs.env(homes / "good"),
        )
        start = time.perf_counter()
        cli.wait_for_supernodes(
            env,
            local.CONNECTION,
            node_ids[:1],
            ONLINE_TIMEOUT,
            procs,
            ["superlink", "good"],
        )
        print(f"registered node online after {time.perf_counter() - start:.1f} s")
        yield SecureLink(procs, address, env, creds, other, node_ids, homes, log_dir)
    finally:
        procs.stop_all()


def _node_status(link: SecureLink) -> dict[str, str]:
    """node id -> status, as ``flwr supernode list`` reports them."""
    nodes = cli.list_supernodes(link.env, local.CONNECTION)
    return {str(n["node-id"]): str(n["status"]) for n in nodes}


def _run_refused_node(
    link: SecureLink, name: str, **tls: Any
) -> tuple[int, str, float]:
    """Start a SuperNode, wait (bounded) for it to exit; return code, log, seconds.

    Fails at once if the node joins instead ("SuperNode ID: ..." in its log).
    """
    proc = link.procs.start(
        name,
        commands.supernode_argv(link.address, processes.free_port(), **tls),
        link.procs.env(link.homes / name),
    )
    path = link.log_dir / f"{name}.log"
    start = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - start < REFUSAL_TIMEOUT:
        log = path.read_text(errors="replace")
        assert "SuperNode ID:" not in log, f"{name} joined the federation:\n{log}"
        time.sleep(0.5)
    seconds = time.perf_counter() - start
    log = path.read_text(errors="replace")
    code = proc.poll()
    assert code is not None, f"{name} still running after {REFUSAL_TIMEOUT} s:\n{log}"
    return code, log, seconds


@pytest.mark.slow
def test_registered_node_with_the_ca_joins(secure_link: SecureLink) -> None:
    status = _node_status(secure_link)
    good, spare = (str(n) for n in secure_link.node_ids)
    assert status == {good: "online", spare: "registered"}
    log = (secure_link.log_dir / "good.log").read_text(errors="replace")
    assert f"SuperNode ID: {good}" in log  # the id bound to its key at registration
    link_log = (secure_link.log_dir / "superlink.log").read_text(errors="replace")
    assert "Uvicorn running on https://127.0.0.1:" in link_log


@pytest.mark.slow
@pytest.mark.parametrize("trust", ["no-root-certificates", "other-ca"])
def test_node_without_the_ca_cannot_join(secure_link: SecureLink, trust: str) -> None:
    # Prepare: node-1's key IS registered; only the trust anchor is wrong.
    ca = None if trust == "no-root-certificates" else secure_link.other.ca_cert
    spare = str(secure_link.node_ids[1])

    # Execute
    code, log, seconds = _run_refused_node(
        secure_link,
        f"no-ca-{trust}",
        root_certificates=ca,
        auth_key=secure_link.creds.node_keys[1].private,
    )
    print(f"{trust}: refused in {seconds:.1f} s")

    # Assert: the TLS handshake failed on the node's side, so it never reached
    # the SuperLink's API; its registered id never came online.
    assert code != 0, log
    assert "SSL/TLS handshake error detected" in log, log
    assert "CERTIFICATE_VERIFY_FAILED" in log, log
    assert "SuperNode ID:" not in log
    status = _node_status(secure_link)
    assert status[spare] == "registered", status
    assert status[str(secure_link.node_ids[0])] == "online", status  # control
    link_log = (secure_link.log_dir / "superlink.log").read_text(errors="replace")
    assert f"Activated node_id={spare}" not in link_log


@pytest.mark.slow
@pytest.mark.parametrize("key", ["unregistered-key", "no-key"])
def test_node_with_an_unregistered_key_is_refused(
    secure_link: SecureLink, key: str
) -> None:
    # Prepare: the right CA; a key the SuperLink has never seen, or none at all
    # (the node then makes one up and asks to register itself).
    auth_key = None if key == "no-key" else secure_link.other.node_keys[0].private
    before = _node_status(secure_link)

    # Execute
    code, log, seconds = _run_refused_node(
        secure_link,
        f"refused-{key}",
        root_certificates=secure_link.creds.ca_cert,
        auth_key=auth_key,
    )
    print(f"{key}: refused in {seconds:.1f} s")

    # Assert: TLS worked (no handshake error); the SuperLink refused the identity.
    assert code != 0, log
    assert "SSL/TLS handshake error" not in log
    assert "Failed to initialize the connection to the SuperLink" in log, log
    link_log = (secure_link.log_dir / "superlink.log").read_text(errors="replace")
    if key == "unregistered-key":
        assert "[code: 2004] Failed to activate SuperNode." in log, log
        assert "No SuperNode found with the given public key" in link_log
    else:
        assert "SuperNode authentication is enabled" in log, log
        assert "[/v1/fleet/register-node][ApiError:2001]" in link_log
    assert "SuperNode ID:" not in log
    # No node was added or brought online: the list is what it was.
    assert _node_status(secure_link) == before
    assert before[str(secure_link.node_ids[0])] == "online"


PROBE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "nodeprobe"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "lora-flwr-tests"

[tool.flwr.app.components]
serverapp = "nodeprobe:app"
clientapp = "nodeprobe:client"

[tool.flwr.app.config]
out = ""
"""

PROBE_APP = '''\
"""Write what the ServerApp's Grid says about each node to run_config["out"]."""

import json

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = [
        {"node_id": n.node_id, "name": n.name, "public_key": n.public_key.decode()}
        for n in grid.get_nodes()
    ]
    with open(str(context.run_config["out"]), "w") as fh:
        json.dump({"grid": type(grid).__name__, "nodes": nodes}, fh)
'''


@pytest.mark.slow
def test_serverapp_sees_each_nodes_registered_key(
    secure_link: SecureLink, tmp_path: Path
) -> None:
    """The fact the partition-binding design in docs/DEPLOYMENT.md rests on.

    In Flower 1.42 a ServerApp's ``grid.get_nodes()`` returns, per online node,
    the public key registered for it (and the ``--name`` given at registration),
    so a server can map a key fingerprint to a partition instead of trusting the
    partition a node declares.
    """
    from cryptography.hazmat.primitives import serialization

    # Prepare: a minimal Flower app whose ServerApp only reports the nodes.
    app_dir = tmp_path / "nodeprobe"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (app_dir / "nodeprobe.py").write_text(PROBE_APP)
    out = tmp_path / "nodes_seen.json"
    run_config = tmp_path / "probe.toml"
    run_config.write_text(f"out = {json.dumps(str(out))}\n")

    # Execute
    start = time.perf_counter()
    secure_link.procs.start(
        "flwr-run",
        [
            processes.binary("flwr"),
            "run",
            str(app_dir),
            local.CONNECTION,
            "--run-config",
            str(run_config),
            "--stream",
        ],
        secure_link.env,
        cwd=app_dir,
    )
    run = cli.wait_for_run(
        secure_link.env, local.CONNECTION, 600, secure_link.procs, ["superlink"]
    )
    print(f"probe run: {time.perf_counter() - start:.1f} s")

    # Assert: exactly the online node, with the key registered for it.
    assert run["status"] == "finished:completed", run
    seen = json.loads(out.read_text())
    assert seen["grid"] == "HttpGrid"
    key = secure_link.creds.node_keys[0].public
    pem = (
        serialization.load_ssh_public_key(key.read_bytes())
        .public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        .decode()
    )
    assert seen["nodes"] == [
        {"node_id": secure_link.node_ids[0], "name": "node-0", "public_key": pem}
    ]
