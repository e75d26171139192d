"""Compare every aggregation rule on one task, with the same seeds and client samples.

    python -m lora_flwr.compare --config configs/default.toml --seeds 3

Runs each registered rule for each seed (one ``lora_flwr.simulation`` process per
run, so every run starts from a fresh Ray), then the rules that take
heterogeneous ranks again with rank tiers (``--tiers 4,8,16``), every rule again
on a Dirichlet label-skew split (``--skew 0.1``: most clients then hold one
class, where plain FedAvg of LoRA collapses), and the
centralised LoRA reference on the same training pool with the same number of
optimiser steps as one round's clients together times the rounds. A seed fixes
the adapter init, the data split and the client sample of every round, so all
rules see the same clients. It writes, between two markers in ``--out`` (text
outside them is kept), the command, machine and date, a table per setting and
two plots per setting (accuracy vs round, accuracy vs cumulative bytes).

Finished runs are reused when their saved config equals the one asked for (an
interrupted comparison resumes); ``--fresh`` recomputes everything.

This module plans and runs; :mod:`lora_flwr.compare_report` turns the histories into
summaries, tables, plots and the report block (its names are importable from here).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_flwr.aggregation import available_rules, get_rule
from lora_flwr.atomic import write_text_atomic
from lora_flwr.compare_report import (
    BEGIN,
    END,
    Summary,
    machine,
    metric_key,
    plot,
    reference_line,
    summarize,
    table,
    write_report,
)
from lora_flwr.config import (
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
)
from lora_flwr.server.record import PERSONAL_ACCURACY, ROUND

__all__ = [
    "BEGIN",
    "END",
    "HOMOGENEOUS",
    "SKEW",
    "TIERS",
    "RunSpec",
    "Summary",
    "gather_runs",
    "local_accuracy",
    "machine",
    "main",
    "metric_key",
    "plan_runs",
    "plot",
    "reference_line",
    "report_body",
    "run_one",
    "run_reference",
    "skew_label",
    "skew_overrides",
    "summarize",
    "summarize_runs",
    "table",
    "write_report",
]

HOMOGENEOUS = "homogeneous"
TIERS = "tiers"
SKEW = "alpha"  # + the Dirichlet concentration, e.g. "alpha0.1"


@dataclass(frozen=True)
class RunSpec:
    """One federated run of the comparison."""

    setting: str
    rule: str
    seed: int
    cfg: ExperimentConfig


def plan_runs(
    cfg: ExperimentConfig,
    *,
    rules: Sequence[str],
    seeds: Sequence[int],
    tiers: Sequence[int],
    work: Path,
    skews: Sequence[float] = (),
) -> list[RunSpec]:
    """Every (setting, rule, seed) run, each with its own name and output dir.

    Settings: every rule as configured; the rank-tier rules with ``tiers``; and
    every rule again on a Dirichlet(alpha) label split for each alpha in ``skews``.
    """
    specs: list[RunSpec] = []
    settings: list[tuple[str, list[str], list[str]]] = [(HOMOGENEOUS, list(rules), [])]
    if tiers:
        tier_rules = [r for r in rules if get_rule(r).supports_rank_tiers]
        over = [f"fed.rank_tiers={','.join(map(str, tiers))}", f"lora.r={max(tiers)}"]
        if tier_rules:
            settings.append((TIERS, tier_rules, over))
    for alpha in skews:
        settings.append((skew_label(alpha), list(rules), skew_overrides(alpha)))
    # Seed by seed, so that an interrupted comparison has every rule at seed 0.
    for seed in seeds:
        for setting, names, overrides in settings:
            for rule in names:
                run_cfg = cfg.with_overrides(
                    [*overrides, f"fed.aggregation={rule}", f"seed={seed}"]
                )
                run_cfg = dataclasses.replace(
                    run_cfg, name=f"{rule}-s{seed}", output_dir=str(work / setting)
                )
                specs.append(RunSpec(setting, rule, seed, run_cfg))
    return specs


def skew_overrides(alpha: float) -> list[str]:
    """Return the overrides that split the labels by Dirichlet(``alpha``)."""
    return ["data.partitioner=dirichlet", f"data.dirichlet_alpha={alpha:g}"]


def skew_label(alpha: float) -> str:
    """Return the setting name of a Dirichlet label split (``alpha0.1``)."""
    return f"{SKEW}{alpha:g}"


def _complete(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``cfg``."""
    try:
        saved = ExperimentConfig.from_toml(run_dir / "config.toml")
        history = json.loads((run_dir / "history.json").read_text())
        json.loads((run_dir / "wall.json").read_text())
    except (OSError, ValueError):
        return False
    rounds = [r for r in history if r.get(ROUND, 0) > 0]
    # The child ran with --overwrite: how it treated the directory is not the run.
    saved = dataclasses.replace(saved, on_existing=cfg.on_existing)
    return saved == cfg and len(rounds) == cfg.fed.num_rounds


