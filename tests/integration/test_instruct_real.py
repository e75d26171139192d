"""configs/instruct.toml end to end: SmolLM2-135M-Instruct on the offline Alpaca rows.

Runs ``python run_simulation.py --config configs/instruct.toml`` as a user does,
shortened (one round of two steps of batch 2, one MMLU question per subject, two
sample answers), and checks what it prints and writes. Fetches the SmolLM2, Alpaca
(LlamaFactory sdist) and MMLU assets once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_flwr import benchmark
from lora_flwr.config import DataConfig
from lora_flwr.data import load_splits
from lora_flwr.results import read_history

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHORT = [
    "fed.num_rounds=1",
    "train.local_steps=2",
    "train.batch_size=2",  # half the activations: two actors fit beside other jobs
    "eval.max_examples=8",
    "eval.benchmark_per_subject=1",
    "eval.samples=2",
    "eval.sample_tokens=16",
]


def test_the_instruct_config_prints_the_benchmark_after_the_last_round(
    tmp_path: Path,
) -> None:
    # Prepare
    sets = [*SHORT, f"output_dir={tmp_path}"]

    # Execute
    proc = subprocess.run(
        [sys.executable, "run_simulation.py", "--config", "configs/instruct.toml"]
        + [a for s in sets for a in ("--set", s)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )

    # Assert: the score is printed and written
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "instruct"
    report = json.loads((run / "benchmark.json").read_text())
    assert report["questions"] == 57 and report["split"] == "validation"
    assert (
        "MMLU validation (57 questions, at most 1 per subject), FlowerTune "
        "General-NLP protocol: average " in proc.stdout
    )
    assert f"benchmark -> {run / 'benchmark.json'}" in proc.stdout
    # held-out response loss and perplexity every round
    history = read_history(run)
    assert [r["round"] for r in history] == [0, 1]
    assert all(r["test_perplexity"] > 1 for r in history)
    # answers to held-out prompts, beside the data's own responses
    data = load_splits(DataConfig(name="alpaca_demo", test_fraction=0.1), seed=0)
    references = {c[-1][1] for c in data.test.messages or ()}
    rows = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(r["reference"] in references and r["answer"].strip() for r in rows)
    # the saved adapter scores the same outside the run (the CLI, merged weights)
    _, again = benchmark.evaluate_model(
        "smollm2-135m", adapter=run / "adapter", split="validation", per_subject=1
    )
    assert again["letter_choice"]["subjects"] == report["letter_choice"]["subjects"]
    assert again["subjects"] == report["subjects"]
