"""The experiment as a launched run receives it: resolved, and as a flat TOML file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lora_flwr.config import ExperimentConfig
from lora_flwr.deploy.errors import BadInput, DeployError
from lora_flwr.rundir import LAUNCH_DIR, RunDirError, check_run_dir, refuse_symlink

# What a Flower run config (and the CLI's config.toml here) holds.
Scalar = bool | int | float | str


def resolve_config(
    config: str | Path, overrides: Sequence[str] = (), output_dir: str | None = None
) -> ExperimentConfig:
    """Load ``config`` + ``--set`` overrides, with an absolute output_dir.

    The ServerApp runs in another process with another working directory, so a
    relative ``output_dir`` would land somewhere unexpected.

    Raises
    ------
    BadInput
        For a config file or override the schema refuses.
    """
    try:
        cfg = ExperimentConfig.from_toml(config).with_overrides(list(overrides))
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise BadInput(str(exc)) from None
    out = Path(output_dir if output_dir is not None else cfg.output_dir)
    if not out.is_absolute():
        out = Path.cwd() / out
    return cfg.with_overrides([f"output_dir={out.resolve()}"])


def launch_dir(cfg: ExperimentConfig, stale: Sequence[str]) -> tuple[Path, Path]:
    """``<output_dir>/<name>`` and its launch folder, cleared of ``stale`` records.

    Only the launcher's own records of an earlier attempt go: the results
    (history.json included) belong to the ServerApp, which keeps, resumes or
    clears them as ``on_existing`` says.

    Raises
    ------
    DeployError
        If the run folder is a symbolic link (nothing is written into its target).
    """
    run_dir = Path(cfg.output_dir) / str(cfg.name)
    try:
        refuse_symlink(run_dir)
    except RunDirError as exc:
        raise DeployError(str(exc)) from None
    deploy_dir = run_dir / LAUNCH_DIR
    deploy_dir.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (deploy_dir / name).unlink(missing_ok=True)
    return run_dir, deploy_dir


def check_launch(cfg: ExperimentConfig) -> None:
    """Refuse, before any process starts, a run the ServerApp would refuse.

    The checks ``run_simulation.py`` makes before Ray: the run folder (usable as
    ``on_existing`` asks, not in use by a live run), the rule's settings, DP's
    accountant, a resume's config (:func:`check_resume`), then data, labels,
    model and targets (:func:`lora_flwr.preflight.preflight`). Touches nothing.

    Raises
    ------
    BadInput
        With the one-line reason.
    """
    # Imported here: torch and transformers are not needed to parse the options.
    from lora_flwr.aggregation import get_rule
    from lora_flwr.preflight import preflight
    from lora_flwr.privacy import require_accountant

    try:
        check_run_dir(Path(cfg.output_dir) / cfg.name, cfg.on_existing)
        get_rule(cfg.fed.aggregation).check_config(cfg)
        if cfg.privacy.noise_multiplier > 0:
            require_accountant()
        check_resume(cfg)
        preflight(cfg)
    except (ValueError, FileNotFoundError, RunDirError) as exc:
        raise BadInput(" ".join(str(exc).splitlines())) from None


def check_resume(cfg: ExperimentConfig) -> None:
    """Refuse, before any process starts, a resume the ServerApp would refuse.

    The ServerApp checks again when it starts; this only fails sooner, and
    touches nothing.

    Raises
    ------
    ValueError
        If ``cfg`` resumes a run it cannot continue: another config than the run
        started with (naming each key that differs), a finished run, or a rule
        that cannot resume (:func:`lora_flwr.fl.checkpoint.resume_checkpoint`).
    """
    if cfg.on_existing != "resume":
        return
    # Imported here: safetensors and the rules are not needed for a fresh run.
    from lora_flwr.fl.checkpoint import resume_checkpoint

    resume_checkpoint(cfg, Path(cfg.output_dir) / cfg.name)


def with_supernodes(
    cfg: ExperimentConfig, num_supernodes: int | None
) -> tuple[ExperimentConfig, int]:
    """``cfg`` with one client per SuperNode, and that number.

    ``num_supernodes`` None (or 0) keeps ``fed.num_clients``.
    """
    num = num_supernodes or cfg.fed.num_clients
    if num != cfg.fed.num_clients:
        cfg = cfg.with_overrides([f"fed.num_clients={num}"])
    return cfg, num


def toml_value(value: Scalar) -> str:
    """One TOML scalar (run-config values are bool/int/float/str only)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_run_config(cfg: ExperimentConfig, path: Path) -> Path:
    """Write the FULL experiment as a flat run-config TOML (dotted keys).

    ``flwr run --run-config FILE`` overrides ``[tool.flwr.app.config]`` (which is
    configs/default.toml) key by key and rejects TOML lists, so the file carries
    every key, with sequences as comma-separated strings: the run then uses
    exactly the experiment ``ExperimentConfig.from_toml`` reads.
    """
    lines = [f"{key} = {toml_value(v)}" for key, v in cfg.to_flat().items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
