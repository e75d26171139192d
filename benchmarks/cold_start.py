"""A fresh ClientApp process from start to its first training step, per model build.

    PYTHONPATH=. python benchmarks/cold_start.py [--config configs/default.toml]
        [--repeats 3] [--implementations transformers,native] [--out DIR]

A deployed SuperNode runs every message in a new ``flwr-clientapp`` process, so
this starts one fresh Python process per measurement, as that does, and each
reports the seconds since its parent launched it at these milestones:

* ``interpreter``: the script's first line runs;
* ``flwr``: ``flwr.client`` imported;
* ``client_app``: ``lora_flwr.fl.client_app`` imported (what flwr-clientapp loads);
* ``torch``: ``lora_flwr.experiment`` imported (torch, the data and LoRA code);
* ``task``: the run's task resolved from the corpus (``resolve_model_config``);
* ``model``: the workspace built (base model, tokenizer, LoRA adapter, trainer);
* ``data``: the node's tokenized partition ready (a partition-cache hit: one
  unmeasured warm-up process per implementation fills the cache first);
* ``first_step``: one optimiser step of local training done.

Implementations alternate within each repeat (interleaved, so a load change on a
shared machine hits both alike); the table gives medians, the ratio of the
transformers build to the native one, the peak RSS and whether transformers was
imported; a second table gives the same milestones in CPU seconds of the child
(user + system), which other processes on a shared machine disturb far less than
wall time. One torch thread per process (``compute.num_threads = 1``), as a node
started with ``--node-config "num-threads=1"`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MILESTONES = (
    "interpreter",
    "flwr",
    "client_app",
    "torch",
    "task",
    "model",
    "data",
    "first_step",
)
T0_ENV = "LORA_FLWR_COLD_START_T0"


def child(config: Path, implementation: str, partition: int) -> None:
    """Walk one fresh process to its first step; print the milestones as JSON."""
    t0 = float(os.environ[T0_ENV])
    marks: dict[str, float] = {"interpreter": time.time() - t0}
    cpu: dict[str, float] = {"interpreter": _cpu_seconds()}
    import flwr.client  # noqa: F401

    marks["flwr"] = time.time() - t0
    cpu["flwr"] = _cpu_seconds()
    import lora_flwr.fl.client_app  # noqa: F401

    marks["client_app"] = time.time() - t0
    cpu["client_app"] = _cpu_seconds()
    from lora_flwr.config import ExperimentConfig
    from lora_flwr.experiment import (
        client_datasets,
        get_workspace,
        resolve_model_config,
    )

    marks["torch"] = time.time() - t0
    cpu["torch"] = _cpu_seconds()  # lora_flwr.experiment imports torch

    cfg = ExperimentConfig.from_toml(config)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, implementation=implementation),
        compute=dataclasses.replace(cfg.compute, num_threads=1),
    )
    resolve_model_config(cfg)
    marks["task"] = time.time() - t0
    cpu["task"] = _cpu_seconds()
    ws = get_workspace(cfg)
    marks["model"] = time.time() - t0
    cpu["model"] = _cpu_seconds()
    train, _ = client_datasets(ws, cfg, partition, cfg.fed.num_clients)
    marks["data"] = time.time() - t0
    cpu["data"] = _cpu_seconds()
    ws.trainer.train(train, steps=1, seed=0, progress=False)
    marks["first_step"] = time.time() - t0
    cpu["first_step"] = _cpu_seconds()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "marks": marks,
                "cpu": cpu,
                "peak_rss_mb": peak_kb / 1024,
                "transformers_imported": "transformers" in sys.modules,
                "model_class": f"{type(ws.bundle.model).__module__}",
            }
        )
    )


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(config: Path, implementation: str, partition: int) -> dict[str, object]:
    """Launch one fresh process and return what it printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), T0_ENV: repr(time.time())}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--config",
        str(config),
        "--implementations",
        implementation,
        "--partition",
        str(partition),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{implementation} child failed:\n{out.stderr[-3000:]}")
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def table(results: dict[str, list[dict[str, object]]], kind: str = "marks") -> str:
    """Markdown table: median seconds per milestone and implementation, ratios.

    ``kind`` is ``"marks"`` (wall seconds since launch) or ``"cpu"`` (the child's
    CPU seconds: less sensitive to other processes on a shared machine).
    """
    impls = list(results)
    what = "wall s from launch" if kind == "marks" else "CPU s of the process"
    head = f"| milestone ({what}) | " + " | ".join(impls)
    if len(impls) == 2:
        head += f" | {impls[0]} / {impls[1]}"
    lines = [head + " |", "|---" * (len(impls) + 1 + (len(impls) == 2)) + "|"]

    def median(impl: str, key: str) -> float:
        return statistics.median(
            float(r[kind][key])  # type: ignore[index]
            for r in results[impl]
        )

    for key in MILESTONES:
        values = [median(impl, key) for impl in impls]
        row = f"| {key} | " + " | ".join(f"{v:.2f}" for v in values)
        if len(impls) == 2:
            row += f" | {values[0] / values[1]:.2f}x"
        lines.append(row + " |")
    rss = [
        statistics.median(float(r["peak_rss_mb"]) for r in results[impl])  # type: ignore[arg-type]
        for impl in impls
    ]
    lines.append("| peak RSS (MB) | " + " | ".join(f"{v:.0f}" for v in rss) + " |")
    imported = [str(results[impl][0]["transformers_imported"]) for impl in impls]
    lines.append("| transformers imported | " + " | ".join(imported) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; run the children (or be one)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/default.toml")
    parser.add_argument("--implementations", default="transformers,native")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--partition", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write results.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    impls = [s.strip() for s in args.implementations.split(",") if s.strip()]
    if args.child:
        child(args.config, impls[0], args.partition)
        return
    for impl in impls:  # warm-up: fills the partition cache and the page cache
        run_child(args.config, impl, args.partition)
    results: dict[str, list[dict[str, object]]] = {impl: [] for impl in impls}
    for rep in range(args.repeats):
        for impl in impls:
            result = run_child(args.config, impl, args.partition)
            results[impl].append(result)
            marks = result["marks"]
            print(f"repeat {rep} {impl}: {json.dumps(marks)}", flush=True)
    print(table(results))
    print()
    print(table(results, "cpu"))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cold_start.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
