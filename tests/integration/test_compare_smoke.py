"""python -m lora_flwr.compare end to end on configs/smoke.toml (real Ray runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_writes_tables_and_plots_and_reuses_finished_runs(
    tmp_path: Path,
) -> None:
    # Prepare
    out = tmp_path / "docs" / "RESULTS.md"
    out.parent.mkdir()
    out.write_text("# Results\n\nHand-written intro.\n")
    cmd = [
        sys.executable,
        "-m",
        "lora_flwr.compare",
        "--config",
        str(REPO / "configs" / "smoke.toml"),
        "--seeds",
        "1",
        "--rules",
        "fedit,flora",
        "--tiers",
        "2,4",
        "--skew",
        "0.5",
        "--ref-steps",
        "10",
        "--work",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]

    # Execute: twice; the second run reuses every finished run.
    first = subprocess.run(cmd, capture_output=True, text=True, check=False)
    second = subprocess.run(cmd, capture_output=True, text=True, check=False)

    # Assert
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    # 2 rules + 1 tier rule + 2 rules on the label-skew split + 1 reference
    assert second.stdout.count("[compare] reuse") == 6
    text = out.read_text()
    assert text.startswith("# Results\n\nHand-written intro.\n")
    assert "### homogeneous: all rules, every client at r=4" in text
    assert "### tiers: rank tiers 2,4" in text
    assert "### alpha0.5: label skew, Dirichlet alpha=0.5 over labels" in text
    rows = [line for line in text.splitlines() if line.startswith("| f")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| fedit",
        "| flora",
        "| flora",
        "| fedit",
        "| flora",
    ]
    assert "Centralised LoRA reference (same training pool, 10 steps" in text
    for name in (
        "homogeneous-round",
        "homogeneous-bytes",
        "tiers-round",
        "tiers-bytes",
        "alpha0.5-round",
        "alpha0.5-bytes",
    ):
        png = out.parent / "results" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
