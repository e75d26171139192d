"""Scale: memory and start-up of the real simulation at N virtual clients.

For each N in ``--clients`` this runs ``run_simulation.py`` on the default
experiment (real MiniLM, real Rotten Tomatoes, Ray) with ``fed.num_clients = N``,
10 clients sampled per round (``sampling.min_clients = 10``), ``data.partitioner``
``iid`` (the natural split has 508 movies, too few for 1,000 clients) and the
overrides given, as a child process. Every ``--interval`` seconds it reads the
memory of the child's whole process tree (the driver, the watchdog, Ray's GCS,
raylet, dashboard and agents, and the client actors) from ``/proc``:

* ``rss``: the sum of every process's resident set. Pages that several processes
  map (shared libraries, Ray's object store in ``/dev/shm``, copy-on-write pages
  after a fork) are counted once per process, so this overstates the tree.
* ``pss``: the sum of every process's proportional set size
  (``/proc/<pid>/smaps_rollup``): a page mapped by k processes counts 1/k in each,
  so the tree's shared pages (object store included) are counted once in all. This
  is what the tree costs the machine.
* ``shmem``: the sum of ``Pss_Shmem``: the tree's share of shared memory (Ray's
  object store and its plasma mappings), already inside ``pss``.

From the run's ``history.json`` (wall-clock ``started_at`` / ``fit_done_at`` per
round, ``handshake_seconds``) it reports start-up (process start to round 1's
``configure_fit``, to its clients' replies), the time spent learning nodes'
partitions, and the tree's memory at the end of every round.

    PYTHONPATH=. python benchmarks/scale.py --clients 10 100 1000 --rounds 3 \\
        --set train.local_steps=2 --out /tmp/scale/runs --json scale.json

Each N gets a fresh partition cache (``$LORA_FLWR_CACHE`` pointed at a directory
under ``--out`` whose model and corpus entries link to the real cache), so
start-up includes partitioning and tokenizing, as on a first run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from lora_flwr.server.record import (
    FIT_DONE_AT,
    HANDSHAKE_SECONDS,
    ROUND,
    ROUND_SECONDS,
    STARTED_AT,
    TEST_ACCURACY,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLED = 10  # clients per round, the target's number
ROLLUP_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


def read_rollup(pid: int) -> dict[str, int] | None:
    """Bytes of the ``smaps_rollup`` fields of ``pid``; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ROLLUP_KEYS:
            out[key] = int(rest.split()[0]) * 1024
    return out


def kind_of(proc: psutil.Process, driver: int) -> str:
    """Group a process of the tree: driver, actor, idle worker, or Ray daemon."""
    if proc.pid == driver:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if "ClientAppActor" in cmd or "ClientAppActor" in name:
        return "actor"
    if name.startswith("ray::") or "default_worker.py" in cmd:
        return "ray_worker"
    if "lora_flwr.watchdog" in cmd:
        return "watchdog"
    return "ray_daemon"


