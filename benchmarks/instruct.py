"""configs/instruct.toml measured: the untuned base, federated LoRA, centralised LoRA.

::

    python benchmarks/instruct.py [--seeds 0 1 2] [--parts base fed central]
        [--out results/instruct-bench] [--set KEY=VALUE ...]

* ``base``: ``python -m lora_flwr.benchmark`` on the untuned SmolLM2-135M-Instruct,
  the config's MMLU sample (same split and per-subject count);
* ``fed``: ``run_simulation.py --config configs/instruct.toml`` per seed;
* ``central``: ``python -m lora_flwr.centralized`` per seed, with as many examples
  as the federated run trains on (rounds x clients per round x local steps steps).

Each part runs in its own process, one after the other, and writes its files
under ``--out``; the script then prints one Markdown table: MMLU under FlowerTune's
protocol and by letter choice, held-out response loss, bytes per round, tokens/s
per client, the rounds' mean wall time and the run's total. Read back from the
files, so ``--parts`` can add a part to earlier results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "instruct.toml"
sys.path.insert(0, str(REPO))

from lora_flwr.config import ExperimentConfig  # noqa: E402
from lora_flwr.server.sampling import sample_count  # noqa: E402


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository, output to ``log``; return its seconds."""
    start = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.run(
            cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}; see {log}")
    return time.perf_counter() - start


def _sets(pairs: list[str]) -> list[str]:
    return [a for s in pairs for a in ("--set", s)]


def run_parts(args: argparse.Namespace, cfg: ExperimentConfig) -> None:
    """Run the asked parts; each writes under ``args.out``."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if "base" in args.parts:
        cmd = [py, "-m", "lora_flwr.benchmark", "--model", cfg.model.name]
        cmd += ["--split", cfg.eval.benchmark_split, "--json", str(out / "base.json")]
        if cfg.eval.benchmark_per_subject:
            cmd += ["--per-subject", str(cfg.eval.benchmark_per_subject)]
        _run(cmd, out / "base.log")
    for seed in args.seeds:
        common = [f"seed={seed}", *args.set]
        if "fed" in args.parts:
            sets = [*common, f"name=fed-s{seed}", f"output_dir={out}"]
            sets.append("on_existing=overwrite")
            seconds = _run(
                [py, "run_simulation.py", "--config", str(CONFIG), *_sets(sets)],
                out / f"fed-s{seed}.log",
            )
            (out / f"fed-s{seed}" / "wall.json").write_text(json.dumps(seconds))
        if "central" in args.parts:
            per_round = sample_count(
                cfg.fed.num_clients, cfg.sampling.fraction, cfg.sampling.min_clients
            )
            steps = cfg.fed.num_rounds * per_round * cfg.train.local_steps
            seconds = _run(
                [py, "-m", "lora_flwr.centralized", "--config", str(CONFIG)]
                + _sets(common)
                + ["--steps", str(steps), "--out", str(out / f"central-s{seed}")],
                out / f"central-s{seed}.log",
            )
            (out / f"central-s{seed}" / "wall.json").write_text(json.dumps(seconds))


def _score(path: Path) -> tuple[float | None, float | None]:
    if not path.is_file():
        return None, None
    report = json.loads(path.read_text())
    return report["average"], report["letter_choice"]["average"]


def _row(label: str, folder: Path | None, bench: Path) -> dict[str, Any]:
    protocol, letters = _score(bench)
    row: dict[str, Any] = {"run": label, "protocol": protocol, "letters": letters}
    if folder is None:
        return row
    wall = folder / "wall.json"
    row["wall_s"] = json.loads(wall.read_text()) if wall.is_file() else None
    history = folder / "history.json"
    data = json.loads(history.read_text()) if history.is_file() else None
    if isinstance(data, list):  # a federated run: one record per round
        rounds = [r for r in data if r.get("round", 0) > 0]
        row["loss0"], row["loss"] = data[0]["test_loss"], rounds[-1]["test_loss"]
        row["bytes_round"] = statistics.mean(
            r["bytes_up"] + r["bytes_down"] for r in rounds
        )
        row["tokens_s"] = sum(r["tokens"] for r in rounds) / sum(
            r["client_seconds_sum"] for r in rounds
        )
        row["round_s"] = statistics.mean(r["round_seconds"] for r in rounds)
    elif isinstance(data, dict):  # centralised: evaluations by step
        row["loss0"] = data["history"][0]["loss"]
        row["loss"] = data["final"]["loss"]
    return row


def table(args: argparse.Namespace) -> str:
    """Markdown table of every part found under ``args.out``."""
    out: Path = args.out
    rows = [_row("untuned base", None, out / "base.json")]
    for seed in args.seeds:
        for part in ("fed", "central"):
            folder = out / f"{part}-s{seed}"
            if folder.is_dir():
                rows.append(
                    _row(f"{part} seed {seed}", folder, folder / "benchmark.json")
                )
    head = (
        "| run | MMLU (protocol) | MMLU (letter choice) | held-out loss start → end "
        "| bytes/round | tokens/s/client | s/round | wall s |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['run']} | {_pct(r['protocol'])} | {_pct(r['letters'])} | "
            f"{_num(r.get('loss0'))} → {_num(r.get('loss'))} | "
            f"{_mb(r.get('bytes_round'))} | {_num(r.get('tokens_s'), 0)} | "
            f"{_num(r.get('round_s'), 1)} | {_num(r.get('wall_s'), 0)} |"
        )
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _num(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _mb(v: float | None) -> str:
    return "–" if v is None else f"{v / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["base", "fed", "central"],
        choices=("base", "fed", "central", "none"),
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "instruct-bench")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE")
    args = parser.parse_args()
    cfg = ExperimentConfig.from_toml(CONFIG).with_overrides(args.set)
    run_parts(args, cfg)
    print(table(args))


if __name__ == "__main__":
    main()
