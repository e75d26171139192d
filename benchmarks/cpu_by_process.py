"""Which processes use the CPU while a command runs: CPU-seconds per kind of process.

    python benchmarks/cpu_by_process.py [--interval 0.2] [--timeline]
        [--json out.json] -- COMMAND [ARG ...]

Runs COMMAND and, every ``--interval`` seconds until it exits, reads every
process's user + system CPU time on this machine (``psutil``), not only
COMMAND's descendants: Flower's SuperLink and Ray's helpers detach from their
parents. A process that existed before COMMAND started counts only what it used
after. Processes are grouped by what they run (``flwr ls``, ``flwr-clientapp``,
``ray::IDLE``, ``raylet``, a script's file name, ...). Prints, per group, the
number of processes, CPU-seconds and the mean share of one core over COMMAND's
wall time; ``--timeline`` adds one line per second with every group above 5 % of
a core. A process that starts and ends between two samples is missed, and one
that ends loses its last interval: sample faster for short-lived processes.

This found the deployment script's ``flwr ls`` polling (docs/BENCHMARKS.md,
"The deployment script's own polling").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_flwr.machine import cpu_model_name  # noqa: E402

Key = tuple[int, float]  # pid, create time: a recycled pid is another process


def label(cmdline: list[str]) -> str:
    """A short name for what a process runs."""
    if not cmdline:
        return "?"
    head = Path(cmdline[0]).name
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    if head.startswith("python") and len(cmdline) > 1:
        if cmdline[1] in ("-m", "-c") and len(cmdline) > 2:
            code = " ".join(cmdline[2].split())  # one line, however it was written
            return f"python {cmdline[1]} {code[:40]}"
        rest = [a for a in cmdline[1:] if not a.startswith("-")]
        if not rest:
            return head
        script = Path(rest[0]).name
        if script == "flwr" and len(rest) > 1:  # the CLI: name its subcommand
            return f"flwr {rest[1]}"
        return script
    return head


def sample() -> dict[Key, tuple[str, float]]:
    """Every visible process: (pid, create time) -> (label, CPU-seconds so far)."""
    out: dict[Key, tuple[str, float]] = {}
    attrs = ["pid", "name", "cmdline", "cpu_times", "create_time"]
    for proc in psutil.process_iter(attrs):
        info = proc.info
        if info["cpu_times"] is None or info["create_time"] is None:
            continue
        cpu = info["cpu_times"].user + info["cpu_times"].system
        name = label(info["cmdline"] or [])
        if name == "?" and info["name"]:  # a zombie or a rewritten title
            name = info["name"]
        out[(info["pid"], info["create_time"])] = (name, cpu)
    return out


def measure(argv: list[str], interval: float) -> dict[str, Any]:
    """Run ``argv``, sampling every ``interval`` s: CPU-s per group and per second."""
    before = sample()
    start = time.time()
    child = subprocess.Popen(argv)
    seen: dict[Key, tuple[str, float]] = {}
    timeline: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    last = {k: v[1] for k, v in before.items()}
    while True:
        done = child.poll() is not None
        now = sample()
        second = int(time.time() - start)
        for key, (name, cpu) in now.items():
            # The first name sticks: an exiting process may lose its command line.
            name = seen[key][0] if key in seen else name
            used = cpu - last.get(key, 0.0)  # a new process: all it used so far
            if used > 0:
                timeline[second][name] += used
            last[key] = cpu
            seen[key] = (name, cpu)
        if done:
            break
        time.sleep(interval)
    wall = time.time() - start
    groups: dict[str, dict[str, float]] = defaultdict(
        lambda: {"processes": 0, "cpu_s": 0.0}
    )
    for key, (name, cpu) in seen.items():
        used = cpu - (before[key][1] if key in before else 0.0)
        if used <= 0:
            continue
        groups[name]["processes"] += 1
        groups[name]["cpu_s"] += used
    return {
        "command": argv,
        "returncode": child.returncode,
        "wall_s": wall,
        "interval_s": interval,
        "groups": dict(groups),
        "timeline": {s: dict(v) for s, v in sorted(timeline.items())},
        "machine": f"{cpu_model_name()}, {os.cpu_count()} logical CPUs",
    }


def report(doc: dict[str, Any], timeline: bool) -> str:
    """The groups as a markdown table, largest first; optionally the timeline."""
    wall = doc["wall_s"]
    lines = [
        f"command: {' '.join(doc['command'])} (exit {doc['returncode']})",
        f"wall {wall:.1f} s, sampled every {doc['interval_s']} s; {doc['machine']}",
        "",
        "| process | count | CPU s | mean cores |",
        "|---|---:|---:|---:|",
    ]
    rows = sorted(doc["groups"].items(), key=lambda kv: -kv[1]["cpu_s"])
    for name, g in rows:
        if g["cpu_s"] >= 0.05:
            cores = g["cpu_s"] / wall
            lines.append(
                f"| {name} | {g['processes']} | {g['cpu_s']:.1f} | {cores:.3f} |"
            )
    total = sum(g["cpu_s"] for g in doc["groups"].values())
    lines.append(f"| **all** | | **{total:.1f}** | **{total / wall:.2f}** |")
    if timeline:
        lines.append("")
        for second, groups in doc["timeline"].items():
            busy = sorted(groups.items(), key=lambda kv: -kv[1])
            cells = " ".join(f"{n}={v:.2f}" for n, v in busy if v >= 0.05)
            lines.append(f"{second:>5} s  {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if "--" not in args_in:
        sys.exit("usage: cpu_by_process.py [options] -- COMMAND [ARG ...]")
    split = args_in.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(args_in[:split])
    command = args_in[split + 1 :]
    if not command:
        sys.exit("cpu_by_process.py: no COMMAND after --")
    if args.interval <= 0:
        sys.exit(f"--interval must be > 0, got {args.interval}")
    doc = measure(command, args.interval)
    print(report(doc, args.timeline), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return int(doc["returncode"] != 0)


if __name__ == "__main__":
    sys.exit(main())
