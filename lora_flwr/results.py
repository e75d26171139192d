"""Round history of a run: JSON/CSV files, a printed table and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_flwr.atomic import atomic_write, write_text_atomic

Record = Mapping[str, Any]

# Columns of the per-round table: (record key, header, format).
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("round", "round", "{:>5d}"),
    ("train_loss", "train_loss", "{:>10.4f}"),
    ("test_loss", "test_loss", "{:>9.4f}"),
    ("test_accuracy", "test_acc", "{:>8.4f}"),
    ("test_perplexity", "test_ppl", "{:>9.2f}"),
    ("personal_loss", "pers_loss", "{:>9.4f}"),
    ("personal_accuracy", "pers_acc", "{:>8.4f}"),
    ("personal_perplexity", "pers_ppl", "{:>9.2f}"),
    ("fed_loss", "fed_loss", "{:>8.4f}"),
    ("agg_error", "agg_err", "{:>8.2e}"),
    ("fit_ok", "fit_ok", "{:>6d}"),
    ("bytes_up", "bytes_up", "{:>10d}"),
    ("bytes_down", "bytes_down", "{:>10d}"),
    ("round_seconds", "seconds", "{:>7.1f}"),
)


def _columns(records: Sequence[Record]) -> list[tuple[str, str, str]]:
    return [
        c
        for c in TABLE_COLUMNS
        if any(r.get(c[0]) is not None for r in records) or c[0] == "round"
    ]


def _cell(value: Any, fmt: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value).rjust(width)


def format_header(records: Sequence[Record]) -> str:
    """Header line of the per-round table."""
    cols = _columns(records)
    return "  ".join(h.rjust(_width(f, h)) for _, h, f in cols)


def _width(fmt: str, header: str) -> int:
    digits = "".join(ch for ch in fmt.split(":")[1] if ch.isdigit() or ch == ".")
    return max(len(header), int(digits.split(".")[0] or 0))


def format_row(record: Record, records: Sequence[Record]) -> str:
    """One line of the per-round table (columns chosen from ``records``)."""
    cols = _columns(records)
    return "  ".join(_cell(record.get(k), f, _width(f, h)) for k, h, f in cols)


def format_table(records: Sequence[Record]) -> str:
    """Format the whole per-round table as text."""
    lines = [format_header(records)]
    lines += [format_row(r, records) for r in records]
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """Return ``value`` with NaN/Inf (also numpy floats) replaced by None."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def write_history(records: Sequence[Record], run_dir: Path) -> None:
    """Write ``history.json`` and ``history.csv`` (atomically) into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # Strict JSON: a non-finite number (a diverged loss) is written as null.
    clean = [{k: _json_safe(v) for k, v in r.items()} for r in records]
    text = json.dumps(clean, indent=2, default=float, allow_nan=False)
    write_text_atomic(run_dir / "history.json", text)
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in records:
        writer.writerow({k: r.get(k, "") for k in keys})
    write_text_atomic(run_dir / "history.csv", buf.getvalue())


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Read ``history.json`` back."""
    path = run_dir / "history.json"
    if not path.is_file():
        raise FileNotFoundError(f"No history.json in {run_dir}; did the run finish?")
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path} should hold a list of round records")
    return data


PLOTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("loss.png", ("train_loss", "test_loss", "personal_loss", "fed_loss"), "loss"),
    (
        "accuracy.png",
        ("test_accuracy", "personal_accuracy", "fed_accuracy"),
        "accuracy",
    ),
    ("perplexity.png", ("test_perplexity", "personal_perplexity"), "perplexity"),
    ("bytes.png", ("bytes_up", "bytes_down"), "cumulative bytes"),
)
# Plotted as running totals: per round they are a flat line.
CUMULATIVE = frozenset({"bytes_up", "bytes_down"})


def cumulative(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Return running totals of ``(round, value)`` points."""
    out: list[tuple[int, float]] = []
    total = 0.0
    for x, y in points:
        total += float(y)
        out.append((x, total))
    return out


def plot_history(records: Sequence[Record], run_dir: Path) -> list[Path]:
    """Draw the metrics per round as PNG files in ``run_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for filename, keys, ylabel in PLOTS:
        series = {
            k: [(r["round"], r[k]) for r in records if r.get(k) is not None]
            for k in keys
        }
        series = {
            k: cumulative(v) if k in CUMULATIVE else v for k, v in series.items() if v
        }
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, points in series.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = run_dir / filename
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    atomic_write(path, write)
