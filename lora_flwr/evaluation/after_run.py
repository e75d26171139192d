"""A trained model's read-outs: a benchmark report, and greedy answers to prompts.

* :func:`benchmark_report`: MMLU (:mod:`~lora_flwr.evaluation.mmlu`) under
  FlowerTune's General-NLP protocol (:mod:`~lora_flwr.evaluation.flowertune`), per
  category and averaged, and the same questions scored by letter choice (the
  option letter the model ranks first;
  :func:`~lora_flwr.evaluation.generation.answer_and_choose`), as one JSON-ready
  report;
* :func:`answer_prompts`: greedy answers to rendered prompts, for a person to read.

:mod:`lora_flwr.readout` runs both after a run's last round and writes the files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_flwr.evaluation.flowertune import BOARD_CATEGORIES, BenchmarkResult
from lora_flwr.evaluation.generation import (
    encode_prompts,
    last_token_logits,
    score_benchmark,
)
from lora_flwr.evaluation.mmlu import Split, load_mmlu

PROTOCOL = "flowertune-general-nlp"


def benchmark_report(
    model: nn.Module,
    tokenizer: Any,
    *,
    split: Split = "test",
    per_subject: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    root: str | Path | None = None,
) -> tuple[BenchmarkResult, dict[str, Any]]:
    """Answer MMLU with ``model`` and return the protocol's result and a report.

    Parameters
    ----------
    model, tokenizer
        A causal LM (adapter merged or attached) and its tokenizer.
    split, per_subject, seed, root
        Which questions (:func:`~lora_flwr.evaluation.load_mmlu`); ``per_subject``
        None or 0 takes every question of the split.
    batch_size
        Prompts per forward pass.

    Returns
    -------
    tuple[BenchmarkResult, dict]
        FlowerTune's result, and a JSON-ready report: the settings, that result's
        :meth:`~BenchmarkResult.to_dict`, ``letter_choice`` (the same for the
        letter-choice scoring) and ``wall_s``.
    """
    started = time.perf_counter()
    questions = load_mmlu(split, root=root, per_subject=per_subject or None, seed=seed)
    result, letters = score_benchmark(
        model, tokenizer, questions, batch_size=batch_size
    )
    report = {
        "benchmark": "mmlu",
        "protocol": PROTOCOL,
        "split": split,
        "per_subject": per_subject or None,
        "seed": seed,
        "questions": len(questions),
        **result.to_dict(),
        "letter_choice": letters.to_dict(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return result, report


def format_table(result: BenchmarkResult) -> str:
    """Render the per-category table and the board's average as text."""
    lines = [f"{'category':<22}{'correct':>8}{'total':>8}{'accuracy':>10}"]
    for category, score in result.categories.items():
        label = category if category in BOARD_CATEGORIES else f"{category} (*)"
        lines.append(
            f"{label:<22}{score.correct:>8,}{score.total:>8,}"
            f"{percent(score.accuracy):>10}"
        )
    averaged = [c for c in BOARD_CATEGORIES if c in result]
    lines.append(f"{'average':<38}{percent(result.average):>10}")
    lines.append(f"average: unweighted mean of {', '.join(averaged) or 'nothing'}")
    if "other" in result:
        lines.append("(*) reported, not averaged (FlowerTune's board leaves it out)")
    return "\n".join(lines)


def percent(value: float | None) -> str:
    """``value`` as a percentage with two decimals; ``n/a`` for None or NaN."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:.2f}"


def generate_greedy(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    stop: Sequence[int],
    pad_token_id: int,
) -> list[int]:
    """Greedy continuation of one prompt, up to a stop token or ``max_new_tokens``.

    One full forward pass per new token (no key/value cache), through
    :func:`~lora_flwr.evaluation.generation.last_token_logits`, so native and
    ``transformers`` models decode alike. A stop token ends the answer and is
    not returned.
    """
    ids = list(prompt)
    out: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                logits = last_token_logits(model, [ids], pad_token_id=pad_token_id)
                token = int(logits[0].argmax())
                if token in stop:
                    break
                out.append(token)
                ids.append(token)
    finally:
        model.train(was_training)
    return out


def answer_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
) -> list[str]:
    """Return the model's greedy answer to each rendered prompt, special tokens removed.

    A prompt is text the model continues (a chat rendered up to the generation
    prompt); the answer ends at the end-of-sequence or pad token, or after
    ``max_new_tokens``.
    """
    pad = tokenizer.pad_token_id
    stop = [t for t in (tokenizer.eos_token_id, pad) if t is not None]
    answers = []
    for ids in encode_prompts(tokenizer, prompts):
        tokens = generate_greedy(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            stop=stop,
            pad_token_id=int(pad if pad is not None else 0),
        )
        answers.append(str(tokenizer.decode(tokens, skip_special_tokens=True)))
    return answers


def questions_phrase(report: dict[str, Any]) -> str:
    """Return ``MMLU <split> (<n> questions[, at most <k> per subject])``."""
    k = report["per_subject"]
    sample = f", at most {k} per subject" if k else ""
    return f"MMLU {report['split']} ({report['questions']:,} questions{sample})"


def summary_line(report: dict[str, Any]) -> str:
    """One line: the protocol's average and categories, and the letter choice's."""
    cats = report["categories"]
    parts = ", ".join(
        f"{c} {percent(cats[c]['accuracy'])}" for c in BOARD_CATEGORIES if c in cats
    )
    return (
        f"{questions_phrase(report)}, "
        f"FlowerTune General-NLP protocol: average {percent(report['average'])} "
        f"({parts}); letter choice: average "
        f"{percent(report['letter_choice']['average'])} ({report['wall_s']} s)"
    )
