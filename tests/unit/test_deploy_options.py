"""lora_flwr.deploy.options and the launchers' exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_flwr.deploy.errors import DeployError
from lora_flwr.deploy.options import (
    DeployOptions,
    LaunchOptions,
    exit_code,
    parse_args,
    parse_deploy_args,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides_in_order() -> None:
    # Execute
    options = parse_args(["--set", "fed.num_rounds=3", "--set", "name=x"])

    # Assert
    assert options == LaunchOptions(
        config="configs/smoke.toml",
        overrides=("fed.num_rounds=3", "name=x"),
        output_dir=None,
        num_supernodes=None,
        timeout=1800.0,
        keep_homes=False,
    )


def test_deploy_options_carry_security_and_threads(tmp_path: Path) -> None:
    # Execute
    options = parse_deploy_args(
        ["--num-supernodes", "3", "--tls-dir", str(tmp_path), "--node-threads", "0"]
    )

    # Assert
    assert isinstance(options, DeployOptions)
    assert options.num_supernodes == 3
    assert options.tls_dir == tmp_path
    assert options.node_threads == 0
    assert (options.insecure, options.generate_certs) == (False, False)
    assert (options.server_cpus, options.node_cpus) == (None, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--insecure", "--tls-dir", "d"], "--insecure excludes --tls-dir"),
        (["--insecure", "--generate-certs"], "--insecure excludes --tls-dir"),
        (["--generate-certs"], "--generate-certs needs --tls-dir"),
    ],
)
def test_conflicting_security_options_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_deploy_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    def fail() -> None:
        raise DeployError("the SuperLink died")

    def interrupt() -> None:
        raise KeyboardInterrupt

    # Execute / Assert
    assert exit_code(lambda: None, (DeployError,)) == 0
    assert exit_code(fail, (DeployError,)) == 1
    assert "\nERROR: the SuperLink died\n" in capsys.readouterr().err
    assert exit_code(interrupt, (DeployError,)) == 130
    assert "every process started here was stopped" in capsys.readouterr().err
    with pytest.raises(DeployError):  # not a listed error: a traceback
        exit_code(fail, (ValueError,))


def test_the_deploy_script_refuses_too_few_supernodes_before_starting_any(
    tmp_path: Path,
) -> None:
    # Execute: smoke needs 2 available clients.
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "deploy_local.py"),
            "--config",
            str(REPO / "configs" / "smoke.toml"),
            "--num-supernodes",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )

    # Assert
    assert proc.returncode == 1, proc.stderr
    assert (
        "ERROR: --num-supernodes=1 < sampling.min_available=2: the run would "
        "wait forever"
    ) in proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []
