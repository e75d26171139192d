"""The comparison's numbers and text: summaries over seeds, tables, plots, report block.

:mod:`lora_flwr.compare` and :mod:`lora_flwr.sweep` run the experiments; this module
turns their histories into a :class:`Summary` per rule (or variant), formats the
markdown table and the plots, and replaces the generated block of a report file
between its two markers. It knows nothing of how the runs were planned.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_flwr.atomic import write_text_atomic
from lora_flwr.machine import cpu_model_name
from lora_flwr.server.record import (
    AGG_ERROR,
    BYTES_DOWN,
    BYTES_DOWN_CALIB,
    BYTES_DOWN_EVAL,
    BYTES_UP,
    BYTES_UP_CALIB,
    CALIB_SECONDS,
    PERSONAL_ACCURACY,
    PERSONAL_PERPLEXITY,
    ROUND,
    ROUND_SECONDS,
    TEST_ACCURACY,
    TEST_PERPLEXITY,
)

BEGIN = "<!-- lora_flwr.compare: begin (generated; edit outside the markers) -->"
END = "<!-- lora_flwr.compare: end -->"


def metric_key(history: Sequence[Mapping[str, Any]]) -> str:
    """Return the headline metric: held-out, else personalised, accuracy or ppl."""
    for key in (TEST_ACCURACY, PERSONAL_ACCURACY, TEST_PERPLEXITY, PERSONAL_PERPLEXITY):
        if any(r.get(key) is not None for r in history):
            return key
    raise ValueError("the history holds no accuracy or perplexity")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, math.sqrt(var)


@dataclass(frozen=True)
class Summary:
    """One rule in one setting, over seeds."""

    rule: str
    metric: str
    seeds: int
    final: tuple[float, float]
    best: tuple[float, float]
    reached: int  # seeds that reached the target
    rounds_to_target: float  # mean over the seeds that reached it
    seconds_to_target: float
    bytes_up: float  # mean per round
    bytes_down: float
    agg_error: float | None
    wall: float
    local: tuple[float, float] | None  # final model on the clients' local splits
    curve: list[tuple[int, float]]  # (round, mean metric) where every seed has one
    cum_bytes: list[float]  # mean cumulative bytes up + down after each round


def _up(record: Mapping[str, Any]) -> float:
    """Bytes clients sent in a round: replies, and class statistics for a refit."""
    return float(record.get(BYTES_UP, 0)) + float(record.get(BYTES_UP_CALIB, 0))


def _down(record: Mapping[str, Any]) -> float:
    """Training bytes sent to clients in a round, a head refit's payloads included.

    Evaluation payloads (FedSA evaluates every client) are not part of a method's
    communication cost; the payloads of a head refit (head.calibration) are.
    """
    return (
        float(record.get(BYTES_DOWN, 0))
        - float(record.get(BYTES_DOWN_EVAL, 0))
        + float(record.get(BYTES_DOWN_CALIB, 0))
    )


def summarize(
    rule: str,
    histories: Sequence[Sequence[Mapping[str, Any]]],
    walls: Sequence[float],
    *,
    target: float | None,
    local: Sequence[float] = (),
) -> Summary:
    """Aggregate the histories of one rule's seeds."""
    key = metric_key(histories[0])
    higher = key.endswith("accuracy")
    finals, bests, rounds_hit, secs_hit = [], [], [], []
    ups, downs, errors = [], [], []
    curves: list[dict[int, float]] = []
    cums: list[list[float]] = []
    for history in histories:
        points = [
            (int(r[ROUND]), float(r[key])) for r in history if r.get(key) is not None
        ]
        values = [v for _, v in points]
        finals.append(values[-1])
        bests.append(max(values) if higher else min(values))
        rounds = [r for r in history if r.get(ROUND, 0) > 0]
        ups += [_up(r) for r in rounds]
        downs += [_down(r) for r in rounds]
        errors += [float(r[AGG_ERROR]) for r in rounds if r.get(AGG_ERROR) is not None]
        if target is not None:
            # A head refit before round 1 (head.calibration) is part of the way.
            elapsed = sum(
                float(r.get(CALIB_SECONDS, 0.0))
                for r in history
                if r.get(ROUND, 0) == 0
            )
            for r in rounds:
                elapsed += float(r.get(ROUND_SECONDS, 0.0))
                value = r.get(key)
                if value is not None and (
                    value >= target if higher else value <= target
                ):
                    rounds_hit.append(float(r[ROUND]))
                    secs_hit.append(elapsed)
                    break
        curves.append(dict(points))
        total = 0.0
        cum = [0.0]
        for r in rounds:
            total += _up(r) + _down(r)
            cum.append(total)
        cums.append(cum)
    common = sorted(set.intersection(*(set(c) for c in curves)))
    curve = [(r, sum(c[r] for c in curves) / len(curves)) for r in common]
    length = min(len(c) for c in cums)
    cum_bytes = [sum(c[i] for c in cums) / len(cums) for i in range(length)]
    return Summary(
        rule=rule,
        metric=key,
        seeds=len(histories),
        final=_mean_std(finals),
        best=_mean_std(bests),
        reached=len(rounds_hit),
        rounds_to_target=_mean_std(rounds_hit)[0],
        seconds_to_target=_mean_std(secs_hit)[0],
        bytes_up=_mean_std(ups)[0],
        bytes_down=_mean_std(downs)[0],
        agg_error=_mean_std(errors)[0] if errors else None,
        wall=_mean_std(list(walls))[0],
        local=_mean_std(list(local)) if local else None,
        curve=curve,
        cum_bytes=cum_bytes,
    )


