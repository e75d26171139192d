"""scripts/deploy_local.py gives every SuperNode its share of the cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import deploy_local  # noqa: E402


def test_nodes_share_the_cores_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert deploy_local.node_config(1, 4, None) == (
        "partition-id=1 num-partitions=4 num-threads=2"
    )
    # More nodes than cores: one thread each, never zero.
    assert deploy_local.node_config(0, 16, None).endswith(" num-threads=1")


def test_explicit_threads_and_torch_default() -> None:
    assert deploy_local.node_config(0, 2, 3).endswith(" num-threads=3")
    assert deploy_local.node_config(0, 2, 0) == "partition-id=0 num-partitions=2"


def test_negative_node_threads_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        deploy_local.parse_deploy_args(["--node-threads", "-1"])
    assert "--node-threads should be >= 0, not -1" in capsys.readouterr().err
