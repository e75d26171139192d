"""Export a finished run's model for use without lora_flwr.

::

    python -m lora_flwr.export --run results/<name> --merged <dir> [--dtype bfloat16]
    python -m lora_flwr.export --run results/<name> --peft <dir>

``--merged`` writes a plain Hugging Face model directory: the base weights with
``scaling * B @ A`` folded into every adapted layer (and, for the rules that merge,
FLoRA and FedEx-LoRA, the base-weight delta the run kept), the trained
``modules_to_save`` (e.g. the classifier head) in place, plus the tokenizer and
the generation config. ``transformers`` alone loads it:
``AutoModelForCausalLM.from_pretrained(dir)`` or
``AutoModelForSequenceClassification.from_pretrained(dir)``.

``--peft`` writes the run's adapter as a PEFT directory whose
``base_model_name_or_path`` is what PEFT and transformers resolve (see
:mod:`lora_flwr.models.source`), for ``peft.AutoPeftModelForCausalLM`` /
``AutoPeftModelForSequenceClassification``. Runs save ``<run>/adapter`` that way
already; this re-exports an adapter saved before they did (its config named the
base by the project's short name, e.g. ``"smollm2-135m"``).

Both read the run's ``config.toml`` (which model, which seed) and its
``adapter/`` directory, and write their directory as one unit
(:func:`lora_flwr.atomic.atomic_write_dir`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lora_flwr.atomic import atomic_write_dir
from lora_flwr.config import ExperimentConfig, ModelConfig, Task
from lora_flwr.lora import load_adapter, load_base_delta
from lora_flwr.lora.io import (
    BASE_DELTA_NAME,
    CONFIG_NAME,
    PEFT_TASK_TYPES,
    WEIGHTS_NAME,
)
from lora_flwr.models import base_model_source, load_model
from lora_flwr.models.source import TINY_MODELS
from lora_flwr.rundir import CONFIG_FILE

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # where a run saves its final global adapter
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_TASKS: dict[str, Task] = {v: k for k, v in PEFT_TASK_TYPES.items()}


class ExportError(ValueError):
    """A run that cannot be exported; the message is one line saying why."""


@dataclasses.dataclass(frozen=True)
class RunAdapter:
    """A finished run's config, its adapter directory and that adapter's config."""

    cfg: ExperimentConfig
    adapter_dir: Path
    peft_config: dict[str, Any]

    @property
    def has_base_delta(self) -> bool:
        """Whether the run's rule kept part of the update in the base weights."""
        return (self.adapter_dir / BASE_DELTA_NAME).is_file()


def read_run(run_dir: str | Path) -> RunAdapter:
    """Read a run directory's ``config.toml`` and ``adapter/adapter_config.json``.

    Raises
    ------
    ExportError
        If the directory, its config or its adapter is missing or unreadable.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"Run directory not found: {run}")
    config_file = run / CONFIG_FILE
    adapter_dir = run / ADAPTER_DIR
    if not config_file.is_file():
        raise ExportError(
            f"{run} is not a run directory: it has no {CONFIG_FILE} "
            "(pass the folder run_simulation.py or lora_flwr.centralized wrote)"
        )
    if not (adapter_dir / CONFIG_NAME).is_file():
        raise ExportError(
            f"{run} has no final adapter ({adapter_dir / CONFIG_NAME} is missing): "
            "the run has not finished its last round"
        )
    try:
        cfg = ExperimentConfig.from_toml(config_file)
        peft_config = json.loads((adapter_dir / CONFIG_NAME).read_text("utf-8"))
    except (ValueError, OSError) as exc:
        raise ExportError(f"Cannot read run {run}: {one_line(exc)}") from exc
    if not isinstance(peft_config, dict):
        raise ExportError(f"{adapter_dir / CONFIG_NAME} is not a JSON object")
    return RunAdapter(cfg, adapter_dir, peft_config)


def export_peft(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's adapter as a PEFT directory naming a resolvable base.

    The weights are copied unchanged; the config's ``base_model_name_or_path``
    becomes :func:`~lora_flwr.models.base_model_source` of the run's model and its
    ``task_type`` the run's. ``out`` may be the run's own ``adapter`` directory
    (it is read whole first, then replaced).

    Raises
    ------
    ExportError
        As :func:`read_run`, or when the weights file is missing.
    """
    run = read_run(run_dir)
    weights = run.adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise ExportError(f"Adapter weights not found: {weights}")
    name = run.cfg.model.name
    config = dict(run.peft_config)
    config["base_model_name_or_path"] = base_model_source(name)
    if config.get("task_type") is None:
        config["task_type"] = PEFT_TASK_TYPES.get(_run_task(run))
    files = {WEIGHTS_NAME: weights.read_bytes()}
    if run.has_base_delta:
        files[BASE_DELTA_NAME] = (run.adapter_dir / BASE_DELTA_NAME).read_bytes()
        logger.warning(
            "%s: the run's rule kept part of the model in the base weights (%s), "
            "which PEFT does not read; the adapter alone is not the trained model. "
            "Export it with --merged instead.",
            run.adapter_dir,
            BASE_DELTA_NAME,
        )
    if name in TINY_MODELS:
        logger.warning(
            "%r exists only in lora_flwr's code, so PEFT cannot load its base; "
            "export it with --merged instead.",
            name,
        )

    def write(tmp: Path) -> None:
        for file_name, data in files.items():
            (tmp / file_name).write_bytes(data)
        (tmp / CONFIG_NAME).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    target = Path(out)
    atomic_write_dir(target, write)
    return target


