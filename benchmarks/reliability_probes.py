"""Hostile-client probes on the real Flower simulation engine.

Three clients on ``configs/smoke.toml``; partition 2 is hostile in one way per probe.
Each probe is one Ray simulation; the honest run is the reference. Prints a
Markdown table (final held-out loss / accuracy, what the guards counted):

    PYTHONPATH=. python benchmarks/reliability_probes.py [--out DIR] [--no-guards]
        [--robust median] [--secagg] [--probes honest,dropout_30]
        [--config configs/default.toml]

``tests/integration/test_hostile_clients.py`` runs the same probes and asserts on
them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_flwr.config import ExperimentConfig
from lora_flwr.fl.client import LoRAClient, node_partition
from lora_flwr.protocol import ACCURACY, ROUND, SECONDS
from lora_flwr.server.record import (
    FILTERED,
    FIT_DROPPED,
    FIT_FAILED,
    FIT_OK,
    NORM_CLIPPED,
    NORM_REJECTED,
    TEST_ACCURACY,
    TEST_LOSS,
    WEIGHT_CAPPED,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
HOSTILE = 2
PROBES = (
    "honest",
    "scale_1e6",  # the update (reply - what it received) times 1e6, finite
    "random_1e9",  # a random adapter and num_examples = 10**9
    "sign_flip",  # start - 1.9 x its honest update, num_examples = 10**9
    "random_bounded",  # a random update of 1.9 x its honest norm, 10**9 examples
    "fit_metric_abc",  # fit metric seconds = "abc"
    "eval_metric_abc",  # evaluate metric accuracy = "abc"
    "eval_huge",  # evaluate reply loss = 1e30 over 10**9 examples
    "dropout_30",  # every client fails 30 % of its fit calls at random (seeded)
    "leave",  # the hostile partition fails every fit call
)
# Settings of a SecAgg+ run (--secagg), per section: the server-side guards cannot
# see a single update, and the weight bound sits just above the smoke clients' ~97
# examples so the quantisation keeps its precision.
SECAGG: dict[str, dict[str, Any]] = {
    "secagg": {"enabled": True, "max_weight": 100.0},
    "guards": {"norm_guard": "off", "weight_cap": 0.0},
}
# History counts that run_probe also sums over the run (``<count>_total``).
COUNTS = (
    WEIGHT_CAPPED,
    NORM_CLIPPED,
    NORM_REJECTED,
    FILTERED,
    FIT_DROPPED,
    FIT_FAILED,
    FIT_OK,
)


class HostileClient(LoRAClient):
    """A LoRA client; partition ``HOSTILE`` misbehaves as ``self.probe`` says."""

    probe = "honest"
    hostile: frozenset[int] = frozenset({HOSTILE})

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        if self.probe == "leave" and self.partition_id in self.hostile:
            raise RuntimeError(f"leave probe: partition {HOSTILE} fails every fit")
        if self.probe.startswith("dropout_"):
            share = int(self.probe.split("_")[1]) / 100
            draw = np.random.default_rng(
                [self.cfg.seed, int(config[ROUND]), self.partition_id]
            ).random()
            if draw < share:
                raise RuntimeError(
                    f"dropout probe: partition {self.partition_id} leaves round "
                    f"{config[ROUND]}"
                )
        arrays, n, metrics = super().fit(parameters, config)
        if self.partition_id not in self.hostile:
            return arrays, n, metrics
        if self.probe == "scale_1e6":
            # fedit sends back every tensor it received, in the same order.
            arrays = [
                p + (a - p) * 1e6 for a, p in zip(arrays, parameters, strict=True)
            ]
        elif self.probe == "random_1e9":
            rng = np.random.default_rng(0)
            arrays = [rng.normal(size=a.shape).astype(a.dtype) for a in arrays]
            n = 10**9
        elif self.probe == "sign_flip":
            # Under 2 x the median norm, so the norm guard never clips it.
            arrays = [
                p - (a - p) * 1.9 for a, p in zip(arrays, parameters, strict=True)
            ]
            n = 10**9
        elif self.probe == "random_bounded":
            rng = np.random.default_rng([self.cfg.seed, int(config[ROUND])])
            noise = [rng.normal(size=a.shape) for a in arrays]
            honest = np.sqrt(
                sum(
                    float(np.sum((a - p) ** 2))
                    for a, p in zip(arrays, parameters, strict=True)
                )
            )
            scale = 1.9 * honest / np.sqrt(sum(float(np.sum(z**2)) for z in noise))
            arrays = [
                (p + z * scale).astype(p.dtype)
                for p, z in zip(parameters, noise, strict=True)
            ]
            n = 10**9
        elif self.probe == "fit_metric_abc":
            metrics = {**metrics, SECONDS: "abc"}
        return arrays, n, metrics

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        loss, n, metrics = super().evaluate(parameters, config)
        if self.partition_id in self.hostile and self.probe == "eval_metric_abc":
            metrics = {**metrics, ACCURACY: "abc"}
        elif self.partition_id in self.hostile and self.probe == "eval_huge":
            loss, n = 1e30, 10**9
        return loss, n, metrics


def probe_config(
    out: Path,
    probe: str,
    *,
    guards: bool = True,
    robust: str = "none",
    base_path: Path = SMOKE,
    sets: Mapping[str, Mapping[str, Any]] | None = None,
    tag: str = "",
    seed: int | None = None,
) -> ExperimentConfig:
    """The probe's config: the smoke config at 3 clients (every client trained and
    evaluated), or another config (``base_path``) as it is; ``sets`` replaces
    fields per section, e.g. ``{"fed": {"num_rounds": 1}}`` (named by ``tag`` in
    the run name).
    """
    base = ExperimentConfig.from_toml(base_path)
    changes: dict[str, dict[str, Any]] = {}
    if base_path == SMOKE:
        _merge(
            changes,
            {
                "fed": {"num_clients": 3},
                "sampling": {"fraction": 1.0, "min_clients": 3, "min_available": 3},
                "eval": {"fraction": 1.0, "min_clients": 3},
            },
        )
    if not guards:
        _merge(changes, {"guards": {"weight_cap": 0.0, "norm_guard": "off"}})
    _merge(changes, {"guards": {"robust": robust}})
    _merge(changes, sets or {})
    name = (
        f"{base.name}-{probe}"
        + ("" if guards else "-noguards")
        + ("" if robust == "none" else f"-{robust}")
        + (f"-{tag}" if tag else "")
    )
    # One replace: the refusals across sections see the finished config.
    return dataclasses.replace(
        base,
        name=name,
        seed=base.seed if seed is None else seed,
        output_dir=str(out),
        on_existing="overwrite",
        **{
            section: dataclasses.replace(getattr(base, section), **fields)
            for section, fields in changes.items()
        },
    )


def _merge(
    into: dict[str, dict[str, Any]], sets: Mapping[str, Mapping[str, Any]]
) -> None:
    """Merge per-section field values ``sets`` into ``into`` (later ones win)."""
    for section, fields in sets.items():
        into.setdefault(section, {}).update(fields)


def run_probe(
    out: Path,
    probe: str,
    *,
    guards: bool = True,
    robust: str = "none",
    base_path: Path = SMOKE,
    sets: Mapping[str, Mapping[str, Any]] | None = None,
    tag: str = "",
    hostile: frozenset[int] = frozenset({HOSTILE}),
    seed: int | None = None,
) -> dict[str, Any]:
    """Run one probe in the Ray simulation; return its last history record.

    ``hostile`` are the partitions that misbehave. The record also has ``run_dir``
    and, per count, ``<count>_total`` over rounds.
    """
    import ray.cloudpickle
    from flwr.client import ClientApp
    from flwr.common import Context
    from flwr.simulation import run_simulation

    from lora_flwr.fl.client_app import make_secagg_mod
    from lora_flwr.fl.server_app import make_server_app
    from lora_flwr.results import read_history
    from lora_flwr.rundir import release_run_dir

    # Ray workers cannot import this file: ship the client class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[HostileClient.__module__])
    cfg = probe_config(
        out,
        probe,
        guards=guards,
        robust=robust,
        base_path=base_path,
        sets=sets,
        tag=tag,
        seed=seed,
    )
    run_dir = out / cfg.name

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        pid, num = node_partition(context, cfg.fed.num_clients)
        client = HostileClient(cfg, pid, num)
        client.probe = probe
        client.hostile = hostile
        return client.to_client()

    try:
        run_simulation(
            server_app=make_server_app(cfg, run_dir),
            client_app=ClientApp(client_fn=client_fn, mods=[make_secagg_mod(cfg)]),
            num_supernodes=cfg.fed.num_clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
        )
    finally:
        release_run_dir(run_dir)
    history = read_history(run_dir)
    last = dict(history[-1])
    last["run_dir"] = str(run_dir)
    for key in COUNTS:
        last[total(key)] = sum(int(r.get(key) or 0) for r in history)
    return last


def total(key: str) -> str:
    """Name of a count summed over the run in :func:`run_probe`'s record."""
    return f"{key}_total"


