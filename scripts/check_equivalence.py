"""Check that a checkout runs every experiment bit for bit like a base commit.

    python scripts/check_equivalence.py [--base REF] [--new PATH] [--cases a,b]
        [--out DIR] [--python EXE] [--set K=V] [--base-set K=V] [--new-set K=V]

The base ref is checked out in a temporary git worktree (removed at the end, also on
error or Ctrl-C). Each case runs ``run_simulation.py`` once per side, one run at a
time, same interpreter and environment; only the side's root differs: it is the
working directory and the whole ``PYTHONPATH``, and every process that imports
``lora_flwr`` (Ray's workers too) must import it from under that root. Per case the
sides must agree on the exit code, every ``*.safetensors`` both wrote (tensor bits
and file bytes), ``history.json`` (``IGNORE_RULE``'s fields aside, ``REPLY_MEANS``
to 1e-12) and ``config.toml`` (output folders normalised, ``ATTEMPT_KEYS`` aside).
Prints a table, writes it to ``<out>/summary.md`` and exits 0 only if every case
matches.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_REF = "cb028f3"  # the last commit before the server refactor
ROOT_ENV = "CHECK_EQUIVALENCE_ROOT"
LOG_ENV = "CHECK_EQUIVALENCE_IMPORT_LOG"
PIN_ENV = "CHECK_EQUIVALENCE_PIN"
# Config keys that say how one attempt treats its folder, not what the run is: a
# base that rewrites config.toml on resume writes "resume" there, a new side that
# keeps the first attempt's file does not.
ATTEMPT_KEYS = frozenset({"on_existing"})
# Where a checkout lists the config keys it moved (old dotted key -> new one).
RENAMES = Path("lora_flwr/config/renames.py")

IGNORE_RULE = (
    "timing: a `_`-separated part of the name is `seconds` or `wall`, or it ends in "
    "`_at`; profile: starts with `prof_`; pids: a part is `pid` or `pids`; worker "
    "placement (which Ray worker served which client, counted by pid): "
    "`workers`, `model_loads_max`, `client_fit_calls_max`"
)
PLACEMENT_KEYS = frozenset({"workers", "model_loads_max", "client_fit_calls_max"})
# Fields the new side adds on purpose (absent from the base's rows, never compared).
ADDED_FIELDS = frozenset(
    "weight_cap_moved eval_dropped eval_capped eval_clipped eval_rejected "
    "eval_loss_bound filtered responses_truncated responses_dropped".split()
)
# Example-weighted means over the client replies, summed in the order the replies
# arrived (Ray's, not ours): with 3+ replies the last bits vary from run to run.
REPLY_MEANS = frozenset(
    "train_loss fed_loss fed_accuracy fed_perplexity personal_loss "
    "personal_accuracy personal_perplexity".split()
)
REPLY_MEAN_RTOL = 1e-12  # a reordered sum differs by ~1e-16 per term


def ignore_reason(key: str) -> str | None:
    """Return why a history field is not compared (see ``IGNORE_RULE``), or None."""
    parts = key.split("_")
    if "seconds" in parts or "wall" in parts or (len(parts) > 1 and parts[-1] == "at"):
        return "timing"
    if key.startswith("prof_"):
        return "profile"
    if "pid" in parts or "pids" in parts:
        return "pid"
    if key in PLACEMENT_KEYS:
        return "worker placement"
    return None


@dataclass(frozen=True)
class HistoryComparison:
    """Outcome of :func:`compare_histories`."""

    equal: bool
    ignored: tuple[str, ...]  # the fields skipped, seen on either side
    differences: tuple[str, ...]
    reordered: tuple[str, ...] = ()  # REPLY_MEANS that differed within the rtol


def _same(a: Any, b: Any) -> bool:
    # Through JSON text: 1 vs 1.0 differ, floats compare by their exact repr.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def compare_histories(
    base: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
) -> HistoryComparison:
    """Compare two lists of round records field by field.

    Equal when both hold as many records, with the same values (types included)
    in every field that :func:`ignore_reason` does not skip; ``REPLY_MEANS``
    floats may differ by ``REPLY_MEAN_RTOL`` (relative).
    """
    ignored: set[str] = set()
    reordered: set[str] = set()
    diffs: list[str] = []
    if len(base) != len(new):
        diffs.append(f"base has {len(base)} records, new has {len(new)}")
    for i, (b, n) in enumerate(zip(base, new, strict=False)):
        where = f"round {b.get('round', i)}"
        for key in sorted(set(b) | set(n)):
            if ignore_reason(key) is not None:
                ignored.add(key)
            elif key in ADDED_FIELDS and key in n and key not in b:
                ignored.add(f"{key} (added)")
            elif key not in n or key not in b:
                diffs.append(f"{where}: `{key}` only on one side")
            elif _same(b[key], n[key]):
                continue
            elif key in REPLY_MEANS and _close(b[key], n[key]):
                reordered.add(key)
            else:
                diffs.append(f"{where}: `{key}` base {b[key]!r} != new {n[key]!r}")
    return HistoryComparison(
        not diffs, tuple(sorted(ignored)), tuple(diffs), tuple(sorted(reordered))
    )


def _close(a: Any, b: Any) -> bool:
    floats = all(isinstance(x, float) for x in (a, b))
    return floats and math.isclose(a, b, rel_tol=REPLY_MEAN_RTOL, abs_tol=0.0)


@dataclass(frozen=True)
class FileComparison:
    """Outcome of :func:`compare_safetensors` for one pair of files."""

    bytes_equal: bool
    tensors_equal: bool
    detail: str = ""


def compare_safetensors(a: Path, b: Path) -> FileComparison:
    """Compare two safetensors files: their raw bytes, and every tensor's bits.

    Tensors are equal when both files hold the same names with the same dtype and
    shape, and ``torch.equal`` holds on their raw bytes (so NaN payloads and the
    sign of zero count, and NaN equals itself).
    """
    import torch
    from safetensors.torch import load_file

    bytes_equal = a.read_bytes() == b.read_bytes()
    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        only = sorted(set(ta) ^ set(tb))
        return FileComparison(bytes_equal, False, f"tensor names differ: {only[:4]}")
    bad: list[str] = []
    for name in sorted(ta):
        x, y = ta[name], tb[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            bad.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        elif not torch.equal(*(t.reshape(-1).view(torch.uint8) for t in (x, y))):
            gap = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            bad.append(f"{name}: max |diff| {gap:.3g}")
    detail = f"{len(bad)} of {len(ta)} tensors differ, e.g. {bad[0] if bad else ''}"
    return FileComparison(bytes_equal, not bad, detail if bad else "")


def tensor_files(run_dir: Path) -> set[str]:
    """Relative paths of the ``*.safetensors`` a run wrote (hidden temp files not)."""
    rel = (p.relative_to(run_dir) for p in run_dir.rglob("*.safetensors"))
    return {str(p) for p in rel if not any(s.startswith(".") for s in p.parts)}


def compare_tensor_files(base_dir: Path, new_dir: Path) -> tuple[bool, str]:
    """Compare every safetensors file of two run directories; (equal, summary)."""
    ours, theirs = tensor_files(base_dir), tensor_files(new_dir)
    diffs = [f"{p}: only in base" for p in sorted(ours - theirs)]
    diffs += [f"{p}: only in new" for p in sorted(theirs - ours)]
    common = sorted(ours & theirs)
    for rel in common:
        res = compare_safetensors(base_dir / rel, new_dir / rel)
        if not res.tensors_equal:
            diffs.append(f"{rel}: {res.detail}")
        elif not res.bytes_equal:
            diffs.append(f"{rel}: same tensors, file bytes differ")
    if not common:
        return False, "no safetensors file on both sides"
    if diffs:
        more = f" (+{len(diffs) - 3} more files)" if len(diffs) > 3 else ""
        return False, "DIFFER: " + "; ".join(diffs[:3]) + more
    return True, f"yes: {len(common)} files, tensors and bytes"


def compare_configs(
    paths: Sequence[Path], outs: Sequence[str], moved: Mapping[str, str] = {}
) -> list[str]:
    """Say where two ``config.toml`` differ, each side's output folder (``outs``)
    read as ``<OUT>`` wherever it appears in a value; the base's keys in the new
    side's spelling (``moved``: new key -> base key)."""

    def flat(table: dict[str, Any], pre: str, old: str) -> Iterator[tuple[str, Any]]:
        for k, v in table.items():
            if isinstance(v, dict):
                yield from flat(v, f"{pre}{k}.", old)
            else:
                yield pre + k, json.loads(json.dumps(v).replace(old, "<OUT>"))

    tables = [tomllib.loads(p.read_text()) for p in paths]
    b, n = (dict(flat(t, "", o)) for t, o in zip(tables, outs, strict=True))
    spelled_as = {old: new for new, old in moved.items()}
    b = {spelled_as.get(k, k): v for k, v in b.items()}
    return [
        f"`{k}` base {b.get(k)!r} != new {n.get(k)!r}"
        for k in sorted((set(b) | set(n)) - ATTEMPT_KEYS)
        if k not in b or k not in n or not _same(b[k], n[k])
    ]


