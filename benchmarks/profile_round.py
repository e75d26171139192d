"""Where a round's time goes: a profiled simulation and a profiled loopback deployment.

    PYTHONPATH=. python benchmarks/profile_round.py [--config configs/default.toml]
        [--rounds 2] [--num-supernodes 2] [--out /tmp/lora-flwr-profile]
        [--skip-sim] [--skip-deploy] [--reuse] [--set key=value ...]
        [--deploy-set key=value ...] [--json out.json]

Runs, one after another, with ``compute.profile = true`` and ``fed.num_rounds =
--rounds`` (everything else from the config and ``--set``):

1. the simulation: ``run_simulation.py`` (Ray, the config's clients and sampling);
2. a real deployment on loopback: ``scripts/deploy_local.py`` (a SuperLink and
   ``--num-supernodes`` SuperNodes, TLS + node authentication, every node trained
   in each round: ``sampling.fraction = 1``), with ``--deploy-set`` overrides on
   top (a variant gets its own run, e.g. ``profile-deploy-num_threads-1``).

Then reads both ``history.json`` files and prints, per round, the split of the
round's wall time (seconds and share; see ``lora_flwr/profiling.py``: client
phases on the critical path, server phases, Flower as the rest), and the median
fit call's phases, the unit that compares across the two, for every finished
profiled run in ``--out``. ``--reuse`` keeps a finished run found there instead of
running it again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_flwr.machine import cpu_model_name  # noqa: E402
from lora_flwr.profiling import CLIENT_PHASES, ROUND_PHASES, key  # noqa: E402

LABELS = {
    "client_startup_process": "client start-up: process (Python, Flower, message)",
    "client_startup_imports": "client start-up: imports (torch, transformers)",
    "client_startup_model": "client start-up: model load",
    "client_startup_data": "client start-up: data (partition)",
    "client_data": "data (batches to the device)",
    "client_forward": "forward",
    "client_backward": "backward",
    "client_optimizer": "optimizer (zero_grad, clip, step)",
    "client_serialization": "serialization, client (adapter set/get, encode)",
    "client_evaluation": "evaluation, client",
    "client_other": "other, client",
    "server_serialization": "serialization, server (to/from bytes, decode)",
    "server_aggregation": "aggregation, server (validate, rule)",
    "server_evaluation": "evaluation, server (centralised)",
    "server_other": "other, server (sampling, plans)",
    "flower": "Flower (messaging, scheduling, spawning)",
}


def cpu_model() -> str:
    """The CPU's model name (as ``lscpu`` prints it) and the core count."""
    return f"{cpu_model_name()}, {os.cpu_count()} logical CPUs"


def finished(run_dir: Path, rounds: int) -> list[dict[str, Any]] | None:
    """The run's history if it holds every round with a profile, else None."""
    path = run_dir / "history.json"
    if not path.is_file():
        return None
    history: list[dict[str, Any]] = json.loads(path.read_text())
    done = [r for r in history if r.get("round", 0) > 0 and key("round") in r]
    return history if len(done) == rounds else None


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; return its wall seconds."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"exit code {code} after {seconds:.0f} s:\n{tail}")
    return seconds


def sets(items: list[str]) -> list[str]:
    """``--set`` arguments for each ``key=value``."""
    return [arg for item in items for arg in ("--set", item)]


def simulate(args: argparse.Namespace, common: list[str]) -> float | None:
    """Run the profiled simulation; return its wall seconds (None: reused)."""
    run_dir = args.out / "profile-sim"
    if args.reuse and finished(run_dir, args.rounds) is not None:
        return None
    cmd = [sys.executable, "run_simulation.py", "--config", str(args.config)]
    cmd += sets([*common, "name=profile-sim", f"output_dir={args.out}"])
    return run(cmd + ["--overwrite"], args.out / "profile-sim.log")


def deploy_name(overrides: list[str]) -> str:
    """Run name of a variant: ``compute.num_threads=1`` -> ``...-num_threads-1``."""
    slug = "-".join(o.split(".")[-1].replace("=", "-") for o in overrides)
    return "profile-deploy" + (f"-{slug}" if slug else "")


