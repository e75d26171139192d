"""Run a federated LoRA experiment in one process (Flower simulation, Ray).

    python run_simulation.py [--config configs/default.toml] [--set key=value ...]
    python -m lora_flwr.simulation ...   (the same, from the installed package)

Prints a per-round table and writes ``<output_dir>/<name>/``: the resolved config,
``history.json`` / ``history.csv``, the final adapter (PEFT directory, plus the
merged base delta for rules that fold), per-round checkpoints and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lora_flwr.aggregation import get_rule
from lora_flwr.config import (
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
    unusual_values,
)
from lora_flwr.lifecycle import on_process_start
from lora_flwr.privacy import require_accountant
from lora_flwr.rundir import (
    RunDirError,
    RunOutputError,
    check_run_dir,
    claim_run_dir,
    has_results,
    release_run_dir,
)
from lora_flwr.server.guards import RunAborted


def run(cfg: ExperimentConfig, *, verbose: bool = False) -> Path:
    """Run ``cfg`` in the Flower simulation engine and return the run directory.

    The run folder is claimed (locked, cleared on overwrite, ``config.toml``
    written) before Ray starts, and released when the run ends; a run that
    completed no round leaves nothing there (:func:`lora_flwr.rundir.release_run_dir`).

    Raises
    ------
    RunDirError
        If the folder cannot be claimed (another live run holds it, it cannot be
        written); nothing has started then.
    RunOutputError
        If a result could not be written mid-run (what was saved is intact).
    """
    # Quiet Ray before it is imported; users asked for a table, not Ray's banner.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from lora_flwr.fl.engine import quiet_flower, run_engine
    from lora_flwr.fl.server_app import run_dir_for
    from lora_flwr.results import read_history

    quiet_flower(verbose)
    run_dir = run_dir_for(cfg)
    claim_run_dir(run_dir, cfg.on_existing, cfg.to_toml())
    start = time.perf_counter()
    try:
        _ensure_watchdog()
        on_process_start("server")  # the server's evaluation: freed pages go back
        run_engine(cfg, run_dir, verbose=verbose)
    finally:
        release_run_dir(run_dir)
    seconds = time.perf_counter() - start
    history = read_history(run_dir)
    rounds = [r for r in history if r.get("round", 0) > 0]
    if len(rounds) < cfg.fed.num_rounds:
        raise RuntimeError(
            f"The simulation stopped after {len(rounds)} of {cfg.fed.num_rounds} "
            f"rounds; see the log above and {run_dir}"
        )
    print(f"\nfinished {cfg.fed.num_rounds} rounds in {seconds:.1f} s -> {run_dir}")
    return run_dir


_WATCHDOG: list[object] = []


def _ensure_watchdog() -> None:
    """Start, once per process, the watchdog that stops Ray's helpers after us."""
    if not _WATCHDOG:
        from lora_flwr.watchdog import start_watchdog

        _WATCHDOG.append(start_watchdog())


def main(
    argv: Sequence[str] | None = None,
    *,
    run_fn: Callable[..., object] | None = None,
    hard_exit: bool = True,
) -> int:
    """Command-line entry point; ``run_fn`` replaces :func:`run` (tests).

    On SIGINT/SIGTERM the process ends at once with exit code 130 (``hard_exit``;
    tests turn it off to get the code returned).
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg, run_dir = _prepare(args)
    except (ValueError, FileNotFoundError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("lora_flwr").setLevel(logging.INFO)
    # SIGTERM (kill, a scheduler) ends the run like Ctrl-C: Ray is shut down, and
    # the rounds already checkpointed can be resumed.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        (run_fn or run)(cfg, verbose=args.verbose)
    except RunDirError as exc:  # the folder's claim, before Ray starts
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunAborted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RunOutputError as exc:
        print(f"error: {_output_failure(exc, run_dir)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):  # Ray's own SIGTERM handler exits
        print(
            f"interrupted; continue with: python run_simulation.py --resume {run_dir}",
            file=sys.stderr,
        )
        if not hard_exit:
            return 130
        # The engine's threads still use Ray: shutting it down or exiting through
        # the interpreter under them aborts the process. Exit at once instead; Ray's
        # own processes stop when their driver is gone, every result file is
        # written atomically, and the run lock dies with the process.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _parser() -> argparse.ArgumentParser:
    """Return the command line's parser: the config options and three flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="show Flower/Ray logs")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run with the same name",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last complete round (its saved "
        "config is used)",
    )
    return parser


def _prepare(args: argparse.Namespace) -> tuple[ExperimentConfig, Path]:
    """Resolve and check the run's config before Ray starts; return it and its dir.

    Raises
    ------
    ValueError, FileNotFoundError, RunDirError
        For a config, data, model or run directory that cannot run.
    """
    if args.resume is not None:
        cfg = _resume_config(args.resume, args.overrides, args.overwrite)
    else:
        cfg = config_from_arguments(args)
    if args.overwrite:
        cfg = dataclasses.replace(cfg, on_existing="overwrite")
    # The rule is built inside the ServerApp; check it (and DP's accountant)
    # before Ray starts.
    get_rule(cfg.fed.aggregation).check_config(cfg)
    if cfg.privacy.noise_multiplier > 0:
        require_accountant()
    run_dir = Path(cfg.output_dir) / cfg.name
    check_run_dir(run_dir, cfg.on_existing)
    if cfg.on_existing == "resume":
        from lora_flwr.fl.checkpoint import resume_checkpoint

        point = resume_checkpoint(cfg, run_dir)
        done = point.counters["round"] if point is not None else 0
        print(f"resuming {run_dir} after round {done}", file=sys.stderr)
    # Data, labels, model and targets: one line and exit 2, before Ray. (Imported
    # here: torch and transformers would slow the schema errors above.)
    from lora_flwr.preflight import preflight

    preflight(cfg)
    # Values the schema accepts but no usual run has: said once, then the run goes on.
    for line in unusual_values(cfg):
        print(f"warning: {line}", file=sys.stderr)
    return cfg, run_dir


def _output_failure(exc: RunOutputError, run_dir: Path) -> str:
    """Say what could not be written and the command that continues the run."""
    if has_results(run_dir):
        return (
            f"{exc.reason}; the rounds saved before it are intact: free space or "
            "fix the permissions, then continue with: python run_simulation.py "
            f"--resume {run_dir}"
        )
    return (
        f"{exc.reason} before any round was complete (nothing was kept): free "
        "space or fix the permissions, then run the same command again"
    )


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _resume_config(
    run_dir: Path, overrides: Sequence[str], overwrite: bool
) -> ExperimentConfig:
    """Return the saved config of ``run_dir``, set to resume into that directory.

    Raises
    ------
    ValueError
        If overrides or --overwrite are given with --resume.
    FileNotFoundError
        If ``run_dir`` holds no config.toml.
    """
    if overrides or overwrite:
        raise ValueError(
            "--resume continues a run exactly as it was configured; drop --set and "
            "--overwrite"
        )
    path = run_dir / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume {run_dir}: it holds no config.toml")
    cfg = ExperimentConfig.from_toml(path)
    return dataclasses.replace(
        cfg,
        output_dir=str(run_dir.parent),
        name=run_dir.name,
        on_existing="resume",
    )


if __name__ == "__main__":
    raise SystemExit(main())