@dataclass(frozen=True)
class Case:
    """One experiment run on both sides.

    ``sets`` go to both sides; ``base_sets``/``new_sets`` to one side only (for a
    config key renamed on one side). ``kill_after_round`` > 0: SIGKILL the run's
    process group once that round's server state is on disk, then ``--resume`` it.
    ``pins`` make a run's unseeded randomness repeatable (the same on both sides):
    ``dp_entropy`` (the DP noise generator's OS entropy), ``secagg_rounding``
    (SecAgg+'s stochastic rounding on the clients, seeded by the values rounded).
    """

    name: str
    config: str
    sets: tuple[str, ...] = ()
    base_sets: tuple[str, ...] = ()
    new_sets: tuple[str, ...] = ()
    kill_after_round: int = 0
    pins: tuple[str, ...] = ()
    timeout_s: float = 1200.0  # per side


SMOKE = "configs/smoke.toml"
CASES: tuple[Case, ...] = (
    *(
        Case(f"smoke_{rule}", SMOKE, (f"fed.aggregation={rule}",), timeout_s=600)
        for rule in ("fedit", "fedex", "flora", "fedsa")
    ),
    Case("smoke_int8", SMOKE, ("compression.codec=int8",), timeout_s=600),
    Case("resume", SMOKE, ("fed.num_rounds=4",), kill_after_round=2, timeout_s=900),
    Case("default_r2", "configs/default.toml", ("fed.num_rounds=2",), timeout_s=900),
    Case("label_skew_r2", "configs/label_skew.toml", ("fed.num_rounds=2",)),
    Case("dp", "configs/dp.toml", pins=("dp_entropy",), timeout_s=1800),
    Case("secagg", "configs/secagg.toml", pins=("secagg_rounding",), timeout_s=1800),
    Case("default", "configs/default.toml", timeout_s=1800),
)

