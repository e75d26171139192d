r"""MMLU under FlowerTune's General-NLP protocol, for a base model or a trained adapter.

::

    python -m lora_flwr.benchmark --model smollm2-135m \
        [--adapter results/<name>/adapter] [--split validation] [--per-subject N] \
        [--batch-size 16] [--seed 0] [--data DIR] [--json out.json]

Prints accuracy per category (stem, social_sciences, humanities, and ``other``,
which is not averaged) and the average of the first three, as FlowerTune's board
reports it (:mod:`lora_flwr.evaluation.flowertune`). The questions come from the
offline ``mmlu`` asset (:mod:`lora_flwr.evaluation.mmlu`), or from ``--data``: a
folder of ``<subject>/<split>/`` ``save_to_disk`` directories, e.g. a Hub copy.
``--per-subject N`` evaluates a fixed sample (``--seed``) of at most N questions
per subject, so a CPU run fits in minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lora_flwr.atomic import write_text_atomic
from lora_flwr.config import ModelConfig
from lora_flwr.evaluation import SPLITS
from lora_flwr.evaluation.after_run import (
    benchmark_report,
    format_table,
    percent,
    questions_phrase,
)
from lora_flwr.evaluation.flowertune import BenchmarkResult
from lora_flwr.export import one_line
from lora_flwr.lora import load_adapter, load_base_delta
from lora_flwr.lora.io import BASE_DELTA_NAME
from lora_flwr.models import load_model

log = logging.getLogger("lora_flwr.benchmark")


def evaluate_model(
    model_name: str,
    *,
    adapter: str | Path | None = None,
    split: str = "test",
    per_subject: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    data: str | Path | None = None,
    implementation: str = "auto",
) -> tuple[BenchmarkResult, dict[str, Any]]:
    """Load a model (and adapter), answer MMLU and return the scores.

    Parameters
    ----------
    model_name
        ``model.name``: a built-in (``smollm2-135m``), a local directory or a
        Hub id.
    adapter
        A PEFT adapter directory (a run's ``adapter/``), merged into the base
        before answering; its base-weight delta too, when the run kept one.
    split, per_subject, seed, data
        Which questions (see :func:`lora_flwr.evaluation.load_mmlu`).
    batch_size
        Prompts per forward pass.
    implementation
        ``model.implementation``: ``auto``, ``native`` or ``transformers``.

    Returns
    -------
    tuple[BenchmarkResult, dict]
        The scores, and a JSON-ready report: the settings,
        :meth:`BenchmarkResult.to_dict`, ``letter_choice`` and ``wall_s``
        (:func:`lora_flwr.evaluation.after_run.benchmark_report`).
    """
    model, tokenizer = load_for_benchmark(
        model_name, adapter=adapter, seed=seed, implementation=implementation
    )
    result, report = benchmark_report(
        model,
        tokenizer,
        split=split,  # type: ignore[arg-type]  # argparse restricts it to SPLITS
        per_subject=per_subject,
        seed=seed,
        batch_size=batch_size,
        root=data,
    )
    head = {"model": model_name, "adapter": None if adapter is None else str(adapter)}
    return result, {**head, **report}


def load_for_benchmark(
    model_name: str,
    *,
    adapter: str | Path | None = None,
    seed: int = 0,
    implementation: str = "auto",
) -> tuple[nn.Module, Any]:
    """Load the causal LM to score, with ``adapter`` merged in; and its tokenizer.

    ``seed`` seeds the randomly initialised weights, which only the ``tiny-*``
    test models have: pass the run's seed to score one of their adapters.
    """
    cfg = ModelConfig(
        name=model_name,
        task="causal_lm",
        implementation=implementation,  # type: ignore[arg-type]
    )
    bundle = load_model(cfg, seed=seed)
    model = bundle.model
    if adapter is not None:
        lora = load_adapter(model, adapter, seed=seed)
        delta = Path(adapter) / BASE_DELTA_NAME
        if delta.is_file():  # flora / fedex keep part of the update in the base
            lora.set_base_delta(load_base_delta(delta))
        model = lora.merge_and_unload()
    return model, bundle.tokenizer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model.name to evaluate")
    parser.add_argument("--adapter", type=Path, help="PEFT adapter directory")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument(
        "--per-subject", type=int, help="at most N questions per subject (sampled)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data", type=Path, help="<subject>/<split>/ folders")
    parser.add_argument(
        "--implementation",
        default="auto",
        choices=("auto", "native", "transformers"),
        help="model.implementation",
    )
    parser.add_argument("--json", type=Path, help="write the scores here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 2 with a one-line error on bad input."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("lora_flwr").setLevel(logging.INFO)
    try:
        result, report = evaluate_model(
            args.model,
            adapter=args.adapter,
            split=args.split,
            per_subject=args.per_subject,
            seed=args.seed,
            batch_size=args.batch_size,
            data=args.data,
            implementation=args.implementation,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    adapter = f" + {args.adapter}" if args.adapter else ""
    print(
        f"{questions_phrase(report)}, {args.model}{adapter}, FlowerTune General-NLP "
        f"protocol, {report['wall_s']} s"
    )
    print(format_table(result))
    print(
        "letter choice (the option letter the model ranks first): average "
        f"{percent(report['letter_choice']['average'])}"
    )
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
        print(f"scores: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