def run_one(spec: RunSpec, *, fresh: bool = False) -> Path:
    """Run one simulation in a child process (unless already done); return its dir.

    Raises
    ------
    RuntimeError
        If the child process fails; its exit code and run dir are named.
    """
    run_dir = Path(spec.cfg.output_dir) / spec.cfg.name
    if not fresh and _complete(run_dir, spec.cfg):
        print(f"[compare] reuse {run_dir}", flush=True)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # A wall time left by an interrupted earlier attempt must not outlive it.
    (run_dir / "wall.json").unlink(missing_ok=True)
    config_path = run_dir.parent / f"{spec.cfg.name}.toml"
    write_text_atomic(config_path, spec.cfg.to_toml())
    print(f"[compare] run {spec.setting} {spec.rule} seed {spec.seed}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_flwr.simulation",
            "--config",
            str(config_path),
            "--overwrite",  # an unfinished attempt of this very run
        ],
        check=False,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{spec.setting}/{spec.rule}/seed {spec.seed} failed with exit code "
            f"{proc.returncode}; see the log above and {run_dir}"
        )
    write_text_atomic(run_dir / "wall.json", json.dumps({"seconds": seconds}))
    return run_dir


def run_reference(cfg: ExperimentConfig, seed: int, steps: int, work: Path) -> Path:
    """Centralised LoRA on the whole training pool (child process); return its dir."""
    ref_cfg = dataclasses.replace(
        cfg.with_overrides([f"seed={seed}"]),
        name=f"centralized-s{seed}",
        output_dir=str(work),
    )
    out = work / ref_cfg.name
    try:
        done = json.loads((out / "history.json").read_text())
        saved = ExperimentConfig.from_toml(out / "config.toml")
        if saved == ref_cfg and done["history"][-1]["step"] == steps:
            print(f"[compare] reuse {out}", flush=True)
            return out
    except (OSError, ValueError, KeyError, IndexError):
        pass
    config_path = work / f"{ref_cfg.name}.toml"
    write_text_atomic(config_path, ref_cfg.to_toml())
    print(f"[compare] centralized reference seed {seed}, {steps} steps", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "lora_flwr.centralized",
        "--config",
        str(config_path),
        "--steps",
        str(steps),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"centralized reference seed {seed} failed; see {out}")
    return out


def gather_runs(
    cfg: ExperimentConfig,
    specs: Sequence[RunSpec],
    seeds: Sequence[int],
    work: Path,
    *,
    ref_steps: int | None,
    report_only: bool,
    fresh: bool,
) -> tuple[list[RunSpec], dict[RunSpec, Path], list[Path]] | None:
    """Run (or, with ``report_only``, find) every run and the centralised references.

    ``ref_steps`` None means one round's clients' steps times the rounds; 0 skips
    the reference. Returns the runs to report, their directories and the
    reference directories; None when ``report_only`` finds no finished run.
    """
    if report_only:
        dirs = {
            spec: Path(spec.cfg.output_dir) / spec.cfg.name
            for spec in specs
            if _complete(Path(spec.cfg.output_dir) / spec.cfg.name, spec.cfg)
        }
        refs = [
            p
            for p in (work / "centralized" / f"centralized-s{s}" for s in seeds)
            if (p / "history.json").is_file()
        ]
        done = [spec for spec in specs if spec in dirs]
        return (done, dirs, refs) if done else None
    if ref_steps is None:
        per_round = max(
            math.ceil(cfg.sampling.fraction * cfg.fed.num_clients),
            cfg.sampling.min_clients,
        )
        ref_steps = cfg.fed.num_rounds * per_round * cfg.train.local_steps
    dirs = {spec: run_one(spec, fresh=fresh) for spec in specs}
    refs = (
        [run_reference(cfg, s, ref_steps, work / "centralized") for s in seeds]
        if ref_steps > 0
        else []
    )
    return list(specs), dirs, refs