# Run as `python -c BOOTSTRAP run_simulation.py ARGS...` in the side's root.
BOOTSTRAP = f"""
import os, runpy, sys
root = os.path.realpath(os.environ["{ROOT_ENV}"])
import lora_flwr
where = os.path.realpath(lora_flwr.__file__)
if os.path.commonpath([root, where]) != root:
    sys.stderr.write(f"check_equivalence: {{where}} is not under {{root}}\\n")
    raise SystemExit(97)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# sitecustomize.py on every side's PYTHONPATH, so that Ray's workers load it too.
PROBE = f'''"""check_equivalence: log where lora_flwr is imported from; apply pins."""
import os
import sys

_LOG = os.environ.get("{LOG_ENV}", "")
_PINS = set(os.environ.get("{PIN_ENV}", "").split(","))
_QUANT = "flwr.common.secure_aggregation.quantization"


def _rounding(arr):
    # Unbiased stochastic rounding like Flower's, drawn from a generator seeded by
    # the values rounded instead of NumPy's unseeded global one.
    import hashlib, numpy as np  # here: not every process needs NumPy

    a = np.asarray(arr)
    seed = hashlib.sha256(a.tobytes() + str((a.dtype, a.shape)).encode()).digest()
    ret = np.ceil(a).astype(np.int32)
    draw = np.random.default_rng(list(seed)).random(a.shape)
    return np.where(draw < ret - a, ret - 1, ret).astype(np.int32)


class _Probe:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "lora_flwr" and not (name == _QUANT and "secagg_rounding" in _PINS):
            return None
        finders = [f for f in sys.meta_path if f is not cls and hasattr(f, "find_spec")]
        spec = next(filter(None, (f.find_spec(name, path, target) for f in finders)), 0)
        if not spec:
            return None
        if name == _QUANT:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module._stochastic_round = _rounding

            spec.loader.exec_module = exec_module
        elif _LOG:
            with open(_LOG, "a") as fh:
                fh.write(f"{{os.getpid()}}\\t{{spec.origin}}\\n")
        return spec


sys.meta_path.insert(0, _Probe)
if "dp_entropy" in _PINS:
    import random, secrets

    secrets.randbits = random.Random(20240607).getrandbits
'''


@dataclass(frozen=True)
class Side:
    """One checkout: its name (``base``/``new``), its root and its extra --set.

    ``moved`` maps a key as the new side spells it to this side's spelling (the
    base of a commit that moved config keys); cases and ``config.toml`` are
    written and compared in the new side's spelling.
    """

    name: str
    root: Path
    sets: tuple[str, ...] = ()
    moved: Mapping[str, str] = field(default_factory=dict)

    def spell(self, setting: str) -> str:
        """Return a ``key=value`` setting with the key as this side spells it."""
        key, eq, value = setting.partition("=")
        return f"{self.moved.get(key, key)}{eq}{value}"


def moved_keys(base_root: Path, new_root: Path) -> dict[str, str]:
    """New key -> base key for the keys the new side moved and the base still has."""
    if (base_root / RENAMES).is_file() or not (new_root / RENAMES).is_file():
        return {}
    renamed: dict[str, str] = runpy.run_path(str(new_root / RENAMES))["RENAMED"]
    return {new: old for old, new in renamed.items()}


@dataclass
class SideRun:
    """What one side of one case did."""

    rc: int | None  # None: killed at the case's timeout
    seconds: float
    run_dir: Path  # <output_dir>/<name>
    imports: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the case fails
    notes: list[str] = field(default_factory=list)  # for the record


def _session_pids(sid: int) -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True)
    rows = (line.split() for line in ps.stdout.splitlines())
    return [int(r[0]) for r in rows if len(r) == 2 and r[1] == str(sid)]


def _spawn(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> Any:
    """Start ``cmd`` in a session of its own (Ray's processes join it)."""
    with log.open("ab") as fh:
        kw: dict[str, Any] = {"stdout": fh, "stderr": subprocess.STDOUT}
        return subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, **kw)


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> int:
    """Kill ``proc``'s group; let its session empty; kill stragglers; count them."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + grace_s  # Ray's helpers stop on their own
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _session_pids(proc.pid)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


def _supervise(
    proc: subprocess.Popen[bytes], deadline: float, state: Path | None = None
) -> tuple[int | None, int]:
    """Wait for ``proc`` to end, or SIGKILL its group at the deadline or once
    ``state`` exists; (exit code or None if killed, stragglers killed after)."""
    rc: int | None = None
    try:
        while (rc := proc.poll()) is None and time.monotonic() < deadline:
            if state is not None and state.is_dir():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05 if state is not None else 0.5)
    finally:
        stragglers = _stop(proc)
    return rc, stragglers


def run_side(
    case: Case, side: Side, python: str, case_dir: Path, probe: Path
) -> SideRun:
    """Run ``case`` on one side (fresh output folder) and say what it did."""
    out = case_dir / side.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run = SideRun(None, 0.0, out / case.name)
    imports = out / "imports.log"  # one line per process that imported lora_flwr
    # Our environment, but PYTHONPATH only the side's root and the probe; one asset
    # cache for both, one hash seed (set order cannot tell the sides apart).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("LORA_FLWR_CACHE", str(Path.home() / ".cache" / "lora_flwr"))
    env.setdefault("PYTHONHASHSEED", "0")
    env.update(PYTHONPATH=os.pathsep.join([str(side.root), str(probe)]))
    env.update({ROOT_ENV: str(side.root), LOG_ENV: str(imports)})
    env[PIN_ENV] = ",".join(case.pins)
    own = case.base_sets if side.name == "base" else case.new_sets
    sets = [side.spell(s) for s in (*case.sets, *own)]
    sets += [*side.sets, f"output_dir={out}", f"name={case.name}"]
    head = [python, "-c", BOOTSTRAP, "run_simulation.py"]
    cmd = [*head, "--config", case.config, *(a for s in sets for a in ("--set", s))]
    log = out / "run.log"
    start = time.monotonic()
    deadline = start + case.timeout_s
    if case.kill_after_round:
        state = run.run_dir / "state" / f"round-{case.kill_after_round:03d}"
        rc, _ = _supervise(_spawn(cmd, side.root, env, log), deadline, state)
        if rc is not None or not state.is_dir():
            run.problems.append(f"{side.name}: not killed after round {state.name}")
            run.seconds = time.monotonic() - start
            return run
        cmd = [*head, "--resume", str(run.run_dir)]
        log = out / "resume.log"
    run.rc, stragglers = _supervise(_spawn(cmd, side.root, env, log), deadline)
    run.seconds = time.monotonic() - start
    if run.rc is None:
        run.problems.append(f"{side.name}: killed at its {case.timeout_s:.0f} s limit")
    if stragglers:
        run.notes.append(f"{side.name}: killed {stragglers} leftover processes")
    if case.kill_after_round:
        found = re.search(r"resuming .* after round (\d+)", log.read_text())
        after = int(found.group(1)) if found else None
        if after != case.kill_after_round:
            run.problems.append(f"{side.name}: resumed after round {after}")
    run.imports = imports.read_text().splitlines() if imports.is_file() else []
    return run


def import_problems(run: SideRun, side: Side) -> list[str]:
    """Say if any process imported lora_flwr from outside ``side.root``."""
    if not run.imports:
        return [f"{side.name}: no import of lora_flwr was logged"]
    origins = {Path(line.split("\t")[-1]).resolve() for line in run.imports}
    wrong = [o for o in origins if not o.is_relative_to(side.root.resolve())]
    return [f"{side.name}: lora_flwr imported from {w}" for w in sorted(wrong)]


@dataclass
class CaseResult:
    """One row of the table."""

    case: str
    rcs: tuple[int | None, int | None] = (None, None)
    adapters: str = "NO"
    history: str = "missing"
    config: str = "missing"
    ignored: tuple[str, ...] = ()
    seconds: tuple[float, float] = (0.0, 0.0)
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the two sides matched in everything."""
        rows = (self.adapters, self.history, self.config)
        return all(r.startswith("yes") for r in rows) and not self.details


