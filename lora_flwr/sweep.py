r"""Run named variants of one experiment over data splits and seeds; report them.

    python -m lora_flwr.sweep --config configs/label_skew.toml \\
        --variants configs/label_skew_variants.toml --splits 0.1,0.5,natural --seeds 3

A variant is a named list of ``--set`` overrides (a server optimizer, a loss, a
head treatment, ...), read from a TOML file of tables::

    [fedlc]
    about = "logit calibration by the client's label counts"
    overrides = ["loss.name=fedlc", "loss.tau=1.0"]

A split is ``natural``, ``iid`` or a Dirichlet concentration over labels such as
``0.1``. Every (split, variant, seed) is one ``lora_flwr.simulation`` process, run
as :mod:`lora_flwr.compare` runs its rules (finished runs with the same saved
config are reused, so an interrupted sweep resumes), plus the centralised LoRA
reference on the same training pool. The report goes between its own markers in
``--out`` (text outside them is kept): per split a table of final and best
held-out accuracy (mean ± std over seeds), rounds to the target, and the final
model on every client's local split; and a plot of accuracy against round for the
``--plot-split``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lora_flwr.compare import (
    SKEW,
    RunSpec,
    Summary,
    gather_runs,
    machine,
    reference_line,
    skew_label,
    skew_overrides,
    summarize_runs,
    table,
    write_report,
)
from lora_flwr.config import (
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
)
from lora_flwr.server.record import ROUND

BEGIN = "<!-- lora_flwr.sweep: begin (generated; edit outside the markers) -->"
END = "<!-- lora_flwr.sweep: end -->"


@dataclass(frozen=True)
class Variant:
    """A named set of overrides on top of the sweep's config."""

    name: str
    overrides: tuple[str, ...]
    about: str = ""


def read_variants(path: Path, base: ExperimentConfig) -> list[Variant]:
    """Read the variants file; every variant's overrides are checked on ``base``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For a file that is not TOML tables of ``overrides`` (and ``about``), a
        name that cannot be a folder, or an override the config refuses (the
        variant is named).
    """
    if not path.is_file():
        raise FileNotFoundError(f"variants file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"variants file {path}: {exc}") from exc
    out: list[Variant] = []
    for name, table_ in data.items():
        if not isinstance(table_, dict) or set(table_) - {"overrides", "about"}:
            raise ValueError(
                f"variants file {path}: [{name}] should be a table with "
                "'overrides' (a list of 'key=value' strings) and optional 'about'"
            )
        overrides = table_.get("overrides", [])
        if not isinstance(overrides, list) or not all(
            isinstance(o, str) for o in overrides
        ):
            raise ValueError(
                f"variants file {path}: [{name}].overrides should be a list of "
                f"'key=value' strings but is {overrides!r}"
            )
        try:
            replace(base.with_overrides(overrides), name=name)
        except ValueError as exc:
            raise ValueError(f"variant {name!r} in {path}: {exc}") from exc
        out.append(Variant(name, tuple(overrides), str(table_.get("about", ""))))
    if not out:
        raise ValueError(f"variants file {path} defines no variant")
    return out


def split_overrides(split: str) -> list[str]:
    """Return the overrides of a split: ``natural``, ``iid`` or a Dirichlet alpha.

    Raises
    ------
    ValueError
        For anything else, or an alpha that is not a positive number.
    """
    if split in ("natural", "iid"):
        return [f"data.partitioner={split}"]
    try:
        alpha = float(split)
    except ValueError:
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"split {split!r} should be 'natural', 'iid' or a Dirichlet alpha > 0 "
            "such as '0.1'"
        )
    return skew_overrides(alpha)


def split_label(split: str) -> str:
    """Folder and heading name of a split (``alpha0.1``, ``natural``)."""
    return split if split in ("natural", "iid") else skew_label(float(split))


def plan_sweep(
    cfg: ExperimentConfig,
    variants: Sequence[Variant],
    splits: Sequence[str],
    seeds: Sequence[int],
    work: Path,
) -> list[RunSpec]:
    """Every (split, variant, seed) run; seed by seed, so early results are whole."""
    specs = []
    for seed in seeds:
        for split in splits:
            for variant in variants:
                run_cfg = cfg.with_overrides(
                    [*split_overrides(split), *variant.overrides, f"seed={seed}"]
                )
                run_cfg = replace(
                    run_cfg,
                    name=f"{variant.name}-s{seed}",
                    output_dir=str(work / split_label(split)),
                )
                specs.append(RunSpec(split_label(split), variant.name, seed, run_cfg))
    return specs