def local_accuracy(spec: RunSpec, run_dir: Path) -> float | None:
    """Accuracy of a run's final model on every client's local test split.

    The example-weighted mean over clients: the same splits FedSA's personalised
    evaluation uses, so every rule can be set beside it. For FedSA it is that
    evaluation (each client's own B), read from the history. Cached in
    ``local_eval.json``; None for tasks without accuracy.
    """
    cache = run_dir / "local_eval.json"
    if cache.is_file():
        value = json.loads(cache.read_text()).get("accuracy")
        return None if value is None else float(value)
    cfg = spec.cfg
    history = json.loads((run_dir / "history.json").read_text())
    accuracy: float | None
    # Clients hold a part the saved adapter lacks (FedSA's B, a local head): the
    # run's own per-client evaluation is the only one there is.
    if get_rule(cfg.fed.aggregation).personalized or cfg.head.mode == "local":
        last = [r[PERSONAL_ACCURACY] for r in history if PERSONAL_ACCURACY in r]
        accuracy = float(last[-1]) if last else None
    else:
        from lora_flwr.experiment import client_datasets, get_workspace
        from lora_flwr.lora import load_base_delta

        ws = get_workspace(cfg)
        if ws.task != "seq_cls":
            return None
        delta_file = run_dir / "adapter" / "base_delta.safetensors"
        ws.reset_adapter()
        ws.adapter.set_base_delta(
            load_base_delta(delta_file) if delta_file.is_file() else None
        )
        ws.adapter.load(run_dir / "adapter")
        correct = total = 0.0
        for pid in range(cfg.fed.num_clients):
            _, test = client_datasets(ws, cfg, pid, cfg.fed.num_clients)
            if len(test) == 0:
                continue
            metrics = ws.trainer.evaluate(test, progress=False)
            correct += metrics["accuracy"] * len(test)
            total += len(test)
        ws.reset_adapter()
        accuracy = correct / total if total else None
    write_text_atomic(cache, json.dumps({"accuracy": accuracy}))
    return accuracy


# ---------------------------------------------------------------------- report
def summarize_runs(
    specs: Sequence[RunSpec], dirs: Mapping[RunSpec, Path], target: float | None
) -> list[Summary]:
    """Summarize the runs of one setting: one :class:`Summary` per rule, in order.

    Reads each run's ``history.json`` and ``wall.json`` from ``dirs`` and its
    :func:`local_accuracy` (computed once, then cached beside the run).
    """
    by_rule: dict[str, list[RunSpec]] = {}
    for spec in specs:
        by_rule.setdefault(spec.rule, []).append(spec)
    summaries = []
    for rule, runs in by_rule.items():
        histories = [json.loads((dirs[r] / "history.json").read_text()) for r in runs]
        walls = [
            json.loads((dirs[r] / "wall.json").read_text())["seconds"] for r in runs
        ]
        local = [v for v in (local_accuracy(r, dirs[r]) for r in runs) if v is not None]
        summaries.append(summarize(rule, histories, walls, target=target, local=local))
    return summaries


def _setting_order(setting: str) -> tuple[int, float]:
    if setting == HOMOGENEOUS:
        return 0, 0.0
    if setting == TIERS:
        return 1, 0.0
    return 2, -float(setting[len(SKEW) :])


def _provenance(
    cfg: ExperimentConfig, specs: Sequence[RunSpec], command: str, started: float
) -> list[str]:
    """Return the report's opening lines: command, machine, date, task, columns."""
    fed, train, sampling = cfg.fed, cfg.train, cfg.sampling
    return [
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {dt.date.today().isoformat()}; the comparison took "
        f"{(time.time() - started) / 60:.0f} min (reused runs not counted).  ",
        f"Task: `{cfg.model.name}` on `{cfg.data.name}`, {fed.num_clients} clients "
        f"({cfg.data.partitioner} split), {sampling.fraction:g} of them per round, "
        f"{fed.num_rounds} rounds of {train.local_steps} local steps of batch "
        f"{train.batch_size}, lr {train.lr:g}, LoRA r={cfg.lora.r}, "
        f"precision {cfg.compute.precision}. Seeds "
        f"{sorted({s.seed for s in specs})}: a "
        "seed fixes the init, the split and every round's clients, the same for "
        "every rule.",
        "",
        "Columns: final and best value of the headline metric (mean ± std over "
        "seeds); rounds and seconds (sum of round wall times) to reach the target, "
        "over the seeds that reached it; exact serialized training bytes per round "
        "(evaluation payloads excluded); the aggregation error "
        "‖ΔW_global − Σ p_k s B_k A_k‖_F / ‖Σ p_k s B_k A_k‖_F "
        "(mean over rounds and modules); wall time of the whole run process; "
        "local splits: the final model on every client's own test split "
        "(example-weighted; for fedsa each client's personalised model, its "
        "headline value), so fedsa can be set beside the others.",
    ]