def compare_case(
    case: Case, sides: Sequence[Side], runs: Sequence[SideRun]
) -> CaseResult:
    """Compare the two sides' runs of ``case``."""
    (base_side, new_side), (base, new) = sides, runs
    res = CaseResult(case.name, (base.rc, new.rc), seconds=(base.seconds, new.seconds))
    res.details += [*base.problems, *new.problems]
    res.notes += [*base.notes, *new.notes]
    for run, side in ((base, base_side), (new, new_side)):
        res.details += import_problems(run, side)
        res.notes.append(f"{side.name}: lora_flwr from {len(run.imports)} processes")
    if base.rc != new.rc:
        res.details.append(f"exit codes differ: base {base.rc}, new {new.rc}")
    same, res.adapters = compare_tensor_files(base.run_dir, new.run_dir)
    if not same:
        res.details.append(f"adapters: {res.adapters}")
        res.adapters = "NO"
    hb, hn = base.run_dir / "history.json", new.run_dir / "history.json"
    if hb.is_file() and hn.is_file():
        hist = compare_histories(json.loads(hb.read_text()), json.loads(hn.read_text()))
        res.ignored = hist.ignored
        res.history = "yes" if hist.equal else f"NO ({len(hist.differences)} fields)"
        if hist.equal and hist.reordered:
            res.history += f"; within {REPLY_MEAN_RTOL:g}: {', '.join(hist.reordered)}"
        res.details += [f"history: {d}" for d in hist.differences[:12]]
    cb, cn = base.run_dir / "config.toml", new.run_dir / "config.toml"
    if cb.is_file() and cn.is_file():
        outs = [str(base.run_dir.parent), str(new.run_dir.parent)]
        diffs = compare_configs([cb, cn], outs, sides[0].moved)
        res.config = "yes" if not diffs else f"NO ({len(diffs)} keys)"
        res.details += [f"config: {d}" for d in diffs]
    return res


