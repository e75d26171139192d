"""The server's resumable state after each round: written atomically, read back exactly.

``<run_dir>/state/round-NNN/`` holds everything a resumed run needs beyond the
config and ``history.json``: the rule's :class:`ServerState` (global adapter,
base-weight delta, the fold log of merging rules, optimizer moments) as one
safetensors file of float arrays, and the strategy's counters as JSON. A round's
directory appears whole or not at all (temporary directory, fsync, rename), so the
newest one is always complete; older rounds are pruned once a newer one exists.

Sampling and client training are seeded from ``(seed, round, partition)``, so no
random-generator state needs saving: a resumed round draws what the uninterrupted
run drew.

Each checkpoint also holds the run's identity (:mod:`lora_flwr.config.identity`):
the config the run started with, and its fingerprint. A resume is refused unless
its config has the same identity, so one run's history never mixes two configs;
``config.toml`` is compared too when it was edited, or when no checkpoint holds
an identity yet.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from safetensors.numpy import load_file, save_file

from lora_flwr.aggregation import FoldBlock, ServerState, get_rule
from lora_flwr.atomic import atomic_write_dir, recover_all
from lora_flwr.config import ExperimentConfig, FlatValue
from lora_flwr.config.identity import (
    fingerprint,
    identity_differences,
    run_identity,
)
from lora_flwr.rundir import CONFIG_FILE

STATE_DIR = "state"
ARRAYS_FILE = "server_state.safetensors"
META_FILE = "server_state.json"
FORMAT = 1
_ROUND_DIR = re.compile(r"round-(\d{3,})")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """What the server saved after round ``counters["round"]``.

    ``identity`` is the run's config without the keys that cannot change its
    numbers (:func:`~lora_flwr.config.identity.run_identity`); None in a
    checkpoint written before runs stored it.
    """

    state: ServerState
    counters: dict[str, Any]
    identity: dict[str, FlatValue] | None = None


def save_checkpoint(
    run_dir: Path,
    server_round: int,
    state: ServerState,
    counters: dict[str, Any],
    config: ExperimentConfig,
) -> Path:
    """Write ``state/round-NNN`` after ``server_round`` atomically; prune older ones.

    ``state.round`` is the last round that aggregated; ``server_round`` the last
    round the run finished (they differ after a round without an aggregate).
    ``config`` is the run's: its identity and fingerprint are stored with the state.
    """
    identity = run_identity(config)
    tensors: dict[str, np.ndarray] = {}
    for name, value in state.arrays.items():
        tensors[f"arrays/{name}"] = value
    for module, value in state.base_delta.items():
        tensors[f"base_delta/{module}"] = value
    for key, value in state.extra.items():
        tensors[f"extra/{key}"] = value
    for version, block in enumerate(state.fold_log):
        for module, (b, a) in block.factors.items():
            tensors[f"fold/{version:05d}/{module}/B"] = b
            tensors[f"fold/{version:05d}/{module}/A"] = a
    meta = {
        "format": FORMAT,
        "round": server_round,
        "state_round": state.round,
        "fold_versions": len(state.fold_log),
        "counters": counters,
        "identity": {"fingerprint": fingerprint(identity), "config": identity},
    }
    root = run_dir / STATE_DIR
    path = root / f"round-{server_round:03d}"

    def write(tmp: Path) -> None:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(tmp / ARRAYS_FILE),
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    atomic_write_dir(path, write)
    for older in root.iterdir():
        match = _ROUND_DIR.fullmatch(older.name)
        if match and int(match.group(1)) < server_round:
            shutil.rmtree(older, ignore_errors=True)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Return the newest complete ``state/round-NNN`` of ``run_dir``, or None."""
    root = run_dir / STATE_DIR
    if not root.is_dir():
        return None
    recover_all(root)  # a rewrite killed mid-swap left a round's copy aside
    rounds = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _ROUND_DIR.fullmatch(p.name)) and (p / META_FILE).is_file()
    ]
    return max(rounds)[1] if rounds else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a ``state/round-NNN`` directory back into a :class:`Checkpoint`.

    Raises
    ------
    ValueError
        If the files are unreadable, of another format, or inconsistent.
    """
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(path / ARRAYS_FILE))
    except (OSError, ValueError) as exc:
        raise ValueError(f"server checkpoint {path} is unreadable: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"server checkpoint {path} has an unknown format")
    arrays: dict[str, np.ndarray] = {}
    base_delta: dict[str, np.ndarray] = {}
    extra: dict[str, np.ndarray] = {}
    folds: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "arrays":
            arrays[rest] = value
        elif kind == "base_delta":
            base_delta[rest] = value
        elif kind == "extra":
            extra[rest] = value
        elif kind == "fold":
            version, _, tail = rest.partition("/")
            module, _, factor = tail.rpartition("/")
            folds.setdefault(int(version), {}).setdefault(module, {})[factor] = value
        else:
            raise ValueError(f"server checkpoint {path}: unknown tensor {key!r}")
    versions = int(meta["fold_versions"])
    if sorted(folds) != list(range(versions)):
        raise ValueError(
            f"server checkpoint {path}: fold log holds versions {sorted(folds)}, "
            f"expected 0..{versions - 1}"
        )
    fold_log = tuple(
        FoldBlock({m: (f["B"], f["A"]) for m, f in folds[v].items()})
        for v in range(versions)
    )
    state = ServerState(
        round=int(meta["state_round"]),
        arrays=arrays,
        base_delta=base_delta,
        fold_log=fold_log,
        extra=extra,
    )
    counters = dict(meta.get("counters", {}))
    counters["round"] = int(meta["round"])
    return Checkpoint(state, counters, _stored_identity(path, meta))


def _stored_identity(path: Path, meta: dict[str, Any]) -> dict[str, FlatValue] | None:
    """Return the identity in a checkpoint's metadata (None: written without one).

    Raises
    ------
    ValueError
        If the identity does not match its fingerprint.
    """
    stored = meta.get("identity")
    if stored is None:
        return None
    if (
        not isinstance(stored, dict)
        or not isinstance(stored.get("config"), dict)
        or fingerprint(stored["config"]) != stored.get("fingerprint")
    ):
        raise ValueError(
            f"server checkpoint {path}: its stored config does not match its "
            "fingerprint"
        )
    return cast(dict[str, FlatValue], stored["config"])


def resume_checkpoint(cfg: ExperimentConfig, run_dir: Path) -> Checkpoint | None:
    """Return the checkpoint a resume of ``run_dir`` continues from (None: round 0).

    Raises
    ------
    ValueError
        If the rule keeps client state a restarted run cannot have (FedSA's B), the
        run already finished, the checkpoint is unreadable, or ``cfg`` is not the
        config the run started with (:func:`check_identity`).
    """
    if get_rule(cfg.fed.aggregation).personalized:
        raise ValueError(
            f"`fed.aggregation`={cfg.fed.aggregation!r} keeps each client's B in "
            "that client's Context.state, which a restarted run does not have; it "
            "cannot be resumed"
        )
    if cfg.head.mode == "local":
        raise ValueError(
            "`head.mode`='local' keeps each client's head in that client's "
            "Context.state, which a restarted run does not have; it cannot be resumed"
        )
    path = latest_checkpoint(run_dir)
    point = load_checkpoint(path) if path is not None else None
    check_identity(cfg, run_dir, point.identity if point is not None else None)
    if point is None:
        return None
    if point.identity is None:
        log.warning(
            "%s was written without the run's config; only config.toml can be "
            "compared, and it holds the last attempt's config",
            path,
        )
    if point.counters["round"] >= cfg.fed.num_rounds:
        raise ValueError(
            f"{run_dir} already finished all fed.num_rounds={cfg.fed.num_rounds} "
            "rounds; nothing to resume"
        )
    return point


def check_identity(
    cfg: ExperimentConfig, run_dir: Path, stored: dict[str, FlatValue] | None
) -> None:
    """Refuse to resume ``run_dir`` under a config of another identity.

    ``stored`` is the identity its newest checkpoint holds; without one (no
    checkpoint yet, or one written by older code) the run's ``config.toml`` is the
    record, as its first attempt (or, for older code, its last) wrote it.

    Raises
    ------
    ValueError
        In one line naming each key that differs with both values; an edited
        ``config.toml`` is named as such.
    """
    now = run_identity(cfg)
    wanted = fingerprint(now)
    if stored is not None and fingerprint(stored) == wanted:
        return
    toml = _toml_identity(run_dir)  # read only when needed: it may be stale
    there = stored if stored is not None else toml
    if there is None or fingerprint(there) == wanted:
        return
    differs = ", ".join(identity_differences(there, now))
    edited = toml is not None and fingerprint(toml) != fingerprint(there)
    if stored is not None and edited:
        raise ValueError(
            f"cannot resume {run_dir}: its {CONFIG_FILE} was edited after the run "
            "started; it differs from the config its checkpoint was written with "
            f"in {differs}; restore {CONFIG_FILE} or start a new run (another name)"
        )
    raise ValueError(
        f"cannot resume {run_dir}: its config differs in {differs}; rerun with the "
        f"run's own config (--resume {run_dir}) or start a new run (another name)"
    )


def _toml_identity(run_dir: Path) -> dict[str, FlatValue] | None:
    """Return the identity of ``run_dir``'s config.toml (None: it has none).

    Raises
    ------
    ValueError
        If config.toml is not a valid config.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return run_identity(ExperimentConfig.from_toml(path))
    except ValueError as exc:
        raise ValueError(f"cannot resume {run_dir}: its {CONFIG_FILE}: {exc}") from exc