def _setting_title(setting: str, group: Sequence[RunSpec], r: int) -> str:
    """Return the heading of one setting's section (``r``: the configured rank)."""
    if setting == HOMOGENEOUS:
        return f"all rules, every client at r={r}"
    if setting == TIERS:
        return "rank tiers " + ",".join(map(str, group[0].cfg.fed.rank_tiers))
    return (
        f"label skew, Dirichlet alpha={group[0].cfg.data.dirichlet_alpha:g} "
        f"over labels, every client at r={r}"
    )


def _setting_section(
    cfg: ExperimentConfig,
    setting: str,
    group: Sequence[RunSpec],
    dirs: Mapping[RunSpec, Path],
    target: float | None,
    out: Path,
) -> list[str]:
    """One setting's heading, table and plots (written beside ``out``)."""
    summaries = summarize_runs(group, dirs, target)
    title = _setting_title(setting, group, cfg.lora.r)
    lines = ["", f"### {setting}: {title}", "", table(summaries, target)]
    figures = out.parent / "results"
    png_round = figures / f"{setting}-round.png"
    png_bytes = figures / f"{setting}-bytes.png"
    plot(summaries, png_round, png_bytes)
    rel = os.path.relpath(figures, out.parent)
    lines += [
        "",
        f"![{setting}: accuracy vs round]({rel}/{png_round.name}) "
        f"![{setting}: accuracy vs cumulative bytes]({rel}/{png_bytes.name})",
    ]
    if any(get_rule(s.rule).personalized for s in summaries):
        lines += [
            "",
            "fedsa has no global model: its value is each client's "
            "personalised model on its own local split (example-weighted), "
            "not the global held-out split.",
        ]
    return lines


def report_body(
    cfg: ExperimentConfig,
    specs: Sequence[RunSpec],
    dirs: Mapping[RunSpec, Path],
    refs: Sequence[Path],
    target: float | None,
    out: Path,
    command: str,
    started: float,
) -> str:
    """Build the generated part of the report: provenance, tables, plots."""
    lines = _provenance(cfg, specs, command, started)
    for setting in sorted({s.setting for s in specs}, key=_setting_order):
        group = [s for s in specs if s.setting == setting]
        lines += _setting_section(cfg, setting, group, dirs, target, out)
    if refs:
        lines += ["", reference_line(refs, cfg.train.batch_size)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main
def _parse_ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    """Build the command line (the config's own options included)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--rules", default="", help="comma-separated (default: all)")
    parser.add_argument("--tiers", default="4,8,16", help="rank tiers ('' to skip)")
    parser.add_argument(
        "--skew",
        default="0.1",
        help="Dirichlet label-skew alphas, every rule again on each ('' to skip)",
    )
    parser.add_argument("--target", type=float, default=0.75, help="accuracy goal")
    parser.add_argument(
        "--ref-steps",
        type=int,
        default=None,
        help="centralised steps (default: rounds x clients/round x "
        "local steps; 0 skips the reference)",
    )
    parser.add_argument("--work", default="results/compare", help="run directories")
    parser.add_argument("--out", default="docs/RESULTS.md", help="report file")
    parser.add_argument("--fresh", action="store_true", help="recompute every run")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: report the finished runs (a comparison still under way)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    try:
        cfg = config_from_arguments(args)
        rules = [r for r in args.rules.split(",") if r] or available_rules()
        for rule in rules:
            get_rule(rule)
        tiers = _parse_ints(args.tiers)
        skews = [float(t) for t in args.skew.split(",") if t.strip()]
        if not all(math.isfinite(a) and a > 0 for a in skews):
            raise ValueError(f"`--skew` should hold alphas > 0 but is {args.skew!r}")
        if args.seeds < 1:
            raise ValueError(f"`--seeds` should be >= 1 but is {args.seeds}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    work = Path(args.work)
    out = Path(args.out)
    seeds = list(range(args.seeds))
    started = time.time()
    specs = plan_runs(
        cfg, rules=rules, seeds=seeds, tiers=tiers, work=work, skews=skews
    )
    found = gather_runs(
        cfg,
        specs,
        seeds,
        work,
        ref_steps=args.ref_steps,
        report_only=args.report_only,
        fresh=args.fresh,
    )
    if found is None:
        print(f"error: no finished run under {work}", file=sys.stderr)
        return 2
    specs, dirs, refs = found
    command = "python -m lora_flwr.compare " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    body = report_body(cfg, specs, dirs, refs, args.target, out, command, started)
    write_report(out, body)
    print(f"[compare] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
