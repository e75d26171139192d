"""Runs never lose or mix results; bad values and failing runs never pass silently."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lora_flwr import simulation
from lora_flwr.config import ExperimentConfig
from lora_flwr.results import read_history, write_history
from lora_flwr.rundir import (
    RunDirError,
    check_run_dir,
    claim_run_dir,
    release_run_dir,
)
from lora_flwr.server.guards import RunAborted

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"


# ------------------------------------------------------------------ schema
@pytest.mark.parametrize(
    "key",
    [
        "train.lr",
        "lora.lora_alpha",
        "server_opt.lr",
        "data.dirichlet_alpha",
        "guards.weight_cap",
        "train.max_grad_norm",
    ],
)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_config_values_are_refused(key: str, value: float) -> None:
    flat = ExperimentConfig().to_flat()
    flat[key] = value
    with pytest.raises(ValueError, match=f"`{key}` should be a finite number"):
        ExperimentConfig.from_flat(flat)


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "", "/abs", "a b"])
def test_a_run_name_cannot_escape_output_dir(name: str) -> None:
    with pytest.raises(ValueError, match="`name` should be one folder name"):
        ExperimentConfig(name=name)


# ---------------------------------------------------------------- history
def test_history_json_is_strict_json_with_null_for_non_finite(tmp_path: Path) -> None:
    write_history(
        [{"round": 1, "test_loss": math.nan, "x": math.inf, "y": 0.5}], tmp_path
    )

    text = (tmp_path / "history.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert data == [{"round": 1, "test_loss": None, "x": None, "y": 0.5}]
    assert read_history(tmp_path) == data


# ----------------------------------------------------------------- run dir
def _results_in(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text("name = 'old'\n")
    (run_dir / "history.json").write_text("[]")
    (run_dir / "checkpoints" / "round-009").mkdir(parents=True)


def test_an_existing_run_is_refused_and_left_untouched(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _results_in(run_dir)

    with pytest.raises(RunDirError, match="already holds results; pass --overwrite"):
        claim_run_dir(run_dir, "refuse")

    assert (run_dir / "history.json").read_text() == "[]"
    assert (run_dir / "checkpoints" / "round-009").is_dir()


def test_overwrite_clears_stale_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _results_in(run_dir)

    claim_run_dir(run_dir, "overwrite")
    try:
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        release_run_dir(run_dir)


def test_overwrite_keeps_the_launch_scripts_logs(tmp_path: Path) -> None:
    # scripts/flwr_run_sim.py and deploy_local.py write deploy/ before the
    # ServerApp claims the directory, and deploy/runs.json after the run.
    run_dir = tmp_path / "run"
    _results_in(run_dir)
    (run_dir / "deploy").mkdir()
    (run_dir / "deploy" / "pids.json").write_text("{}")

    claim_run_dir(run_dir, "overwrite")
    try:
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "deploy"]
        assert (run_dir / "deploy" / "pids.json").read_text() == "{}"
    finally:
        release_run_dir(run_dir)


def test_resume_needs_an_existing_run(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="cannot resume"):
        check_run_dir(tmp_path / "nothing", "resume")


_HOLDER = """
import sys, time
from pathlib import Path
from lora_flwr.rundir import claim_run_dir
claim_run_dir(Path(sys.argv[1]), "refuse")
print("claimed", flush=True)
time.sleep(60)
"""


def test_a_live_run_locks_its_directory_and_a_killed_one_does_not(
    tmp_path: Path,
) -> None:
    # Prepare: another process claims the directory and stays alive.
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "claimed"

        # Execute / Assert: a second run is refused, naming the holder's pid.
        with pytest.raises(RunDirError, match=f"in use by a live run .*{holder.pid}"):
            check_run_dir(run_dir, "overwrite")
        with pytest.raises(RunDirError, match="in use by a live run"):
            claim_run_dir(run_dir, "overwrite")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()

    # After kill -9 the kernel dropped the lock: the directory can be taken over.
    claim_run_dir(run_dir, "overwrite")
    release_run_dir(run_dir)


# ------------------------------------------------------ command-line exits
@pytest.fixture
def main_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``simulation.main`` with a stand-in for the engine, run inside tmp_path."""
    monkeypatch.chdir(tmp_path)

    def call(argv: list[str], run_fn: Any = None) -> int:
        started: list[ExperimentConfig] = []

        def record(cfg: ExperimentConfig, verbose: bool = False) -> None:
            started.append(cfg)

        code = simulation.main(
            ["--config", str(SMOKE), *argv], run_fn=run_fn or record, hard_exit=False
        )
        call.started = started  # type: ignore[attr-defined]
        return code

    return call


