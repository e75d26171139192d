"""A local deployment gives every SuperNode its share of the cores, and pins them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

from lora_flwr.deploy.commands import node_config
from lora_flwr.deploy.cpus import format_cpus, parse_cpus
from lora_flwr.deploy.options import parse_deploy_args
from lora_flwr.deploy.processes import Processes


def test_nodes_share_the_cores_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert node_config(1, 4, None) == ("partition-id=1 num-partitions=4 num-threads=2")
    # More nodes than cores: one thread each, never zero.
    assert node_config(0, 16, None).endswith(" num-threads=1")


def test_pinned_nodes_share_their_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert node_config(0, 2, None, cores=1).endswith(" num-threads=1")
    assert node_config(0, 2, None, cores=4).endswith(" num-threads=2")
    assert node_config(0, 2, 3, cores=4).endswith(" num-threads=3")


def test_explicit_threads_and_torch_default() -> None:
    assert node_config(0, 2, 3).endswith(" num-threads=3")
    assert node_config(0, 2, 0) == "partition-id=0 num-partitions=2"


def test_negative_node_threads_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_deploy_args(["--node-threads", "-1"])
    assert "--node-threads should be >= 0, not -1" in capsys.readouterr().err


def test_cpu_lists_parse_like_taskset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert parse_cpus("0") == {0}
    assert parse_cpus("0-3") == {0, 1, 2, 3}
    assert parse_cpus("0,2-3, 5") == {0, 2, 3, 5}
    assert format_cpus({5, 0, 2}) == "0,2,5"


@pytest.mark.parametrize("text", ["", "a", "3-1", "-1", "1-", "0,,1"])
def test_malformed_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a CPU list"):
        parse_cpus(text)


def test_cpus_this_process_may_not_use_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(SystemExit):
        parse_deploy_args(["--server-cpus", "0", "--node-cpus", "1-2"])
    assert "CPUs 2 are not available here (this process may use 0,1)" in (
        capsys.readouterr().err
    )
    args = parse_deploy_args(["--server-cpus", "0", "--node-cpus", "1"])
    assert (args.server_cpus, args.node_cpus) == ({0}, {1})


def test_a_started_process_is_pinned_and_its_children_inherit(
    tmp_path: Path,
) -> None:
    # Prepare: a process that starts a child and prints both CPU sets.
    allowed = sorted(os.sched_getaffinity(0))
    cpu = frozenset(allowed[-1:])
    code = (
        "import os, subprocess, sys; print(sorted(os.sched_getaffinity(0))); "
        "sys.stdout.flush(); subprocess.run([sys.executable, '-c', "
        "'import os; print(sorted(os.sched_getaffinity(0)))'])"
    )
    procs = Processes(tmp_path, tag="pin-test")

    # Execute
    proc = procs.start(
        "pinned", [sys.executable, "-c", code], dict(os.environ), cpus=cpu
    )
    proc.wait(timeout=60)
    procs.stop_all()

    # Assert
    printed = (tmp_path / "pinned.log").read_text().splitlines()
    assert printed == [str(sorted(cpu))] * 2  # the process, then its child