def deploy(args: argparse.Namespace, common: list[str]) -> float | None:
    """Run the profiled loopback deployment; return its wall seconds."""
    name = deploy_name(args.deploy_overrides)
    run_dir = args.out / name
    if args.reuse and finished(run_dir, args.rounds) is not None:
        return None
    n = args.num_supernodes
    # Every node trains in every round, and the run waits for all of them.
    per_node = [
        "sampling.fraction=1.0",
        f"sampling.min_clients={n}",
        f"eval.min_clients={n}",
        f"sampling.min_available={n}",
        "on_existing=overwrite",
        f"name={name}",
    ]
    cmd = [sys.executable, "scripts/deploy_local.py", "--config", str(args.config)]
    cmd += ["--num-supernodes", str(n), "--output-dir", str(args.out)]
    cmd += sets([*common, *per_node, *args.deploy_overrides])
    return run(cmd, args.out / f"{name}.log")


def rounds_of(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The profiled rounds of a history."""
    return [r for r in history if r.get("round", 0) > 0 and key("round") in r]


def split_rows(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per phase: seconds and share of the round, per run and round."""
    rows = []
    for phase in (*ROUND_PHASES, "handshake", "round"):
        row: dict[str, Any] = {"phase": phase}
        for name, recs in runs.items():
            for rec in recs:
                seconds = float(rec.get(key(phase), 0.0))
                row[f"{name} r{rec['round']}"] = (seconds, seconds / rec[key("round")])
        rows.append(row)
    return rows


def call_rows(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per client phase: the median over a round's fit calls."""
    rows = []
    for phase in (*CLIENT_PHASES, "total"):
        row: dict[str, Any] = {"phase": phase}
        for name, recs in runs.items():
            for rec in recs:
                value = rec.get(f"prof_fit_{phase}_median_s")
                row[f"{name} r{rec['round']}"] = value
        rows.append(row)
    return rows


def print_tables(runs: dict[str, list[dict[str, Any]]]) -> None:
    """Print the round split and the median fit call as Markdown tables."""
    columns = [f"{n} r{r['round']}" for n, recs in runs.items() for r in recs]
    print("\nRound wall time by phase: seconds (share of the round)\n")
    print("| phase | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for row in split_rows(runs):
        label = LABELS.get(row["phase"], row["phase"])
        if row["phase"] == "handshake":
            label = "  of which: partition handshake (new nodes)"
        if row["phase"] == "round":
            label = "**round (wall)**"
        cells = [f"{row[c][0]:.2f} ({100 * row[c][1]:.0f} %)" for c in columns]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nMedian fit call, seconds per phase\n")
    print("| phase | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for row in call_rows(runs):
        cells = ["-" if row[c] is None else f"{row[c]:.2f}" for c in columns]
        print(f"| {row['phase']} | " + " | ".join(cells) + " |")
    counts = [
        f"{n} r{r['round']}: {r.get('prof_fit_calls')} fit calls on "
        f"{r.get('workers')} worker processes"
        for n, recs in runs.items()
        for r in recs
    ]
    print("\n" + "; ".join(counts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/default.toml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-supernodes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/lora-flwr-profile"))
    parser.add_argument("--skip-sim", action="store_true")
    parser.add_argument("--skip-deploy", action="store_true")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--deploy-set", dest="deploy_overrides", action="append", default=[]
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["compute.profile=true", f"fed.num_rounds={args.rounds}", *args.overrides]
    walls: dict[str, float | None] = {}
    if not args.skip_sim:
        walls["simulation"] = simulate(args, common)
    if not args.skip_deploy:
        walls["deployment"] = deploy(args, common)
    runs: dict[str, list[dict[str, Any]]] = {}
    dirs = sorted(args.out.glob("profile-*"), key=lambda p: (p.name[8:11] != "sim", p))
    for run_dir in dirs:
        history = finished(run_dir, args.rounds) if run_dir.is_dir() else None
        if history is not None:
            runs[run_dir.name.removeprefix("profile-")] = rounds_of(history)
    if not runs:
        print("no finished profiled run in", args.out, file=sys.stderr)
        return 1
    print_tables(runs)
    print(f"\nprocess wall seconds: {walls}; machine: {cpu_model()}")
    if args.json is not None:
        doc = {
            "config": str(args.config),
            "overrides": common,
            "wall_seconds": walls,
            "rounds": runs,
            "split": split_rows(runs),
            "median_fit_call": call_rows(runs),
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
