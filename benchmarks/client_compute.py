"""One client's compute: the native encoder's levers against transformers' BERT.

    PYTHONPATH=. python benchmarks/client_compute.py [--config configs/default.toml]
        [--repeats 3] [--threads 1] [--steps 15] [--json out.json]

Not a test. In one process, on the config's real model and data (MiniLM + Rotten
Tomatoes by default), times what a round asks of a client and of the server:
``--steps`` training steps on client 0's partition (``LoRATrainer.train``, the
config's batch size, lr, clipping and LoRA) and one centralised evaluation of the
held-out snippets (``LoRATrainer.evaluate``), for three variants, interleaved
(A B C, then B C A, ...) so that they share the machine's load:

* ``transformers``: ``model.implementation = "transformers"``: padded batches,
  every position of every block, torch's dropout;
* ``native, torch dropout``: the native encoder (packed batches, the last block
  for [CLS] only) with ``lora_flwr.dropout`` swapped for torch's ``F.dropout``;
* ``native``: what the config ships (packed, [CLS]-only last block, 16-bit dropout
  masks on the CPU).

Each variant starts from the same adapter and seed in every repeat. Prints the
median seconds, the ratios to ``transformers`` and the training losses (the three
must learn alike: equal maths, different dropout draws). ``--threads`` is torch's
intra-op thread count (a simulation actor has 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora_flwr.dropout as fast_dropout  # noqa: E402
import lora_flwr.models.native.bert as native_bert  # noqa: E402
from lora_flwr.config import ExperimentConfig  # noqa: E402
from lora_flwr.experiment import (  # noqa: E402
    Workspace,
    client_datasets,
    get_workspace,
    heldout_data,
)
from lora_flwr.machine import cpu_model_name  # noqa: E402

VARIANTS = ("transformers", "native, torch dropout", "native")


def torch_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """torch's own dropout, in the signature of :func:`lora_flwr.dropout.dropout`."""
    return F.dropout(x, p, training)


@contextlib.contextmanager
def dropout_from_torch(on: bool) -> Iterator[None]:
    """Swap the 16-bit masks for torch's dropout while ``on``."""
    if not on:
        yield
        return
    saved = (fast_dropout.dropout, native_bert.dropout)
    fast_dropout.dropout = torch_dropout
    native_bert.dropout = torch_dropout
    try:
        yield
    finally:
        fast_dropout.dropout, native_bert.dropout = saved


def cpu_model() -> str:
    """``lscpu``'s model name and the logical CPU count."""
    return f"{cpu_model_name()}, {torch.get_num_threads()} torch threads"


def timed(fn: Callable[[], dict[str, float]]) -> tuple[float, dict[str, float]]:
    """Seconds ``fn`` took and what it returned."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    """Run the variants interleaved and print seconds and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/default.toml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = ExperimentConfig.from_toml(args.config)
    spaces: dict[str, tuple[Workspace, ExperimentConfig]] = {}
    for name in VARIANTS:
        impl = "transformers" if name == "transformers" else "native"
        cfg = base.with_overrides([f"model.implementation={impl}"])
        spaces[name] = (get_workspace(cfg), cfg)
    ws0, cfg0 = spaces["native"]
    train, _ = client_datasets(ws0, cfg0, 0, cfg0.fed.num_clients)
    test = heldout_data(ws0, cfg0)
    seconds: dict[str, dict[str, list[float]]] = {
        n: {"train": [], "eval": []} for n in VARIANTS
    }
    losses: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for rep in range(args.repeats):
        order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]
        for name in order:
            ws, _ = spaces[name]
            ws.reset_adapter()
            with dropout_from_torch(name == "native, torch dropout"):
                t_train, metrics = timed(
                    lambda ws=ws, rep=rep: ws.trainer.train(
                        train, steps=args.steps, seed=rep
                    )
                )
                t_eval, _ = timed(lambda ws=ws: ws.trainer.evaluate(test))
            seconds[name]["train"].append(t_train)
            seconds[name]["eval"].append(t_eval)
            losses[name].append(float(metrics["train_loss"]))
            print(
                f"repeat {rep} {name:>22}: train {t_train:6.2f} s  eval "
                f"{t_eval:6.2f} s  train loss {metrics['train_loss']:.4f}",
                flush=True,
            )
    ref = {k: statistics.median(v) for k, v in seconds["transformers"].items()}
    print(
        f"\n{cpu_model()}; {args.steps} steps of client 0 "
        f"({len(train)} examples), evaluation of {len(test)} held-out examples"
    )
    print(f"{'variant':>22} | train s (x) | eval s (x) | mean train loss")
    result: dict[str, Any] = {"machine": cpu_model(), "variants": {}}
    for name in VARIANTS:
        med = {k: statistics.median(v) for k, v in seconds[name].items()}
        ratio = {k: med[k] / ref[k] for k in med}
        loss = statistics.fmean(losses[name])
        print(
            f"{name:>22} | {med['train']:6.2f} ({ratio['train']:.2f}) | "
            f"{med['eval']:6.2f} ({ratio['eval']:.2f}) | {loss:.4f}"
        )
        result["variants"][name] = {
            "seconds": seconds[name],
            "median": med,
            "ratio_to_transformers": ratio,
            "train_losses": losses[name],
        }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
