"""Run a federated LoRA experiment in one process (Flower simulation, Ray).

    python run_simulation.py [--config configs/default.toml] [--set key=value ...]

Prints a per-round table and writes ``<output_dir>/<name>/``: the resolved config,
``history.json`` / ``history.csv``, the final adapter (PEFT directory), per-round
checkpoints and PNG plots. The work is done by :mod:`lora_flwr.simulation`.
"""

from __future__ import annotations

from collections.abc import Sequence

from lora_flwr import simulation

run = simulation.run


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``run`` is looked up here, so tests can swap it)."""
    return simulation.main(argv, run_fn=lambda cfg, verbose: run(cfg, verbose=verbose))


if __name__ == "__main__":
    raise SystemExit(main())