def plot_curves(summaries: Sequence[Summary], path: Path, title: str) -> None:
    """Held-out accuracy (mean over seeds) against round, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_flwr.results import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        ax.plot(*zip(*s.curve, strict=True), marker="o", markersize=3, label=s.rule)
    ax.set_xlabel(ROUND)
    ax.set_ylabel("held-out accuracy, mean over seeds")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def report_body(
    cfg: ExperimentConfig,
    variants: Sequence[Variant],
    specs: Sequence[RunSpec],
    dirs: Mapping[RunSpec, Path],
    refs: Sequence[Path],
    *,
    target: float,
    plot_split: str,
    out: Path,
    command: str,
    started: float,
) -> str:
    """Build the generated block: provenance, variants, one table per split, a plot."""
    fed, train, sampling = cfg.fed, cfg.train, cfg.sampling
    seeds = sorted({s.seed for s in specs})
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {dt.date.today().isoformat()}; the sweep took "
        f"{(time.time() - started) / 60:.0f} min (reused runs not counted).  ",
        f"Task: `{cfg.model.name}` on `{cfg.data.name}`, {fed.num_clients} clients, "
        f"{sampling.fraction:g} of them per round, {fed.num_rounds} rounds of "
        f"{train.local_steps} local steps of batch {train.batch_size}, lr "
        f"{train.lr:g}, rule `{fed.aggregation}` (unless a variant says otherwise). "
        f"Seeds {seeds}: a seed fixes the init, the split and every round's "
        "clients, the same for every variant.",
        "",
        "Variants:",
        "",
    ]
    for v in variants:
        what = ", ".join(f"`{o}`" for o in v.overrides) or "the config as is"
        lines.append(f"- **{v.name}**: {what}" + (f" ({v.about})" if v.about else ""))
    lines += [
        "",
        "Columns as in the rule comparison: final and best held-out accuracy (mean "
        "± std over seeds), rounds and seconds to the target over the seeds that "
        "reached it, bytes per round, wall time; local splits: the final model on "
        "every client's own test split, example-weighted (with `head.mode=local` "
        "each client's own head; the held-out columns then use the seeded head).",
    ]
    figures = out.parent / "results"
    for split in sorted({s.setting for s in specs}, key=_split_order):
        group = [s for s in specs if s.setting == split]
        summaries = summarize_runs(group, dirs, target)
        lines += ["", f"#### {split}", "", table(summaries, target, label="variant")]
        if split == split_label(plot_split):
            png = figures / f"sweep-{split}-round.png"
            plot_curves(summaries, png, f"{cfg.data.name}, {split}")
            rel = os.path.relpath(png, out.parent)
            lines += ["", f"![{split}: held-out accuracy vs round]({rel})"]
    if refs:
        lines += ["", reference_line(refs, train.batch_size)]
    return "\n".join(lines) + "\n"


def _split_order(label: str) -> tuple[int, float]:
    if label.startswith(SKEW):
        return 0, float(label[len(SKEW) :])
    return 1, 0.0


def _parser() -> argparse.ArgumentParser:
    """Build the command line (the config's own options included)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--variants", required=True, help="TOML file of variants")
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument(
        "--splits", default="0.1", help="comma-separated: natural, iid or an alpha"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--target", type=float, default=0.75, help="accuracy goal")
    parser.add_argument("--plot-split", default="0.1", help="split of the plot")
    parser.add_argument(
        "--ref-steps",
        type=int,
        default=None,
        help="centralised steps (default: rounds x clients/round x local steps; "
        "0 skips the reference)",
    )
    parser.add_argument("--work", default="results/sweep", help="run directories")
    parser.add_argument("--out", default="docs/RESULTS.md", help="report file")
    parser.add_argument("--fresh", action="store_true", help="recompute every run")
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing; report what finished"
    )
    return parser


def _check_arguments(
    args: argparse.Namespace,
) -> tuple[ExperimentConfig, list[Variant], list[str]]:
    """Return the config, the chosen variants and the splits the arguments name.

    Raises
    ------
    FileNotFoundError
        If the config or the variants file does not exist.
    ValueError
        For a bad override, variant, ``--only`` name, split or ``--seeds``.
    """
    cfg = config_from_arguments(args)
    variants = read_variants(Path(args.variants), cfg)
    only = [v for v in args.only.split(",") if v]
    unknown = sorted(set(only) - {v.name for v in variants})
    if unknown:
        raise ValueError(
            f"`--only` names {unknown}, not in {args.variants}: "
            f"{[v.name for v in variants]}"
        )
    if only:
        variants = [v for v in variants if v.name in only]
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    for split in splits:
        split_overrides(split)
    if args.seeds < 1:
        raise ValueError(f"`--seeds` should be >= 1 but is {args.seeds}")
    return cfg, variants, splits


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    try:
        cfg, variants, splits = _check_arguments(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    work, out = Path(args.work), Path(args.out)
    seeds = list(range(args.seeds))
    started = time.time()
    specs = plan_sweep(cfg, variants, splits, seeds, work)
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
    command = "python -m lora_flwr.sweep " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    body = report_body(
        cfg,
        variants,
        specs,
        dirs,
        refs,
        target=args.target,
        plot_split=args.plot_split,
        out=out,
        command=command,
        started=started,
    )
    write_report(out, body, begin=BEGIN, end=END)
    print(f"[sweep] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
