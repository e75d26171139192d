"""A fresh ClientApp process's partition: built (cache miss) vs read back (hit).

    rm -rf $LORA_FLWR_CACHE/partitions   # for a miss
    PYTHONPATH=. python benchmarks/partition_cache.py [--config configs/default.toml]

Prints the seconds ``client_datasets`` took for partition 3 of 10 in this process,
whether ``flwr_datasets`` had to be imported, and the number of rows. Run it once
after clearing the cache (miss), then again (hit): each run is a new process, as a
deployed SuperNode's ClientApp is for every message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lora_flwr.config import ExperimentConfig
from lora_flwr.experiment import client_datasets, get_workspace

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Time one client's data in this fresh process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/default.toml")
    args = parser.parse_args()
    cfg = ExperimentConfig.from_toml(args.config)
    ws = get_workspace(cfg)
    start = time.perf_counter()
    train, _ = client_datasets(ws, cfg, 3, 10)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": round(seconds, 3),
                "flwr_datasets_imported": "flwr_datasets" in sys.modules,
                "rows": len(train),
            }
        )
    )


if __name__ == "__main__":
    main()
