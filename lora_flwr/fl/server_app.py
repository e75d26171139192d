"""ServerApp: builds the FedLoRA strategy, centralised evaluation and run outputs.

``app`` serves ``flwr run`` (config from ``run_config``); ``make_server_app(cfg)``
serves the in-process simulation, whose apps get an empty run_config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.common import Context
from flwr.server import (
    Grid,
    LegacyContext,
    ServerApp,
    ServerAppComponents,
    ServerConfig,
)
from flwr.server.compat import start_grid
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from lora_flwr.aggregation import get_rule
from lora_flwr.aggregation.state import Arrays
from lora_flwr.config import ExperimentConfig, FlatValue, SecAggConfig, unusual_values
from lora_flwr.experiment import get_workspace, heldout_data
from lora_flwr.fl.checkpoint import Checkpoint, resume_checkpoint, save_checkpoint
from lora_flwr.fl.compat import one_line_failures, prompt_grid
from lora_flwr.fl.directory import PartitionDirectory
from lora_flwr.fl.runner import layout_of
from lora_flwr.fl.strategy import FedLoRA
from lora_flwr.lifecycle import after_round
from lora_flwr.lora.io import (
    BASE_DELTA_NAME,
    PEFT_TASK_TYPES,
    save_base_delta,
    save_peft,
)
from lora_flwr.models import base_model_source
from lora_flwr.preflight import preflight
from lora_flwr.privacy import require_accountant
from lora_flwr.readout import print_readout
from lora_flwr.results import (
    format_header,
    format_row,
    plot_history,
    read_history,
    write_history,
)
from lora_flwr.rundir import (
    RunDirError,
    RunOutputError,
    claim_run_dir,
    has_results,
    release_run_dir,
)
from lora_flwr.server.evaluation import RoundView
from lora_flwr.server.guards import RunAborted

logger = logging.getLogger(__name__)

SECAGG_LEVELS = 2**22  # quantisation levels over [-clip, clip]
SECAGG_MODULUS = 2**32  # masked sums live modulo this


def run_dir_for(cfg: ExperimentConfig) -> Path:
    """Where a run writes its outputs: ``<output_dir>/<name>``."""
    return Path(cfg.output_dir) / cfg.name


# What the centralised evaluation reports to the round record.
_SERVER_METRICS = ("loss", "accuracy", "perplexity")


def build_strategy(
    cfg: ExperimentConfig,
    run_dir: Path | None = None,
    partitions: PartitionDirectory | None = None,
) -> FedLoRA:
    """Build the strategy for ``cfg``, wired to centralised evaluation and run outputs.

    The server process loads the base model once: to build the seeded initial
    adapter, to evaluate the global adapter (on top of the rule's base-weight
    delta, if any) and to save it as a PEFT directory. ``partitions`` is the
    simulation engine's node -> partition map (in-process simulation only).
    """
    out = run_dir if run_dir is not None else run_dir_for(cfg)
    resume, history = _claim(cfg, out)
    ws = get_workspace(cfg)
    ws.reset_adapter()
    layout = layout_of(ws.adapter)
    test = heldout_data(ws, cfg)
    task_type = PEFT_TASK_TYPES.get(ws.bundle.task)
    # What PEFT and transformers load the base by, not the project's short name.
    base_name = base_model_source(cfg.model.name)

    def load(arrays: Arrays, base_delta: Arrays) -> None:
        ws.adapter.set_base_delta(base_delta or None)
        ws.adapter.set_named_weights(arrays)

    def evaluate_fn(
        server_round: int, arrays: Arrays, base_delta: Arrays
    ) -> dict[str, float]:
        load(arrays, base_delta)
        metrics = ws.trainer.evaluate(test, progress=False)
        after_round("server")  # the evaluation's activations: give pages back
        return {k: v for k, v in metrics.items() if k in _SERVER_METRICS}

    def save(path: Path, strategy: RoundView) -> None:
        base_delta = dict(strategy.state.base_delta)
        load(strategy.global_arrays(), base_delta)
        save_peft(
            ws.adapter, path, base_model_name_or_path=base_name, task_type=task_type
        )
        if base_delta:
            # Rules that merge (flora, fedex) keep part of the model in the base
            # weights: the adapter alone is not the model without this file.
            save_base_delta(base_delta, path / BASE_DELTA_NAME)

    shape = _table_shape(cfg, ws.task)

    def on_round_end(record: dict[str, Any], strategy: RoundView) -> None:
        history = strategy.history
        if len(history) == 1:
            print(format_header(shape), flush=True)
        print(format_row(record, shape), flush=True)
        rnd = int(record["round"])
        try:
            write_history(history, out)
            if record.get("aborted"):
                return  # no adapter is saved as the result of a run that failed
            if rnd > 0:
                save(out / "checkpoints" / f"round-{rnd:03d}", strategy)
            if rnd == cfg.fed.num_rounds:
                save(out / "adapter", strategy)  # loads the global adapter too
                plot_history(history, out)
                print_readout(ws, cfg, out)  # eval.benchmark, eval.samples
            if rnd > 0:
                # Last: a resume restarts after the newest round whose state is
                # here, and drops any later history row.
                save_checkpoint(out, rnd, strategy.state, strategy.counters(rnd), cfg)
        except OSError as exc:  # a full disk, a folder made read-only mid-run
            raise RunOutputError(out, exc, out) from None

    return FedLoRA(
        cfg=cfg,
        layout=layout,
        initial=ws.initial,
        evaluate_fn=evaluate_fn,
        on_round_end=on_round_end,
        resume=resume,
        history=history,
        partitions=partitions,
    )


def _claim(
    cfg: ExperimentConfig, out: Path
) -> tuple[Checkpoint | None, list[dict[str, Any]]]:
    """Claim ``out`` for this run and return where it resumes (None: from round 0).

    Refuses a folder with results (unless overwrite) or in use by a live run; a
    resume continues only the run's own config (refused otherwise) and keeps the
    config.toml its first attempt wrote.
    """
    claim_run_dir(out, cfg.on_existing, cfg.to_toml())
    return _resume_point(cfg, out)


def _resume_point(
    cfg: ExperimentConfig, run_dir: Path
) -> tuple[Checkpoint | None, list[dict[str, Any]]]:
    """Return the checkpoint and history to continue from (None: start anew).

    Raises
    ------
    ValueError
        As :func:`~lora_flwr.fl.checkpoint.resume_checkpoint`: among others, when
        ``cfg`` is not the config the run started with.
    """
    point = resume_checkpoint(cfg, run_dir) if cfg.on_existing == "resume" else None
    if point is None:
        return None, []
    return point, read_history(run_dir)


def _table_shape(cfg: ExperimentConfig, task: str) -> list[dict[str, Any]]:
    """Build a template record fixing the table's columns before any round is known."""
    kind = "personal" if get_rule(cfg.fed.aggregation).personalized else "test"
    task_key = f"{kind}_accuracy" if task == "seq_cls" else f"{kind}_perplexity"
    row: dict[str, Any] = {
        "round": 0,
        "train_loss": 0.0,
        f"{kind}_loss": 0.0,
        task_key: 0.0,
        "agg_error": 0.0,
        "fit_ok": 0,
        "bytes_up": 0,
        "bytes_down": 0,
        "round_seconds": 0.0,
    }
    if cfg.head.mode == "local" and task == "seq_cls":
        # The global adapter with the seeded head on the held-out split, and each
        # client's own head on its local split.
        row["personal_accuracy"] = 0.0
    elif cfg.eval.fraction > 0:
        row["fed_loss"] = 0.0
    return [row]


