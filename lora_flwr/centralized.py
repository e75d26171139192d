"""Centralised LoRA training: the reference a federated run is compared to.

Trains on all the experiment's training data in one process and reports held-out
metrics before training, every ``--eval-every`` steps and at the end::

    python -m lora_flwr.centralized --config configs/default.toml [--set train.lr=1e-3]

By default it takes ``fed.num_rounds * train.local_steps`` optimiser steps: as many
sequential steps as one client makes over the whole federated run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lora_flwr.atomic import write_text_atomic
from lora_flwr.config import (
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
)
from lora_flwr.experiment import centralized_train_data, get_workspace, heldout_data
from lora_flwr.models import base_model_source
from lora_flwr.readout import check_readout, print_readout

log = logging.getLogger("lora_flwr.centralized")


def run_centralized(
    cfg: ExperimentConfig,
    *,
    steps: int | None = None,
    eval_every: int = 0,
    out_dir: str | Path | None = None,
) -> dict[str, object]:
    """Train centrally and evaluate on the held-out split.

    Parameters
    ----------
    cfg
        The experiment.
    steps
        Optimiser steps (default ``fed.num_rounds * train.local_steps``).
    eval_every
        Evaluate every N steps as well (0: only before and after).
    out_dir
        Where to write ``config.toml``, ``history.json`` and the adapter (PEFT dir),
        and ``benchmark.json`` / ``samples.jsonl`` when ``eval.benchmark`` /
        ``eval.samples`` ask for them; default ``<output_dir>/<name>-centralized``.

    Returns
    -------
    dict
        ``history`` (list of evaluations with their step) and ``final`` metrics.
    """
    total = steps if steps is not None else cfg.fed.num_rounds * cfg.train.local_steps
    if total < 1:
        raise ValueError(f"`steps` should be >= 1 but the value passed is {total}")
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / f"{cfg.name}-centralized"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.toml", cfg.to_toml())
    ws = get_workspace(cfg)
    ws.reset_adapter()
    ws.trainer.set_work_dir(out)
    train = centralized_train_data(ws, cfg)
    test = heldout_data(ws, cfg)
    check_readout(ws, cfg)  # before training: a benchmark it could not run
    log.info(
        "centralized: %s on %s, %d train / %d test examples, %d steps, %d trainable",
        cfg.model.name,
        cfg.data.name,
        len(train),
        len(test),
        total,
        ws.adapter.num_parameters(),
    )
    history: list[dict[str, float]] = [{"step": 0, **ws.trainer.evaluate(test)}]
    _report(history[-1])
    last_loss: list[float] = []

    def on_step(step: int, loss: float) -> None:
        last_loss.append(loss)
        if eval_every > 0 and step % eval_every == 0 and step < total:
            recent = float(
                sum(last_loss[-eval_every:]) / min(eval_every, len(last_loss))
            )
            entry = {"step": float(step), "train_loss": recent}
            entry.update(ws.trainer.evaluate(test))
            history.append(entry)
            _report(entry)

    start = time.perf_counter()
    metrics = ws.trainer.train(train, steps=total, seed=cfg.seed, on_step=on_step)
    entry = {"step": float(total), "train_loss": metrics["train_loss"]}
    entry.update(ws.trainer.evaluate(test))
    history.append(entry)
    _report(entry)
    result: dict[str, object] = {
        "history": history,
        "final": history[-1],
        "train_seconds": time.perf_counter() - start,
    }
    ws.trainer.save_adapter(
        "adapter", base_model_name_or_path=base_model_source(cfg.model.name)
    )
    write_text_atomic(out / "history.json", json.dumps(result, indent=2))
    print_readout(ws, cfg, out)  # eval.benchmark / eval.samples, if asked
    return result


def _report(entry: dict[str, float]) -> None:
    parts = [f"step {int(entry['step']):>5}"]
    for key in ("train_loss", "loss", "accuracy", "perplexity"):
        if key in entry:
            parts.append(f"{key} {entry[key]:.4f}")
    print("  ".join(parts), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps")
    parser.add_argument("--eval-every", type=int, default=0, help="eval every N steps")
    parser.add_argument("--out", default=None, help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("lora_flwr").setLevel(logging.INFO)
    try:
        cfg = config_from_arguments(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_centralized(
        cfg, steps=args.steps, eval_every=args.eval_every, out_dir=args.out
    )
    final = result["final"]
    assert isinstance(final, dict)
    print(json.dumps({"final": final}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
