"""Memory of N processes holding the same base model: shared map vs private copies.

Two measurements, both from the kernel's per-process accounting
(``/proc/<pid>/smaps``): RSS counts every resident page a process maps, PSS splits
each shared page evenly between the processes that map it, so a sum of PSS over
processes counts a page shared by all of them once.

``procs``: starts N real worker processes (``multiprocessing``, spawn). Each builds
the real workspace of the config (``lora_flwr.experiment.get_workspace``: model,
tokenizer, LoRA adapter, trainer), trains ``--steps`` steps on its own client
partition, then waits while the parent reads its memory. ``--mode mapped`` is the
project's load (frozen weights are views of the safetensors file, mapped
copy-on-write); ``--mode private`` then copies every frozen weight into the
process's own memory, which is what each process holds with a loader that copies
(an eager ``torch.load``, a checkpoint stored in another dtype than float32).

``tree``: runs ``run_simulation.py`` as a child and samples its whole process tree
(driver, Ray daemons, client actors) every ``--interval`` seconds: peak of the
summed RSS, peak of the summed PSS, and for the Ray actors the PSS of their maps of
the weights file.

Point ``LORA_FLWR_CACHE`` at a cache that no other program on the machine is
reading, or their maps of the same file take their share of its pages.

    PYTHONPATH=. python benchmarks/shared_weights.py procs \\
        --config configs/shakespeare.toml --procs 2 4 --modes mapped private
    PYTHONPATH=. python benchmarks/shared_weights.py tree \\
        --config configs/shakespeare.toml --set fed.num_rounds=1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6
_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` in bytes (Rss, Pss, Pss_Anon, ...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def file_maps(pid: int, suffix: str = ".safetensors") -> dict[str, int]:
    """Pss, Rss and Private_Dirty bytes of a process's maps of files named ``*suffix``.

    Private_Dirty pages in such a map are pages this process wrote (copy-on-write):
    they are its own copy, no longer the file's.
    """
    totals = {"Pss": 0, "Rss": 0, "Private_Dirty": 0}
    inside = False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            if _HEADER.match(line):
                inside = line.rstrip().endswith(suffix)
            elif inside:
                key, _, rest = line.partition(":")
                if key in totals:
                    totals[key] += int(rest.split()[0]) * 1024
    return totals


# ------------------------------------------------------------------ procs
def _worker(
    config: str,
    overrides: list[str],
    mode: str,
    steps: int,
    index: int,
    ready: Any,
    release: Any,
    results: Any,
) -> None:
    import torch

    torch.set_num_threads(1)  # N processes share the machine's cores
    sys.path.insert(0, str(ROOT))
    from lora_flwr.config import ExperimentConfig
    from lora_flwr.experiment import client_datasets, get_workspace
    from lora_flwr.models.weights import weight_residency

    cfg = ExperimentConfig.from_toml(ROOT / config).with_overrides(overrides)
    pid = os.getpid()
    start = rollup(pid)["Pss"]
    ws = get_workspace(cfg)
    train, _ = client_datasets(
        ws, cfg, index % cfg.fed.num_clients, cfg.fed.num_clients
    )
    loaded = rollup(pid)["Pss"]
    copied = 0
    if mode == "private":
        seen: set[int] = set()
        with torch.no_grad():
            for p in ws.bundle.model.parameters():
                if not p.requires_grad and p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    p.data = p.data.clone()  # what a copying loader leaves
        copied = rollup(pid)["Pss"] - loaded
    ws.trainer.train(train, steps=steps, seed=index, progress=False)
    residency = weight_residency(ws.bundle.model, frozen_only=True)
    unique = {p.data_ptr(): p for p in ws.bundle.model.parameters()}.values()
    results.put(
        {
            "model_bytes": sum(p.numel() * p.element_size() for p in unique),
            "index": index,
            "pid": pid,
            "pss_before_model": start,
            "pss_after_load": loaded,
            "pss_of_copies": copied,
            "frozen_mapped_bytes": residency.mapped_bytes if residency else None,
            "frozen_private_bytes": residency.private if residency else None,
        }
    )
    ready.release()
    release.wait()


def run_procs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start ``n`` workers per (n, mode), measure them all at once, print a table."""
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    for n in args.procs:
        for mode in args.modes:
            ready, release, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
            workers = [
                ctx.Process(
                    target=_worker,
                    args=(args.config, args.overrides, mode, args.steps, i)
                    + (ready, release, results),
                )
                for i in range(n)
            ]
            for w in workers:
                w.start()
            for _ in workers:
                ready.acquire()
            reports = [results.get() for _ in workers]
            model_bytes = reports[0]["model_bytes"]
            time.sleep(1.0)  # let the last worker's writes settle
            procs = []
            for rep in reports:
                mem = rollup(rep["pid"])
                maps = file_maps(rep["pid"])
                procs.append({**rep, **{k: mem[k] for k in ("Rss", "Pss")}})
                procs[-1]["weights_map"] = maps
            release.set()
            for w in workers:
                w.join()
            pss = sum(p["Pss"] for p in procs)
            rss = sum(p["Rss"] for p in procs)
            if mode == "private":
                held = sum(p["pss_of_copies"] + p["weights_map"]["Pss"] for p in procs)
            else:
                held = sum(p["weights_map"]["Pss"] for p in procs)
            dirty = sum(p["weights_map"]["Private_Dirty"] for p in procs)
            loads = sum(p["pss_after_load"] - p["pss_before_model"] for p in procs)
            row = {
                "procs": n,
                "mode": mode,
                "model_bytes": model_bytes,
                "sum_pss": pss,
                "sum_rss": rss,
                "weights_held": held,
                "weights_ratio": held / model_bytes,
                "written_map_pages": dirty,
                "sum_pss_growth_at_load": loads,
                "workers": procs,
            }
            rows.append(row)
            print(
                f"N={n} {mode:>7}: weights held {held / MB:7.1f} MB = "
                f"{held / model_bytes:.2f}x one model; sum PSS {pss / MB:7.1f} MB, "
                f"sum RSS {rss / MB:7.1f} MB; copy-on-write pages "
                f"{dirty / MB:.1f} MB",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------ tree
def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode(errors="replace")


def run_tree(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``run_simulation.py`` and sample its process tree's memory."""
    cmd = [sys.executable, str(ROOT / "run_simulation.py"), "--config", args.config]
    for item in args.overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT)
    peak: dict[str, Any] = {"sum_rss": 0, "sum_pss": 0, "driver_rss": 0}
    actors_at_peak: dict[str, Any] = {"sum_pss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = pss = 0
            actors = []
            for pid in _tree(child.pid):
                try:
                    mem = rollup(pid)
                    if "ray::" in _cmdline(pid) and "ClientAppActor" in _cmdline(pid):
                        actors.append((pid, mem, file_maps(pid)))
                except OSError:
                    continue
                rss += mem.get("Rss", 0)
                pss += mem.get("Pss", 0)
                if pid == child.pid:
                    peak["driver_rss"] = max(peak["driver_rss"], mem.get("Rss", 0))
            peak["sum_rss"] = max(peak["sum_rss"], rss)
            peak["sum_pss"] = max(peak["sum_pss"], pss)
            total = sum(m["Pss"] for _, m, _ in actors)
            if actors and total > actors_at_peak["sum_pss"]:
                actors_at_peak.update(
                    sum_pss=total,
                    n=len(actors),
                    sum_rss=sum(m["Rss"] for _, m, _ in actors),
                    weights_pss=sum(f["Pss"] for _, _, f in actors),
                    weights_rss=[f["Rss"] for _, _, f in actors],
                    written_map_pages=sum(f["Private_Dirty"] for _, _, f in actors),
                )
            done.wait(args.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = child.wait()
    done.set()
    sampler.join()
    summary = {
        "command": cmd,
        "exit_code": code,
        "wall_seconds": time.perf_counter() - start,
        "peak": peak,
        "actors_at_their_peak": actors_at_peak,
    }
    print(
        f"exit {code}, wall {summary['wall_seconds']:.0f} s; peak summed RSS of the "
        f"tree {peak['sum_rss'] / MB:.0f} MB, peak summed PSS "
        f"{peak['sum_pss'] / MB:.0f} MB, "
        f"driver peak RSS {peak['driver_rss'] / MB:.0f} MB"
    )
    if actors_at_peak.get("n"):
        a = actors_at_peak
        print(
            f"{a['n']} client actors at their peak: sum PSS "
            f"{a['sum_pss'] / MB:.0f} MB, "
            f"sum RSS {a['sum_rss'] / MB:.0f} MB; their maps of the weights file: "
            f"PSS {a['weights_pss'] / MB:.1f} MB in all, RSS "
            f"{', '.join(f'{r / MB:.0f}' for r in a['weights_rss'])} MB each, "
            f"copy-on-write pages {a['written_map_pages'] / MB:.1f} MB"
        )
    return summary


def main() -> int:
    """Parse the command line and run one of the two measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    procs = sub.add_parser("procs", help="N worker processes, mapped vs private")
    procs.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    procs.add_argument("--modes", nargs="+", default=["mapped", "private"])
    procs.add_argument("--steps", type=int, default=2)
    tree = sub.add_parser("tree", help="sample run_simulation.py's process tree")
    tree.add_argument("--interval", type=float, default=0.5)
    for p in (procs, tree):
        p.add_argument("--config", default="configs/shakespeare.toml")
        p.add_argument("--set", dest="overrides", action="append", default=[])
        p.add_argument("--json", default=None)
    args = parser.parse_args()
    out = run_procs(args) if args.what == "procs" else run_tree(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
