"""Time to accuracy: lora_flwr against the PEFT + Flower FedAvg comparison app.

    PYTHONPATH=. python benchmarks/time_to_accuracy.py [--pairs 2] [--target 0.75]
        [--config configs/default.toml] [--precision fp32|bf16] [--out DIR]
        [--seeds 0 1 2]

Runs the two apps one after the other, alternating (ours, theirs, ours, theirs,
...), so that both see the same machine load; then prints, per app, the process
wall time, the median round wall time, the seconds until held-out accuracy first
reaches ``--target`` (summed round times, round 0 excluded) and the final accuracy,
and the ratios ours / theirs. Round times count from the end of one round's
evaluation to the end of the next in both apps. ``--seeds`` runs one pair per seed
(``seed`` set in both apps: partitions, held-out subset, new head, adapter), so
that the final accuracies compare over seeds, not over one seed's luck; without
it every pair uses the config's seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lora_flwr.server.record import ROUND, ROUND_SECONDS, TEST_ACCURACY

ROOT = Path(__file__).resolve().parents[1]


def seconds_to(history: list[dict[str, Any]], target: float) -> float | None:
    """Summed round seconds until accuracy first reaches ``target`` (None: never)."""
    total = 0.0
    for rec in history:
        if int(rec[ROUND]) == 0:
            continue
        total += float(rec[ROUND_SECONDS])
        if float(rec.get(TEST_ACCURACY) or 0.0) >= target:
            return total
    return None


def summary(
    history: list[dict[str, Any]], wall: float, target: float
) -> dict[str, Any]:
    """What the table shows for one run."""
    rounds = [float(r[ROUND_SECONDS]) for r in history if int(r[ROUND]) > 0]
    return {
        "wall": wall,
        "round_median": statistics.median(rounds),
        "to_target": seconds_to(history, target),
        "final": float(history[-1][TEST_ACCURACY]),
    }


def run_ours(
    config: Path, out: Path, name: str, precision: str | None, seed: int | None
) -> dict[str, Any]:
    """Run lora_flwr's main job; return its history and process wall time."""
    start = time.perf_counter()
    options = ["--set", f"compute.precision={precision}"] if precision else []
    if seed is not None:
        options += ["--set", f"seed={seed}"]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "run_simulation.py"),
            "--config",
            str(config),
            "--set",
            f"name={name}",
            "--set",
            f"output_dir={out}",
            *options,
            "--overwrite",
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    history = json.loads((out / name / "history.json").read_text())
    return {"history": history, "wall": wall}


def run_theirs(
    config: Path, out: Path, name: str, precision: str, seed: int | None
) -> dict[str, Any]:
    """Run the comparison app; return its history and process wall time."""
    path = out / f"{name}.json"
    start = time.perf_counter()
    options = [] if seed is None else ["--seed", str(seed)]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "baseline_peft_flower.py"),
            "--config",
            str(config),
            "--out",
            str(path),
            "--precision",
            precision,
            *options,
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    return {"history": json.loads(path.read_text()), "wall": wall}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "never" if value is None else f"{value:.{digits}f}"


def main() -> None:
    """Interleave the runs and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/default.toml")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.75)
    # Ours: the config's own compute.precision unless given ("auto" is a choice).
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None)
    # Theirs: fp32, what a PEFT + Flower user gets on a CPU, unless given.
    parser.add_argument("--theirs-precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args()
    seeds: list[int | None] = list(args.seeds) if args.seeds else [None] * args.pairs
    out = (args.out or Path(tempfile.mkdtemp(prefix="tta-"))).resolve()
    theirs_precision = args.theirs_precision
    rows: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
    for i, seed in enumerate(seeds):
        ours = run_ours(args.config, out, f"ours-{i}", args.precision, seed)
        rows["ours"].append(summary(ours["history"], ours["wall"], args.target))
        theirs = run_theirs(args.config, out, f"theirs-{i}", theirs_precision, seed)
        rows["theirs"].append(summary(theirs["history"], theirs["wall"], args.target))
        print(
            json.dumps(
                {
                    "pair": i,
                    "seed": seed,
                    "ours": rows["ours"][-1],
                    "theirs": rows["theirs"][-1],
                }
            ),
            flush=True,
        )
    (out / "summary.json").write_text(json.dumps(rows, indent=1))

    def med(app: str, key: str) -> float | None:
        values = [r[key] for r in rows[app] if r[key] is not None]
        if len(values) < len(rows[app]):
            return None
        return statistics.median(values)

    print(
        f"\n| | lora_flwr ({args.precision or 'config'}) | PEFT + Flower FedAvg "
        f"({theirs_precision}) | ratio |"
    )
    print("|---|---|---|---|")
    for key, label in (
        ("wall", "process wall, s"),
        ("round_median", "round wall, median, s"),
        ("to_target", f"seconds to {args.target} accuracy"),
    ):
        a, b = med("ours", key), med("theirs", key)
        ratio = None if a is None or b is None else a / b
        each = {app: ", ".join(_fmt(r[key]) for r in rows[app]) for app in rows}
        print(f"| {label} | {each['ours']} | {each['theirs']} | {_fmt(ratio, 2)} |")
    finals = {a: ", ".join(f"{r['final']:.3f}" for r in rows[a]) for a in rows}
    print(f"| final accuracy | {finals['ours']} | {finals['theirs']} | |")
    means = {a: statistics.fmean(r["final"] for r in rows[a]) for a in rows}
    print(
        f"| final accuracy, mean | {means['ours']:.3f} | {means['theirs']:.3f} | "
        f"{means['ours'] - means['theirs']:+.3f} |"
    )


if __name__ == "__main__":
    main()