class RunFailed(RuntimeError):
    """A run under ``flwr run`` or a deployment that cannot go on, in one line.

    Flower logs it without its traceback (:func:`lora_flwr.fl.compat.one_line_failures`)
    and marks the run ``finished:failed`` with this message as its details.
    """


# What ends a run for a reason the user can act on: one line, no traceback.
USER_FAILURES = (ValueError, FileNotFoundError, RunDirError, RunOutputError, RunAborted)


def config_from_run_config(run_config: Mapping[str, FlatValue]) -> ExperimentConfig:
    """Return the experiment of a ``flwr run`` or a deployment, checked.

    The same checks ``run_simulation.py`` makes before Ray starts (the rule's
    settings, DP's accountant, data, labels, model, targets), made before the run
    folder is claimed: a bad input writes nothing.

    Raises
    ------
    ValueError, FileNotFoundError
        As :func:`lora_flwr.preflight.preflight`.
    """
    exp = ExperimentConfig.from_flat(run_config)
    for line in unusual_values(exp):
        logger.warning("%s", line)
    get_rule(exp.fed.aggregation).check_config(exp)
    if exp.privacy.noise_multiplier > 0:
        require_accountant()
    preflight(exp)
    return exp


def make_server_fn(
    cfg: ExperimentConfig | None = None,
    run_dir: Path | None = None,
    partitions: PartitionDirectory | None = None,
) -> Callable[[Context], ServerAppComponents]:
    """Build ``server_fn``; without ``cfg`` the config comes from ``run_config``.

    It claims the run folder; whoever calls it releases it
    (:func:`lora_flwr.rundir.release_run_dir`).
    """

    def server_fn(context: Context) -> ServerAppComponents:
        exp = cfg if cfg is not None else config_from_run_config(context.run_config)
        strategy = build_strategy(exp, run_dir, partitions)
        # After a resume Flower counts rounds from 1 again; the strategy adds the
        # rounds already done.
        rounds = exp.fed.num_rounds - strategy.offset
        return ServerAppComponents(
            strategy=strategy, config=ServerConfig(num_rounds=rounds)
        )

    return server_fn