def _fmt_ms(pair: tuple[float, float], seeds: int) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "—"
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def table(
    summaries: Sequence[Summary], target: float | None, *, label: str = "rule"
) -> str:
    """Format one setting as a markdown table (``label`` heads the first column)."""
    goal = f"{target:g}" if target is not None else "target"
    head = (
        f"| {label} | final | best | rounds to {goal} | s to {goal} | "
        "MB up / round | MB down / round | agg. error | wall s | local splits |"
    )
    lines = [head, "|" + "---|" * 10]
    for s in summaries:
        metric = "" if s.metric == TEST_ACCURACY else f" ({s.metric})"
        if s.reached:
            rounds = f"{s.rounds_to_target:.1f} ({s.reached}/{s.seeds})"
            secs = f"{s.seconds_to_target:.0f}"
        else:
            rounds, secs = f"— (0/{s.seeds})", "—"
        err = "—" if s.agg_error is None else f"{s.agg_error:.2e}"
        lines.append(
            f"| {s.rule}{metric} | {_fmt_ms(s.final, s.seeds)} | "
            f"{_fmt_ms(s.best, s.seeds)} | {rounds} | {secs} | "
            f"{s.bytes_up / 1e6:.3f} | {s.bytes_down / 1e6:.3f} | {err} | "
            f"{s.wall:.0f} | "
            f"{_fmt_ms(s.local, s.seeds) if s.local else '—'} |"
        )
    return "\n".join(lines)


def plot(summaries: Sequence[Summary], path_round: Path, path_bytes: Path) -> None:
    """Accuracy vs round and accuracy vs cumulative bytes, all rules on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_flwr.results import save_figure

    for path, use_bytes in ((path_round, False), (path_bytes, True)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in summaries:
            points = [(r, v) for r, v in s.curve if r < len(s.cum_bytes)]
            ys = [v for _, v in points]
            if use_bytes:
                xs = [s.cum_bytes[r] / 1e6 for r, _ in points]
            else:
                xs = [float(r) for r, _ in points]
            ax.plot(xs, ys, marker="o", markersize=3, label=s.rule)
        ax.set_xlabel("cumulative MB (up + down)" if use_bytes else ROUND)
        label = summaries[0].metric.split("_", 1)[1]
        ax.set_ylabel(f"{label}, mean over seeds (fedsa: its local splits)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        save_figure(fig, path)
        plt.close(fig)


def machine() -> str:
    """CPU model, core count, torch version and accelerator, for the report."""
    model = cpu_model_name()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def write_report(out: Path, body: str, *, begin: str = BEGIN, end: str = END) -> None:
    """Replace the generated block of ``out`` (or create it), keeping the rest."""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if out.is_file():
        text = out.read_text(encoding="utf-8")
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            tail = rest.split(end, 1)[1]
            write_text_atomic(out, head + block + tail)
            return
        write_text_atomic(out, text.rstrip() + "\n\n" + block + "\n")
        return
    write_text_atomic(out, f"# Results\n\n{block}\n")


def reference_line(refs: Sequence[Path], batch_size: int) -> str:
    """One report line: the centralised references' final value, mean ± std."""
    finals = []
    for ref in refs:
        final = json.loads((ref / "history.json").read_text())["final"]
        finals.append(float(final.get("accuracy", final.get("perplexity", math.nan))))
    steps = json.loads((refs[0] / "history.json").read_text())["final"]["step"]
    return (
        f"Centralised LoRA reference (same training pool, {int(steps)} steps of "
        f"batch {batch_size}, seeds {list(range(len(refs)))}): "
        f"{_fmt_ms(_mean_std(finals), len(finals))}."
    )