def format_table(results: Sequence[CaseResult]) -> str:
    """The results as a markdown table, then every difference found."""
    lines = [
        "| case | exit base/new | adapters identical? | history equal? | "
        "config equal? | ignored keys | s base | s new | match |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.case} | {r.rcs[0]}/{r.rcs[1]} | {r.adapters} | {r.history} | "
            f"{r.config} | {', '.join(r.ignored) or '-'} | {r.seconds[0]:.0f} | "
            f"{r.seconds[1]:.0f} | {'yes' if r.ok else '**NO**'} |"
        )
    lines += ["", f"History fields not compared: {IGNORE_RULE}. Compared within "]
    lines[-1] += f"{REPLY_MEAN_RTOL:g} relative: {', '.join(sorted(REPLY_MEANS))}."
    for r in results:
        lines += [f"- {r.case}: {d}" for d in r.details]
        lines += [f"- {r.case} (note): {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def _git(repo: Path, *args: str, check: bool = True) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=check, capture_output=True)


@contextlib.contextmanager
def base_worktree(repo: Path, ref: str) -> Iterator[Path]:
    """Check ``ref`` out in a temporary detached worktree; remove it afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="check_equivalence-base-"))
    path = tmp / "base"
    try:
        _git(repo, "worktree", "add", "--detach", str(path), ref)
        yield path
    finally:
        if path.exists():
            _git(repo, "worktree", "remove", "--force", str(path), check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--base", default=BASE_REF, help="git ref (default: %(default)s)")
    add("--new", type=Path, default=REPO, help="checkout (default: %(default)s)")
    add("--cases", default="all", help=",".join(c.name for c in CASES) + " or all")
    add("--out", type=Path, help="folder: <case>/<side>/ gets logs, run (default: tmp)")
    add("--python", default=sys.executable, help="both sides' interpreter")
    add("--timeout", type=float, default=0.0, help="s per side (default: the case's)")
    for flag, whom in (("set", "both sides"), ("base-set", "base"), ("new-set", "new")):
        help_ = f"override for {whom}, every case (after the case's own)"
        add(f"--{flag}", action="append", default=[], metavar="KEY=VALUE", help=help_)
    args = p.parse_args(argv)
    args.new = args.new.resolve()
    if not (args.new / "run_simulation.py").is_file():
        p.error(f"--new {args.new} holds no run_simulation.py")
    by_name = {c.name: c for c in CASES}
    names = args.cases.split(",") if args.cases != "all" else list(by_name)
    if unknown := [n for n in names if n not in by_name]:
        p.error(f"unknown cases {unknown}; known: {', '.join(by_name)}")
    limit = {"timeout_s": args.timeout} if args.timeout > 0 else {}
    args.cases = [dataclasses.replace(by_name[n], **limit) for n in names]
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases on both sides; 0 if all match, 1 if not, 2 on bad arguments."""
    args = parse_args(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="check_equivalence-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with (
            base_worktree(REPO, args.base) as base_root,
            tempfile.TemporaryDirectory(prefix="check_equivalence-probe-") as tmp,
        ):
            print(f"base {args.base} in {base_root}; new {args.new}; out {out}")
            sides = (
                Side(
                    "base",
                    base_root,
                    tuple(args.set + args.base_set),
                    moved_keys(base_root, args.new),
                ),
                Side("new", args.new, tuple(args.set + args.new_set)),
            )
            probe = Path(tmp)
            (probe / "sitecustomize.py").write_text(PROBE)
            for i, case in enumerate(args.cases, 1):  # one run at a time
                case_dir = out / case.name
                runs = [run_side(case, s, args.python, case_dir, probe) for s in sides]
                results.append(r := compare_case(case, sides, runs))
                took = f"base {r.seconds[0]:.0f} s, new {r.seconds[1]:.0f} s"
                verdict = "match" if r.ok else "DIFFERENT"
                print(f"[{i}] {case.name}: {verdict} ({took})", flush=True)
                (out / "summary.md").write_text(format_table(results))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except subprocess.CalledProcessError as exc:
        print(f"error: {exc.cmd}: {exc.stderr.decode()}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("\n" + format_table(results) + f"\nwritten to {out / 'summary.md'}")
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
