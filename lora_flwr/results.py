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
from lora_flwr.server.record import (
    AGG_ERROR,
    BYTES_DOWN,
    BYTES_UP,
    FED_ACCURACY,
    FED_LOSS,
    FIT_OK,
    PERSONAL_ACCURACY,
    PERSONAL_LOSS,
    PERSONAL_PERPLEXITY,
    ROUND,
    ROUND_SECONDS,
    TEST_ACCURACY,
    TEST_LOSS,
    TEST_PERPLEXITY,
    TRAIN_LOSS,
)

Record = Mapping[str, Any]

# Columns of the per-round table: (record key, header, format); a header is the
# key itself unless the key is too wide for its column.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    (ROUND, ROUND, "{:>5d}"),
    (TRAIN_LOSS, TRAIN_LOSS, "{:>10.4f}"),
    (TEST_LOSS, TEST_LOSS, "{:>9.4f}"),
    (TEST_ACCURACY, "test_acc", "{:>8.4f}"),
    (TEST_PERPLEXITY, "test_ppl", "{:>9.2f}"),
    (PERSONAL_LOSS, "pers_loss", "{:>9.4f}"),
    (PERSONAL_ACCURACY, "pers_acc", "{:>8.4f}"),
    (PERSONAL_PERPLEXITY, "pers_ppl", "{:>9.2f}"),
    (FED_LOSS, FED_LOSS, "{:>8.4f}"),
    (AGG_ERROR, "agg_err", "{:>8.2e}"),
    (FIT_OK, FIT_OK, "{:>6d}"),
    (BYTES_UP, BYTES_UP, "{:>10d}"),
    (BYTES_DOWN, BYTES_DOWN, "{:>10d}"),
    (ROUND_SECONDS, "seconds", "{:>7.1f}"),
)


def _columns(records: Sequence[Record]) -> list[tuple[str, str, str]]:
    return [
        c
        for c in TABLE_COLUMNS
        if any(r.get(c[0]) is not None for r in records) or c[0] == ROUND
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
    ("loss.png", (TRAIN_LOSS, TEST_LOSS, PERSONAL_LOSS, FED_LOSS), "loss"),
    ("accuracy.png", (TEST_ACCURACY, PERSONAL_ACCURACY, FED_ACCURACY), "accuracy"),
    ("perplexity.png", (TEST_PERPLEXITY, PERSONAL_PERPLEXITY), "perplexity"),
    ("bytes.png", (BYTES_UP, BYTES_DOWN), "cumulative bytes"),
)
# Plotted as running totals: per round they are a flat line.
CUMULATIVE = frozenset({BYTES_UP, BYTES_DOWN})


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
            k: [(r[ROUND], r[k]) for r in records if r.get(k) is not None] for k in keys
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
        ax.set_xlabel(ROUND)
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
