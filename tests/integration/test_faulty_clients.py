"""A real Ray simulation in which one client raises and one sends NaN arrays.

The round must go on with the valid reply, and the global adapter must equal what
the rule makes of the valid replies alone.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_flwr.config import ExperimentConfig
from lora_flwr.fl.client import LoRAClient, node_partition
from lora_flwr.results import read_history

ROOT = Path(__file__).resolve().parents[2]


class FaultyClient(LoRAClient):
    """Partition 1 raises in fit; partition 2 returns a NaN-poisoned adapter."""

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        if self.partition_id == 1:
            raise RuntimeError("simulated crash of partition 1")
        arrays, n, metrics = super().fit(parameters, config)
        if self.partition_id == 2:
            arrays = [a.copy() for a in arrays]
            arrays[0][0, 0] = np.nan
        return arrays, n, metrics


@pytest.mark.slow
def test_round_survives_a_crashing_and_a_malformed_client(tmp_path: Path) -> None:
    # Prepare
    import ray.cloudpickle
    from flwr.client import ClientApp
    from flwr.common import Context
    from flwr.simulation import run_simulation

    from lora_flwr.fl.server_app import make_server_app

    # Ray workers cannot import this test module: ship its code by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    base = ExperimentConfig.from_toml(ROOT / "configs" / "smoke.toml")
    cfg = dataclasses.replace(
        base,
        name="faulty",
        output_dir=str(tmp_path),
        fed=dataclasses.replace(base.fed, num_rounds=1, num_clients=3),
        sampling=dataclasses.replace(
            base.sampling, fraction=1.0, min_clients=1, min_available=3
        ),
        eval=dataclasses.replace(base.eval, fraction=0.0, min_clients=1),
    )

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        pid, num = node_partition(context, cfg.fed.num_clients)
        return FaultyClient(cfg, pid, num).to_client()

    # Execute
    run_simulation(
        server_app=make_server_app(cfg, tmp_path / "faulty"),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
    )

    # Assert
    history = read_history(tmp_path / "faulty")
    last = history[-1]
    assert last["round"] == 1
    assert last["fit_sampled"] == 3
    assert last["fit_ok"] == 1  # only partition 0
    assert last["fit_failed"] == 1  # the crash
    assert last["fit_dropped"] == 1  # the NaN reply
    assert last["aggregated"] is True
    # One valid reply: the global adapter is exactly that client's adapter, which
    # partition 0 trained from the seeded start; it is finite and moved.
    from lora_flwr.experiment import get_workspace

    ws = get_workspace(cfg)
    ws.reset_adapter()
    start = ws.adapter.get_weights()
    ws.adapter.load(tmp_path / "faulty" / "adapter")
    final = ws.adapter.get_weights()
    assert all(np.isfinite(a).all() for a in final)
    assert any(not np.array_equal(a, b) for a, b in zip(final, start, strict=True))
    from lora_flwr.protocol import LR, ROUND, Plan

    client = LoRAClient(cfg, 0, 3)
    instruction = {ROUND: 1, LR: cfg.train.lr, **Plan(rank=cfg.lora.r).to_config()}
    expected, _, _ = client.fit(start, instruction)
    for got, want in zip(final, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
