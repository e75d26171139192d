"""The server's evaluation on a quiet machine and next to busy clients.

    PYTHONPATH=. python benchmarks/eval_contention.py [--config configs/default.toml]
        [--busy 2] [--threads 1 2] [--repeats 2] [--json out.json]

Not a test. What ``eval.overlap`` asks of a machine whose cores the clients
already use: times one centralised evaluation of the config's held-out snippets
(``LoRATrainer.evaluate``, real model and data) with each ``--threads`` count of
torch threads, first alone, then while ``--busy`` other processes each keep one
core busy with single-threaded fp32 matrix products of a client's shapes (what a
simulation actor or a one-thread SuperNode does while it trains). Each variant
runs in a fresh process (torch's OpenMP settings are fixed when it loads), the
variants interleaved over ``--repeats``. The ``passive`` variant sets
``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep at a barrier instead of
spinning).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_flwr.machine import cpu_model_name  # noqa: E402

BUSY = """
import sys, time, torch
torch.set_num_threads(1)
w, x = torch.randn(384, 384), torch.randn(2048, 384)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    x @ w
"""

EVAL = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[3])
from lora_flwr.config import ExperimentConfig
from lora_flwr.experiment import get_workspace, heldout_data
torch.set_num_threads(int(sys.argv[2]))
cfg = ExperimentConfig.from_toml(sys.argv[1])
ws = get_workspace(cfg)
data = heldout_data(ws, cfg)
ws.trainer.evaluate(data, progress=False)  # warm-up: allocator, caches
start = time.perf_counter()
ws.trainer.evaluate(data, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "examples": len(data)}))
"""


def cpu_model() -> str:
    """``lscpu``'s model name and the logical CPU count."""
    return f"{cpu_model_name()}, {os.cpu_count()} logical CPUs"


def one_eval(config: Path, threads: int, busy: int, passive: bool) -> float:
    """Seconds of one evaluation in a fresh process, next to ``busy`` busy cores."""
    env = dict(os.environ)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    loads = [subprocess.Popen([sys.executable, "-c", BUSY, "600"]) for _ in range(busy)]
    try:
        out = subprocess.run(
            [sys.executable, "-c", EVAL, str(config), str(threads), str(ROOT)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for proc in loads:
            proc.kill()
            proc.wait()
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    """Time the variants interleaved and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/default.toml")
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    variants = [
        (threads, busy, passive)
        for busy in (0, args.busy)
        for threads in args.threads
        for passive in ((False, True) if threads > 1 else (False,))
    ]
    seconds: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        order = variants if rep % 2 == 0 else variants[::-1]
        for threads, busy, passive in order:
            name = f"{threads} thread(s), {busy} busy"
            name += ", passive" if passive else ""
            t = one_eval(args.config, threads, busy, passive)
            seconds.setdefault(name, []).append(t)
            print(f"repeat {rep}: {name}: {t:.2f} s", flush=True)
    print(f"\n{cpu_model()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| evaluation | seconds (median) | runs |\n|---|---:|---|")
    for name, values in seconds.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} | {runs} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": cpu_model(), "seconds": seconds}))


if __name__ == "__main__":
    main()
