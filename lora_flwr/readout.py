"""After the last round: what ``eval.benchmark`` and ``eval.samples`` ask of the model.

The server (and the centralised trainer) calls :func:`final_readout` once, with
the last round's global adapter loaded into the workspace's model. It writes

* ``benchmark.json``: :func:`~lora_flwr.evaluation.after_run.benchmark_report`;
* ``samples.jsonl``: greedy answers to held-out prompts of instruction data, one
  JSON object per line with the prompt, the data's own response and the model's,
  so a person can read what the model learned.

:func:`check_readout` is the pre-flight's share (the task, the data, the
benchmark's questions), so a run that cannot produce them stops before round 1.
Flower-free.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_flwr.atomic import write_text_atomic
from lora_flwr.config import ExperimentConfig
from lora_flwr.data import eval_subset
from lora_flwr.data.chat import chat_template, last_response, render_prompt
from lora_flwr.data.corpus import Conversation
from lora_flwr.evaluation.after_run import (
    answer_prompts,
    benchmark_report,
    summary_line,
)
from lora_flwr.evaluation.mmlu import load_mmlu
from lora_flwr.experiment import Workspace, splits

BENCHMARK_FILE = "benchmark.json"
SAMPLES_FILE = "samples.jsonl"
# Prompts per forward pass: MMLU prompts run from ~60 to ~700 tokens, and a batch
# is padded to its longest, so a small batch of length-sorted prompts pads least.
BENCHMARK_BATCH = 16
# Seed of the per-subject question sample: the same questions for every run,
# whatever its own seed, so runs of several seeds are scored alike.
BENCHMARK_SAMPLE_SEED = 0


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
            seed=BENCHMARK_SAMPLE_SEED,
        )


def print_readout(ws: Workspace, cfg: ExperimentConfig, out: Path) -> None:
    """Run :func:`final_readout` if the config asks for one; print its lines."""
    if wants_readout(cfg):
        for line in final_readout(ws, cfg, out):
            print(line, flush=True)


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
            seed=BENCHMARK_SAMPLE_SEED,
            batch_size=BENCHMARK_BATCH,
        )
        path = out / BENCHMARK_FILE
        write_text_atomic(path, json.dumps(report, indent=2) + "\n")
        lines += [summary_line(report), f"benchmark -> {path}"]
    if cfg.eval.samples > 0:
        heldout = eval_subset(splits(cfg).test, cfg.eval.samples, seed=cfg.seed)
        template = chat_template(tokenizer, cfg.model.fallback_template, cfg.model.name)
        rows = sample_rows(
            model,
            tokenizer,
            template,
            heldout.messages or (),
            max_new_tokens=cfg.eval.sample_tokens,
        )
        path = out / SAMPLES_FILE
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_text_atomic(path, text)
        lines.append(f"{len(rows)} answers to held-out prompts -> {path}")
    return lines


def sample_rows(
    model: Any,
    tokenizer: Any,
    template: str,
    conversations: Sequence[Conversation],
    *,
    max_new_tokens: int,
) -> list[dict[str, str]]:
    """Return the model's greedy answer to each conversation's last request.

    Returns
    -------
    list[dict[str, str]]
        Per conversation: ``prompt`` (the last user turn), ``reference`` (the
        data's response) and ``answer`` (the model's, special tokens removed).
    """
    prompts = [render_prompt(tokenizer, template, c) for c in conversations]
    answers = answer_prompts(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    rows = []
    for conversation, answer in zip(conversations, answers, strict=True):
        last = last_response(conversation)
        asked = [c for r, c in conversation[:last] if r == "user"]
        rows.append(
            {
                "prompt": asked[-1] if asked else "",
                "reference": conversation[last][1],
                "answer": answer,
            }
        )
    return rows
