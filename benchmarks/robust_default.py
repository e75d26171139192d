"""Which aggregation defence should be the default: hostile clients on the main job.

Each case is one Ray simulation of ``configs/default.toml`` for 6 rounds (held-out
accuracy on 1,000 test examples after the last round), with a defence, a probe from
``reliability_probes.py`` and a federation:

* ``3c1h``: 3 clients, all trained each round, partition 2 hostile;
* ``10c1h`` / ``10c2h``: the default 10 clients, 4 sampled per round, partition 2
  (and 5) hostile.

Results are appended to ``--out/results.jsonl`` as each case ends (a rerun skips the
cases already there), then printed as a Markdown table::

    PYTHONPATH=. python benchmarks/robust_default.py --out /tmp/robust \\
        --cases mean:honest:3c1h:0,median:sign_flip:3c1h:0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_probes import ROOT, run_probe, total  # noqa: E402

from lora_flwr.server.record import (  # noqa: E402
    NORM_CLIPPED,
    TEST_ACCURACY,
    TEST_LOSS,
    WEIGHT_CAPPED,
)

DEFAULT = ROOT / "configs" / "default.toml"
# guards.* per defence; "mean" is the shipped guards with no robust step.
DEFENCES: dict[str, dict[str, Any]] = {
    "mean": {"robust": "none", "filter": "none"},
    "median": {"robust": "median", "filter": "none"},
    "trimmed": {"robust": "trimmed_mean", "trim_fraction": 0.25, "filter": "none"},
    "cosine": {"robust": "none", "filter": "cosine"},
    "krum": {"robust": "none", "filter": "krum"},
}
FEDERATIONS: dict[str, tuple[dict[str, dict[str, Any]], frozenset[int]]] = {
    "3c1h": (
        {
            "fed": {"num_clients": 3},
            "sampling": {"fraction": 1.0, "min_clients": 3, "min_available": 3},
        },
        frozenset({2}),
    ),
    "10c1h": ({}, frozenset({2})),
    "10c2h": ({}, frozenset({2, 5})),
}
FILTERED = "filtered"  # the history count of replies a filter removed


def run_case(out: Path, case: str) -> dict[str, Any]:
    """Run ``defence:probe:federation:seed``; return its result row."""
    defence, probe, federation, seed = case.split(":")
    sets, hostile = FEDERATIONS[federation]
    guards = {
        k: v for k, v in DEFENCES[defence].items() if k != "filter" or v != "none"
    }
    changes: dict[str, dict[str, Any]] = {
        **sets,
        "fed": {**sets.get("fed", {}), "num_rounds": 6},
        "eval": {"every": 0},
        "guards": guards,
    }
    started = time.time()
    last = run_probe(
        out,
        probe,
        base_path=DEFAULT,
        sets=changes,
        tag=f"{defence}-{federation}-s{seed}",
        hostile=hostile,
        seed=int(seed),
    )
    return {
        "case": case,
        "accuracy": last.get(TEST_ACCURACY),
        "loss": last.get(TEST_LOSS),
        "clipped": last[total(NORM_CLIPPED)],
        "capped": last[total(WEIGHT_CAPPED)],
        "filtered": sum(
            int(r.get(FILTERED) or 0) for r in _history(Path(last["run_dir"]))
        ),
        "seconds": round(time.time() - started, 1),
    }


def _history(run_dir: Path) -> list[dict[str, Any]]:
    from lora_flwr.results import read_history

    return [dict(r) for r in read_history(run_dir)]


def main() -> None:
    """Run the cases not yet in ``results.jsonl`` and print every row."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", required=True, help="comma-separated cases")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    done = {}
    if path.exists():
        done = {r["case"]: r for r in map(json.loads, path.read_text().splitlines())}
    for case in args.cases.split(","):
        if case in done:
            continue
        row = run_case(args.out, case)
        done[case] = row
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("| case | accuracy | loss | clipped | capped | filtered |")
    print("|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        r = done[case]
        print(
            f"| {case} | {r['accuracy']:.3f} | {r['loss']:.4f} | {r['clipped']} "
            f"| {r['capped']} | {r['filtered']} |"
        )


if __name__ == "__main__":
    main()