def sample_tree(root: psutil.Process) -> dict[str, Any]:
    """One sample: summed RSS, PSS and shared memory of the tree, and by kind."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    total = dict.fromkeys(("rss", "pss", "shmem"), 0)
    by_kind: dict[str, dict[str, int]] = {}
    for proc in procs:
        rollup = read_rollup(proc.pid)
        if rollup is None:
            continue
        kind = kind_of(proc, root.pid)
        group = by_kind.setdefault(kind, {"n": 0, "rss": 0, "pss": 0})
        group["n"] += 1
        group["rss"] += rollup.get("Rss", 0)
        group["pss"] += rollup.get("Pss", 0)
        total["rss"] += rollup.get("Rss", 0)
        total["pss"] += rollup.get("Pss", 0)
        total["shmem"] += rollup.get("Pss_Shmem", 0)
    try:
        cpu = root.cpu_times()
        driver_cpu = cpu.user + cpu.system
    except psutil.NoSuchProcess:
        driver_cpu = 0.0
    return {
        "t": time.time(),
        "procs": len(procs),
        **total,
        "driver_cpu": driver_cpu,
        "by_kind": by_kind,
    }


def private_cache(run_root: Path) -> Path:
    """A cache directory with the real model and corpus but no partitions."""
    real = Path(os.environ.get("LORA_FLWR_CACHE", Path.home() / ".cache" / "lora_flwr"))
    cache = run_root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for entry in real.iterdir():
        if entry.name == "partitions":
            continue
        link = cache / entry.name
        if not link.exists():
            link.symlink_to(entry.resolve())
    return cache


def run_one(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run the simulation at ``n`` clients and measure it."""
    run_root = Path(args.out) / f"n{n}"
    run_root.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"fed.num_clients={n}",
        f"sampling.min_available={n}",
        # ceil(fraction * n) must not exceed 10: the minimum then decides.
        "sampling.fraction=1e-9",
        f"sampling.min_clients={min(SAMPLED, n)}",
        f"eval.min_clients={min(2, n)}",
        "eval.fraction=0.0",
        f"fed.num_rounds={args.rounds}",
        f"eval.every={args.eval_every}",
        "data.partitioner=iid",
        *args.overrides,
        f"name=scale-n{n}",
        f"output_dir={run_root}",
    ]
    cmd = [sys.executable, str(ROOT / "run_simulation.py"), "--config", args.config]
    for item in overrides:
        cmd += ["--set", item]
    cmd.append("--overwrite")
    env = dict(os.environ, LORA_FLWR_CACHE=str(private_cache(run_root)))
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    log = (run_root / "run.log").open("w")
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
    proc = psutil.Process(child.pid)
    t0 = proc.create_time()
    samples: list[dict[str, Any]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = sample_tree(proc)
            if s:
                samples.append(s)
            done.wait(args.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = child.wait()
    done.set()
    sampler.join()
    log.close()
    (run_root / "samples.jsonl").write_text(
        "".join(json.dumps(s) + "\n" for s in samples)
    )
    if code != 0:
        raise SystemExit(f"n={n}: run_simulation.py exited with {code}; see {log.name}")
    history = json.loads((run_root / f"scale-n{n}" / "history.json").read_text())
    return summarize(n, t0, samples, history)


def summarize(
    n: int, t0: float, samples: list[dict[str, Any]], history: list[dict[str, Any]]
) -> dict[str, Any]:
    """Start-up times, peaks and per-round memory from the samples and history."""
    rounds = [r for r in history if r.get(ROUND, 0) > 0]
    first = rounds[0]
    peak = max(samples, key=lambda s: s["rss"])
    peak_pss = max(samples, key=lambda s: s["pss"])
    per_round = []
    for rec in rounds:
        # Up to the round's end (history), not the next round: after the last
        # round Ray shuts down and the tree shrinks.
        end = rec[STARTED_AT] + rec[ROUND_SECONDS]
        inside = [s for s in samples if rec[STARTED_AT] <= s["t"] <= end]
        if not inside:
            continue
        last = inside[-1]
        per_round.append(
            {
                "round": rec[ROUND],
                "seconds": rec.get(ROUND_SECONDS),
                "rss_end": last["rss"],
                # CPU seconds the driver (server, Flower's engine threads) used
                # per wall second of the round.
                "driver_cpu_share": (
                    last.get("driver_cpu", 0.0) - inside[0].get("driver_cpu", 0.0)
                )
                / max(last["t"] - inside[0]["t"], 1e-9),
                "pss_end": last["pss"],
                "rss_max": max(s["rss"] for s in inside),
                "pss_max": max(s["pss"] for s in inside),
                "by_kind_end": last["by_kind"],
            }
        )
    return {
        "clients": n,
        "to_round1_s": first[STARTED_AT] - t0,
        "handshake_round1_s": first.get(HANDSHAKE_SECONDS),
        "to_first_fits_s": first[FIT_DONE_AT] - t0,
        "round1_s": first.get(ROUND_SECONDS),
        "peak_rss": peak["rss"],
        "peak_rss_by_kind": peak["by_kind"],
        "peak_pss": peak_pss["pss"],
        "peak_pss_by_kind": peak_pss["by_kind"],
        "peak_shmem": max(s["shmem"] for s in samples),
        "procs_max": max(s["procs"] for s in samples),
        "per_round": per_round,
        "rss_slope_mb_per_round": slope(per_round, "rss_end"),
        "pss_slope_mb_per_round": slope(per_round, "pss_end"),
        "final_test_accuracy": rounds[-1].get(TEST_ACCURACY),
    }


def slope(rows: list[dict[str, Any]], key: str) -> float | None:
    """Least-squares MB per round of ``key`` over rounds 2.. (round 1 warms up)."""
    pts = [(r["round"], r[key] / 2**20) for r in rows if r["round"] >= 2]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / var


def gib(value: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{value / 2**30:.2f}"


def main() -> int:
    """Run every N, print the tables, optionally save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--eval-every", type=int, default=0, help="eval.every (0: last round)"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--out", default="/tmp/lora-flwr-scale")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    for n in args.clients:
        res = run_one(n, args)
        results.append(res)
        print(
            f"N={n}: to round 1 {res['to_round1_s']:.1f} s (handshake "
            f"{res['handshake_round1_s']:.2f} s), to first fits "
            f"{res['to_first_fits_s']:.1f} s; peak tree RSS {gib(res['peak_rss'])} "
            f"GiB, PSS {gib(res['peak_pss'])} GiB",
            flush=True,
        )
    print(
        "\n| clients | to round 1 s | handshake s | to first fits s | peak RSS GiB "
        "| peak PSS GiB | RSS slope MB/round | PSS slope MB/round |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rs, ps = r["rss_slope_mb_per_round"], r["pss_slope_mb_per_round"]
        print(
            f"| {r['clients']} | {r['to_round1_s']:.1f} | "
            f"{r['handshake_round1_s']:.2f} | {r['to_first_fits_s']:.1f} | "
            f"{gib(r['peak_rss'])} | {gib(r['peak_pss'])} | "
            f"{'-' if rs is None else f'{rs:+.2f}'} | "
            f"{'-' if ps is None else f'{ps:+.2f}'} |"
        )
    for r in results:
        print(f"\nN={r['clients']}: tree memory at the end of each round (GiB)")
        print(
            "| round | s | RSS | PSS | driver PSS | actors PSS | Ray daemons PSS "
            "| driver CPU share |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in r["per_round"]:
            kinds = row["by_kind_end"]
            actors = kinds.get("actor", {}).get("pss", 0)
            daemons = sum(
                kinds.get(k, {}).get("pss", 0) for k in ("ray_daemon", "ray_worker")
            )
            print(
                f"| {row['round']} | {row['seconds']:.1f} | {gib(row['rss_end'])} | "
                f"{gib(row['pss_end'])} | "
                f"{gib(kinds.get('driver', {}).get('pss', 0))} | {gib(actors)} | "
                f"{gib(daemons)} | {row['driver_cpu_share']:.2f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