def main() -> None:
    """Run every probe and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-guards", action="store_true", help="guards off")
    parser.add_argument("--robust", default="none", help="guards.robust")
    parser.add_argument("--probes", default=",".join(PROBES), help="which probes")
    parser.add_argument("--config", type=Path, default=SMOKE, help="base config")
    parser.add_argument("--secagg", action="store_true", help="fit through SecAgg+")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="probes-"))
    rows = []
    setting = ("guards on" if not args.no_guards else "guards off") + (
        "" if args.robust == "none" else f", robust={args.robust}"
    )
    if args.secagg:
        setting = "SecAgg+"
    for probe in args.probes.split(","):
        last = run_probe(
            out,
            probe,
            guards=not args.no_guards,
            robust=args.robust,
            base_path=args.config,
            sets=SECAGG if args.secagg else None,
            tag="secagg" if args.secagg else "",
        )
        rows.append(
            f"| {probe} | {setting} | {last.get(TEST_LOSS, float('nan')):.4f} | "
            f"{last.get(TEST_ACCURACY, float('nan')):.3f} | "
            f"{last[total(WEIGHT_CAPPED)]} | {last[total(NORM_CLIPPED)]} | "
            f"{last[total(FIT_DROPPED)]} | {last[total(FIT_FAILED)]} | "
            f"{last[total(FIT_OK)]} |"
        )
    print(
        "| probe | setting | test loss | test acc | counts capped | updates clipped "
        "| dropped | failed fits | aggregated replies |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