def export_merged(
    run_dir: str | Path, out: str | Path, *, dtype: str = "float32"
) -> Path:
    """Write the run's model with its adapter merged in, as a Hugging Face directory.

    Parameters
    ----------
    run_dir
        The run directory (``config.toml`` and ``adapter/``).
    out
        Directory to write: ``config.json``, ``model.safetensors``, the tokenizer
        files and ``generation_config.json`` (causal LMs). Replaced as one unit.
    dtype
        Weight dtype of the export: ``float32`` (as trained), ``bfloat16`` or
        ``float16``; the merge itself is done in float32.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    ExportError
        As :func:`read_run`; if the base model cannot be loaded (the message says
        what was tried); if the adapter does not fit it.
    """
    if dtype not in DTYPES:
        raise ExportError(f"`dtype` should be one of {sorted(DTYPES)}, not {dtype!r}")
    run = read_run(run_dir)
    cfg = run.cfg
    # transformers' classes, not the native ones: they have save_pretrained and
    # the module names are the same.
    model_cfg = dataclasses.replace(
        cfg.model, task=_run_task(run), implementation="transformers"
    )
    bundle = _load_base(model_cfg, cfg.seed)
    try:
        adapter = load_adapter(bundle.model, run.adapter_dir, seed=cfg.seed)
        if run.has_base_delta:
            adapter.set_base_delta(load_base_delta(run.adapter_dir / BASE_DELTA_NAME))
        model = adapter.merge_and_unload()
    except (ValueError, FileNotFoundError) as exc:
        raise ExportError(
            f"Cannot merge the adapter in {run.adapter_dir} into "
            f"{cfg.model.name!r}: {one_line(exc)}"
        ) from exc
    model.to(DTYPES[dtype])
    save_pretrained = getattr(model, "save_pretrained", None)
    save_tokenizer = getattr(bundle.tokenizer, "save_pretrained", None)
    assert callable(save_pretrained) and callable(save_tokenizer)  # transformers'

    def write(tmp: Path) -> None:
        save_pretrained(str(tmp))
        save_tokenizer(str(tmp))

    target = Path(out)
    atomic_write_dir(target, write)
    return target


def _load_base(model_cfg: ModelConfig, seed: int) -> Any:
    """Load the run's base model (seeded like the run: the same new head)."""
    try:
        return load_model(model_cfg, seed=seed)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ExportError(
            f"Cannot load the run's base model {model_cfg.name!r}: {one_line(exc)}"
        ) from exc


def _run_task(run: RunAdapter) -> Task:
    """Return the run's task: the adapter's ``task_type``, else config or data."""
    task = _TASKS.get(str(run.peft_config.get("task_type")))
    if task is not None:
        return task
    if run.cfg.model.task != "auto":
        return run.cfg.model.task
    # An adapter saved without a task type, of a run whose task came from its data.
    from lora_flwr.experiment import resolve_model_config

    resolved = resolve_model_config(run.cfg).task
    assert resolved != "auto"  # resolve_model_config decides it
    return resolved


def one_line(exc: BaseException) -> str:
    """Return the first line of an error's message (its type name if empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 2 with a one-line error on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run directory")
    parser.add_argument("--merged", type=Path, help="write the merged model here")
    parser.add_argument("--peft", type=Path, help="write the PEFT adapter here")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="merged weights"
    )
    args = parser.parse_args(argv)
    if args.merged is None and args.peft is None:
        parser.error("nothing to do: pass --merged DIR and/or --peft DIR")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("lora_flwr").setLevel(logging.INFO)
    try:
        if args.peft is not None:
            print(f"PEFT adapter: {export_peft(args.run, args.peft)}", flush=True)
        if args.merged is not None:
            path = export_merged(args.run, args.merged, dtype=args.dtype)
            print(f"merged model: {path}", flush=True)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
