"""Benchmarks of a causal LM, Flower-free: FlowerTune's General-NLP protocol on MMLU.

Modules: :mod:`~lora_flwr.evaluation.flowertune` (the prompt, the scoring, the
board's categories and average; stdlib only),
:mod:`~lora_flwr.evaluation.generation` (greedy one-token answers, one forward pass
per batch; torch) and :mod:`~lora_flwr.evaluation.mmlu` (MMLU read from disk with
``datasets``: the offline copy or any folder laid out alike). The command line is
:mod:`lora_flwr.benchmark`.
"""

from lora_flwr.evaluation.flowertune import (
    BOARD_CATEGORIES,
    CATEGORIES,
    BenchmarkResult,
    MCQuestion,
    Score,
    build_prompt,
    extract_answer,
    is_correct,
    score_outputs,
)
from lora_flwr.evaluation.generation import (
    answer_questions,
    greedy_next_tokens,
    last_token_logits,
    run_benchmark,
)
from lora_flwr.evaluation.mmlu import SPLITS, load_mmlu

__all__ = [
    "BOARD_CATEGORIES",
    "CATEGORIES",
    "SPLITS",
    "BenchmarkResult",
    "MCQuestion",
    "Score",
    "answer_questions",
    "build_prompt",
    "extract_answer",
    "greedy_next_tokens",
    "is_correct",
    "last_token_logits",
    "load_mmlu",
    "run_benchmark",
    "score_outputs",
]
