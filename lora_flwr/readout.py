"""After the last round: what ``eval.benchmark`` and ``eval.samples`` ask of the model.

The server calls :func:`final_readout` once, with the last round's global adapter
loaded into the workspace's model; :func:`check_readout` is the pre-flight's
share (the task, the data, the benchmark's questions), so a run that cannot
produce them stops before round 1. Flower-free.
"""

from __future__ import annotations

from pathlib import Path

from lora_flwr.config import ExperimentConfig
from lora_flwr.data import eval_subset
from lora_flwr.data.chat import chat_template
from lora_flwr.evaluation.after_run import (
    benchmark_report,
    sample_answers,
    summary_line,
    write_benchmark,
    write_samples,
)
from lora_flwr.evaluation.mmlu import load_mmlu
from lora_flwr.experiment import Workspace, splits

# Prompts per forward pass: MMLU prompts run from ~60 to ~700 tokens, and a batch
# is padded to its longest, so a small batch of length-sorted prompts pads least.
BENCHMARK_BATCH = 16


def wants_readout(cfg: ExperimentConfig) -> bool:
    """Whether the config asks for a benchmark or sample answers after the run."""
    return cfg.eval.benchmark != "none" or cfg.eval.samples > 0


def check_readout(ws: Workspace, cfg: ExperimentConfig) -> None:
    """Refuse, before the run, a read-out it could not produce.

    Raises
    ------
    ValueError
        In one line: a benchmark or samples for a model that is not a causal LM,
        samples of data that has no prompts (plain text), or benchmark questions
        that cannot be read.
    """
    if not wants_readout(cfg):
        return
    asked = "eval.benchmark" if cfg.eval.benchmark != "none" else "eval.samples"
    if ws.task != "causal_lm":
        raise ValueError(
            f"`{asked}` needs a causal LM (answers are generated) but model.name = "
            f"{cfg.model.name!r} is trained for {ws.task}; set {asked} to its "
            "default or use a causal LM (e.g. model.name = 'smollm2-135m')"
        )
    if cfg.eval.samples > 0 and splits(cfg).test.messages is None:
        raise ValueError(
            f"`eval.samples` = {cfg.eval.samples} answers held-out prompts of "
            f"instruction data, but data.name = {cfg.data.name!r} is plain text; "
            "set eval.samples = 0 or use instruction data (e.g. data.name = "
            "'alpaca_demo')"
        )
    if cfg.eval.benchmark == "mmlu":
        # Fetches the offline copy once; a missing or bad one fails here.
        load_mmlu(
            cfg.eval.benchmark_split,
            per_subject=cfg.eval.benchmark_per_subject or None,
            seed=cfg.seed,
        )


def final_readout(ws: Workspace, cfg: ExperimentConfig, out: Path) -> list[str]:
    """Score the loaded global model and write its read-outs to ``out``.

    Returns
    -------
    list[str]
        Lines for the console: the benchmark summary and where each file went.

    Raises
    ------
    OSError
        If a file cannot be written (nothing partial is left: writes are atomic).
    """
    lines: list[str] = []
    model, tokenizer = ws.bundle.model, ws.bundle.tokenizer
    if cfg.eval.benchmark == "mmlu":
        _, report = benchmark_report(
            model,
            tokenizer,
            split=cfg.eval.benchmark_split,
            per_subject=cfg.eval.benchmark_per_subject or None,
            seed=cfg.seed,
            batch_size=BENCHMARK_BATCH,
        )
        path = write_benchmark(report, out)
        lines += [summary_line(report), f"benchmark -> {path}"]
    if cfg.eval.samples > 0:
        heldout = eval_subset(splits(cfg).test, cfg.eval.samples, seed=cfg.seed)
        template = chat_template(tokenizer, cfg.model.fallback_template, cfg.model.name)
        rows = sample_answers(
            model,
            tokenizer,
            template,
            heldout.messages or (),
            max_new_tokens=cfg.eval.sample_tokens,
        )
        path = write_samples(rows, out)
        lines.append(f"{len(rows)} answers to held-out prompts -> {path}")
    return lines