def test_an_existing_run_dir_exits_2_before_the_engine_starts(
    main_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _results_in(tmp_path / "results" / "smoke")

    code = main_with([])

    assert code == 2 and main_with.started == []
    err = capsys.readouterr().err
    assert err.startswith("error: run directory results/smoke already holds results")
    assert (tmp_path / "results" / "smoke" / "history.json").read_text() == "[]"


def test_overwrite_flag_reaches_the_run(main_with: Any, tmp_path: Path) -> None:
    _results_in(tmp_path / "results" / "smoke")

    assert main_with(["--overwrite"]) == 0
    assert [c.on_existing for c in main_with.started] == ["overwrite"]


def test_a_run_that_aborts_exits_1_with_one_line(
    main_with: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    def abort(cfg: ExperimentConfig, verbose: bool = False) -> None:
        raise RunAborted(
            "run stopped at round 3: 3 consecutive rounds without an aggregate"
        )

    code = main_with([], run_fn=abort)

    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: run stopped at round 3: 3 consecutive rounds without an aggregate"
    ]


def test_infinite_lr_exits_2(
    main_with: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main_with(["--set", "train.lr=1e999"])  # parses as inf
    assert code == 2 and main_with.started == []
    assert "`train.lr` should be a finite number" in capsys.readouterr().err


# ------------------------------------------------ checks before the engine
def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "Dataset file not found"),
        ("all_one", "has a single class [1] in its training rows"),
        ("all_seven", "has 8 classes (labels up to 7) but `model.num_labels` is 2"),
        ("latin1", "is not valid UTF-8 (invalid start byte at byte 17)"),
        ("five_rows", "fewer than the 10 partitions"),
        ("targets", "`target_modules`=('nothing_here',) matches no module"),
        ("model_dir", "there is no directory"),
    ],
)
def test_bad_inputs_exit_2_before_the_engine_with_nothing_written(
    main_with: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    rows = "".join(f"review {i},{{}}\n" for i in range(10))
    files = {
        "all_one": b"text,label\n" + rows.format(*[1] * 10).encode(),
        "all_seven": b"text,label\n" + rows.format(*[7] * 10).encode(),
        "latin1": b"text,label\nhello \xff\xfe there,1\nnice,0\n",
    }
    overrides = {
        "missing": ["data.name=" + str(tmp_path / "none.csv")],
        "five_rows": [
            "data.name=synthetic",
            "data.max_examples=5",
            "fed.num_clients=10",
        ],
        "targets": ["lora.target_modules=nothing_here"],
        "model_dir": ["model.name=" + str(tmp_path / "no_model")],
    }
    if case in files:
        args = ["data.name=" + _write(tmp_path / f"{case}.csv", files[case])]
    else:
        args = overrides[case]
    argv = [x for item in args for x in ("--set", item)]

    code = main_with(argv)

    assert code == 2 and main_with.started == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert message in err[0]
    assert not (tmp_path / "results").exists()


def test_an_interrupted_run_exits_130_and_says_how_to_resume(
    main_with: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(cfg: ExperimentConfig, verbose: bool = False) -> None:
        raise KeyboardInterrupt

    code = main_with([], run_fn=interrupted)

    assert code == 130
    err = capsys.readouterr().err
    assert "interrupted; continue with: python run_simulation.py --resume" in err


# ------------------------------------------------------- values and messages
def test_an_absurd_learning_rate_exits_2_naming_key_and_value(
    main_with: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main_with(["--set", "train.lr=1e6"])

    assert code == 2 and main_with.started == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: `train.lr` should be in (0, 10]")
    assert "1000000.0" in err[0]


def test_an_unusual_learning_rate_runs_with_one_warning(
    main_with: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main_with(["--set", "train.lr=0.5"])

    assert code == 0 and len(main_with.started) == 1
    err = capsys.readouterr().err.strip().splitlines()
    warned = [line for line in err if "train.lr" in line]
    assert len(warned) == 1
    assert warned[0].startswith("warning: train.lr = 0.5 is far above")


def test_a_csv_without_its_label_column_names_the_column_and_the_fix(
    main_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = "".join(f"review {i},{i}\n" for i in range(20))
    path = _write(tmp_path / "reviews.csv", b"text,id\n" + rows.encode())

    code = main_with(["--set", f"data.name={path}"])  # tiny-bert: a classifier

    assert code == 2 and main_with.started == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    line = err[0]
    assert not line.startswith("error: `model.task`"), line
    assert "`data.label_column` = 'label' is not a column of " + path in line
    assert "['text', 'id']" in line
    assert "model.task = 'causal_lm'" in line


def test_a_data_file_error_does_not_echo_the_file(
    main_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\nbin:x:1:1::/:\n")
    link = tmp_path / "data.csv"
    link.symlink_to(secret)

    code = main_with(["--set", f"data.name={link}"])

    assert code == 2
    err = capsys.readouterr().err
    assert "root:x" not in err and "/bin/bash" not in err, err
    assert str(link) in err and "line 1" in err


def test_a_classifier_asked_of_unlabelled_data_says_why_it_has_no_labels(
    main_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = "".join(f"review {i},{i}\n" for i in range(20))
    path = _write(tmp_path / "reviews.csv", b"text,id\n" + rows.encode())

    code = main_with(["--set", f"data.name={path}", "--set", "model.task=seq_cls"])

    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        "error: `model.task` = 'seq_cls' needs labels but `data.label_column` = "
        f"'label' is not a column of {path} (its columns are ['text', 'id'])"
    )