def run_failed(exc: BaseException, run_dir: Path | None) -> RunFailed:
    """Say in one line why a ``flwr run`` / deployment run failed and what to do."""
    if isinstance(exc, RunOutputError):
        again = (
            'run again with on_existing = "resume"'
            if run_dir is not None and has_results(run_dir)
            else "run again (no round was complete, nothing was kept)"
        )
        text = f"{exc.reason}; free space or fix the permissions, then {again}"
    else:
        text = str(exc)
    return RunFailed(" ".join(text.splitlines()))


def secagg_workflow(secagg: SecAggConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with the quantisation of ``secagg``.

    Values are clipped to ``+-secagg.clip`` and quantised to ``2**22`` levels
    (Flower's default), so one value's error is at most ``2 clip / 2**22`` per
    client before averaging; the masks live modulo ``2**32``.
    """
    return SecAggPlusWorkflow(
        num_shares=secagg.shares,
        reconstruction_threshold=secagg.threshold,
        max_weight=secagg.max_weight,
        clipping_range=secagg.clip,
        quantization_range=SECAGG_LEVELS,
        modulus_range=SECAGG_MODULUS,
    )


def make_server_app(
    cfg: ExperimentConfig | None = None,
    run_dir: Path | None = None,
    partitions: PartitionDirectory | None = None,
) -> ServerApp:
    """Build a ServerApp for ``cfg`` (or for the run_config when ``cfg`` is None).

    A plain run is Flower's legacy server loop over the strategy; with
    ``secagg.enabled`` the fit rounds go through Flower's SecAgg+ workflow instead,
    which hands the strategy only the unmasked weighted mean.
    """
    app = ServerApp()

    def serve(grid: Grid, context: Context, exp: ExperimentConfig) -> None:
        strategy = build_strategy(exp, run_dir, partitions)  # claims the folder
        # After a resume Flower counts rounds from 1 again; the strategy adds the
        # rounds already done.
        config = ServerConfig(num_rounds=exp.fed.num_rounds - strategy.offset)
        if not exp.secagg.enabled:
            start_grid(grid=grid, config=config, strategy=strategy)
            return
        legacy = LegacyContext(context=context, config=config, strategy=strategy)
        DefaultWorkflow(fit_workflow=secagg_workflow(exp.secagg))(grid, legacy)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        grid = prompt_grid(grid)  # a deployment's grid: collect replies promptly
        if cfg is not None:  # in process: run_simulation.py checks and reports
            try:
                serve(grid, context, cfg)
            finally:
                release_run_dir(run_dir if run_dir is not None else run_dir_for(cfg))
            return
        one_line_failures(RunFailed)
        out: Path | None = None
        try:
            exp = config_from_run_config(context.run_config)
            out = run_dir if run_dir is not None else run_dir_for(exp)
            serve(grid, context, exp)
        except USER_FAILURES as exc:
            if out is not None:
                release_run_dir(out)  # first: what it leaves decides the advice
            raise run_failed(exc, out) from None
        finally:
            if out is not None:
                release_run_dir(out)

    return app


app = make_server_app()
