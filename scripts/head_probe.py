"""How much of a finished run's accuracy is lost in its classifier head?

    python scripts/head_probe.py RUN_DIR [RUN_DIR ...] [--shrinkage 1e-3] [--base]

For each run (a directory ``run_simulation.py`` wrote): load its final adapter,
evaluate it on the held-out split, then replace only the head by the LDA head
fitted to every client's exact class statistics under that adapter (what
``head.calibration = "lda"`` does each round, here once, after training) and
evaluate again. ``--base`` keeps the seeded adapter instead (no trained factors):
what the pretrained features alone give. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_flwr.aggregation.lda import decode_stats, lda_head, merge_stats
from lora_flwr.config import ExperimentConfig
from lora_flwr.experiment import clear_caches, get_workspace, heldout_data
from lora_flwr.fl.client import LoRAClient


def probe(run_dir: Path, shrinkage: float, base: bool) -> dict[str, object]:
    """Held-out accuracy of a run with its own head and with the LDA head."""
    cfg = ExperimentConfig.from_toml(run_dir / "config.toml")
    ws = get_workspace(cfg)
    ws.reset_adapter()
    if not base:
        ws.adapter.load(run_dir / "adapter")
    heldout = heldout_data(ws, cfg)
    own = ws.trainer.evaluate(heldout, progress=False)["accuracy"]
    num_labels = cfg.model.num_labels
    name, layer = ws.adapter.head_layer(num_labels)
    parts = []
    for pid in range(cfg.fed.num_clients):
        client = LoRAClient(cfg, pid, cfg.fed.num_clients)
        parts.append(decode_stats(client.head_stats(), num_labels, layer.in_features))
    weight, bias = lda_head(merge_stats(parts), shrinkage)
    arrays = ws.adapter.get_named_weights()
    arrays[f"{name}.weight"] = weight.astype("float32")
    arrays[f"{name}.bias"] = bias.astype("float32")
    ws.adapter.set_named_weights(arrays)
    lda = ws.trainer.evaluate(heldout, progress=False)["accuracy"]
    ws.reset_adapter()
    return {
        "run": str(run_dir),
        "adapter": "seeded" if base else "trained",
        "own_head_accuracy": round(own, 4),
        "lda_head_accuracy": round(lda, 4),
        "shrinkage": shrinkage,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--shrinkage", type=float, default=1e-3)
    parser.add_argument("--base", action="store_true", help="the seeded adapter")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        if not (run_dir / "config.toml").is_file():
            print(f"error: {run_dir} holds no config.toml", file=sys.stderr)
            return 2
        print(json.dumps(probe(run_dir, args.shrinkage, args.base)), flush=True)
        clear_caches()
    return 0


if __name__ == "__main__":
    sys.exit(main())
