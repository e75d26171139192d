"""Per-round cost of a federated run: client compute vs Flower overhead, RSS, loads.

Runs ``run_simulation.py`` as a child process (so the whole process tree — driver,
Ray's daemons and the client actors — can be measured), samples the summed RSS of
that tree every 0.2 s, then splits every round's wall time from ``history.json``:

* ``client``: the critical path of client compute — the clients that one Ray worker
  process served run one after another, workers run in parallel, so it is the max
  over worker processes of the summed ``fit`` seconds of that round;
* ``eval``: the server's centralised evaluation;
* ``overhead``: everything else (Flower messaging, serialization, sampling,
  aggregation, checkpoints).

    python benchmarks/bench_rounds.py --config configs/default.toml [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_with_peak(cmd: list[str]) -> tuple[int, float, int]:
    """Run ``cmd``; return its exit code, wall seconds and the tree's peak RSS."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT)
    proc = psutil.Process(child.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = child.wait()
    done.set()
    sampler.join()
    return code, time.perf_counter() - start, peak


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from lora_flwr.config import ExperimentConfig
    from lora_flwr.server.record import (
        CLIENT_SECONDS_CRITICAL,
        EVAL_SECONDS,
        MODEL_LOADS_MAX,
        ROUND,
        ROUND_SECONDS,
        TEST_ACCURACY,
    )

    cfg = ExperimentConfig.from_toml(ROOT / args.config).with_overrides(
        [*args.overrides, "name=bench-rounds"]
    )
    run_dir = ROOT / cfg.output_dir / cfg.name
    cmd = [sys.executable, str(ROOT / "run_simulation.py"), "--config", args.config]
    for item in [*args.overrides, "name=bench-rounds"]:
        cmd += ["--set", item]
    code, wall, peak = run_with_peak(cmd)
    if code != 0:
        print(f"run_simulation.py exited with {code}", file=sys.stderr)
        return code
    history = json.loads((run_dir / "history.json").read_text())
    rounds = [r for r in history if r.get(ROUND, 0) > 0]
    print(
        f"\n{'round':>5} {'wall_s':>7} {'client_s':>8} {'eval_s':>7} "
        f"{'overhead_s':>10} {'overhead%':>9} {'loads/worker':>12}"
    )
    rows = []
    for r in rounds:
        client = float(r.get(CLIENT_SECONDS_CRITICAL, 0.0))
        ev = float(r.get(EVAL_SECONDS, 0.0))
        total = float(r[ROUND_SECONDS])
        over = total - client - ev
        rows.append(
            {
                "round": r[ROUND],
                "wall": total,
                "client": client,
                "eval": ev,
                "overhead": over,
                "loads": r.get(MODEL_LOADS_MAX),
            }
        )
        print(
            f"{r[ROUND]:>5} {total:>7.1f} {client:>8.1f} {ev:>7.1f} {over:>10.2f} "
            f"{100 * over / total:>8.1f}% {r.get(MODEL_LOADS_MAX, '-'):>12}"
        )
    steady = rows[1:] if len(rows) > 1 else rows
    tot = sum(r["wall"] for r in steady)
    over = sum(r["overhead"] for r in steady)
    summary = {
        "config": args.config,
        "overrides": args.overrides,
        "wall_seconds": wall,
        "peak_rss_tree_bytes": peak,
        "rounds": rows,
        "steady_overhead_fraction": over / tot if tot else None,
        "first_round_seconds": rows[0]["wall"] if rows else None,
        "final_test_accuracy": rounds[-1].get(TEST_ACCURACY) if rounds else None,
    }
    print(
        f"\nwall {wall:.1f} s; peak RSS of the process tree {peak / 2**30:.2f} GiB; "
        f"overhead in rounds 2..{len(rows)}: {100 * over / tot:.1f}% of round time"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
