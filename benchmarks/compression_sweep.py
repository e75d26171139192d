"""Uplink compression on one task: held-out accuracy against bytes sent up.

    PYTHONPATH=. python benchmarks/compression_sweep.py [--config configs/default.toml]
        [--out DIR] [--codecs none fp16 bf16 int8 topk:0.1 topk:0.05] [--reuse]
        [--set key=value ...] [--json out.json]

Runs ``run_simulation.py`` once per codec, one after another (each run uses the
machine's cores), with ``compression.codec`` (and ``compression.topk_fraction`` for
``topk:<fraction>``) set and everything else as in the config. ``--reuse`` keeps a
finished run found in ``DIR/<tag>`` instead of running it again. Prints a Markdown
table: final held-out accuracy, its change against ``none`` in points, total
``bytes_up`` over the run and its ratio to ``none``, the bytes of one reply, and
whether the aggregate is still a plain weighted sum of what clients send (what
secure aggregation needs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from lora_flwr.server.record import (
    BYTES_UP,
    BYTES_UP_MAX,
    FIT_DROPPED,
    ROUND,
    TEST_ACCURACY,
    TEST_LOSS,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CODECS = ["none", "fp16", "bf16", "int8", "topk:0.1", "topk:0.05"]


def parse_codec(text: str) -> tuple[str, float | None]:
    """``"topk:0.05"`` -> ``("topk", 0.05)``; ``"int8"`` -> ``("int8", None)``."""
    name, _, fraction = text.partition(":")
    return name, float(fraction) if fraction else None


def tag_of(text: str) -> str:
    """Run name of a codec (``topk:0.05`` -> ``topk-0.05``)."""
    return "codec-" + text.replace(":", "-")


def finished(run_dir: Path) -> list[dict[str, Any]] | None:
    """The run's history if it finished every round, else None."""
    path = run_dir / "history.json"
    if not path.is_file():
        return None
    history: list[dict[str, Any]] = json.loads(path.read_text())
    with (run_dir / "config.toml").open("rb") as fh:
        rounds = int(tomllib.load(fh)["fed"]["num_rounds"])
    return history if history and history[-1].get(ROUND) == rounds else None


def run_one(
    config: Path, out: Path, codec: str, extra: list[str], reuse: bool
) -> tuple[list[dict[str, Any]], float | None]:
    """Run (or reuse) one codec; return its history and wall seconds."""
    tag = tag_of(codec)
    if reuse:
        history = finished(out / tag)
        if history is not None:
            print(f"# {tag}: reusing {out / tag}", file=sys.stderr, flush=True)
            return history, None
    name, fraction = parse_codec(codec)
    sets = [f"name={tag}", f"output_dir={out}", f"compression.codec={name}"]
    if fraction is not None:
        sets.append(f"compression.topk_fraction={fraction}")
    cmd = [sys.executable, str(ROOT / "run_simulation.py"), "--config", str(config)]
    for item in sets + extra:
        cmd += ["--set", item]
    cmd.append("--overwrite")
    print(f"# {tag}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    history = finished(out / tag)
    if history is None:
        raise RuntimeError(f"{tag}: the run did not finish its rounds")
    return history, seconds


def summarize(codec: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Final accuracy and the uplink bytes of one run."""
    rounds = [r for r in history if r.get(ROUND, 0) > 0]
    last = history[-1]
    return {
        "codec": codec,
        "accuracy": float(last[TEST_ACCURACY]),
        "loss": float(last[TEST_LOSS]),
        "curve": [r.get(TEST_ACCURACY) for r in history],
        "bytes_up": sum(int(r.get(BYTES_UP, 0)) for r in rounds),
        "reply_bytes": max(int(r.get(BYTES_UP_MAX, 0)) for r in rounds),
        "dropped": sum(int(r.get(FIT_DROPPED, 0)) for r in rounds),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table with ratios against the ``none`` row."""
    base = next(r for r in rows if r["codec"] == "none")
    lines = [
        "| codec | final accuracy | vs none (points) | final loss | bytes_up (run) | "
        "ratio | bytes per reply | plain weighted sum | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = 100 * (r["accuracy"] - base["accuracy"])
        seconds = f"{r['seconds']:.0f}" if r.get("seconds") else "-"
        lines.append(
            f"| {r['codec']} | {r['accuracy']:.3f} | {delta:+.1f} | {r['loss']:.4f} | "
            f"{r['bytes_up']:,} | {r['bytes_up'] / base['bytes_up']:.4f} | "
            f"{r['reply_bytes']:,} | {'yes' if r['codec'] == 'none' else 'no'} | "
            f"{seconds} |"
        )
    rounds = len(base["curve"])
    lines += [
        "",
        "| codec | " + " | ".join(f"acc r{i}" for i in range(rounds)) + " |",
        "|---|" + "---|" * rounds,
    ]
    for r in rows:
        cells = " | ".join("-" if a is None else f"{a:.3f}" for a in r["curve"])
        lines.append(f"| {r['codec']} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    """Run the sweep and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/default.toml")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lora-flwr-codecs"))
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if "none" not in args.codecs:
        args.codecs.insert(0, "none")
    rows = []
    for codec in args.codecs:
        history, seconds = run_one(args.config, args.out, codec, args.sets, args.reuse)
        rows.append({**summarize(codec, history), "seconds": seconds})
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
