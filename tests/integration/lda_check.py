"""Shared check of the LDA head refit, for the simulation and deployment tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_flwr.config import ExperimentConfig


def assert_head_is_lda(cfg: ExperimentConfig, run_dir: Path, num_clients: int) -> None:
    """Assert the saved head is the LDA of every client's statistics.

    Each client computes its class statistics under the saved adapter's LoRA
    factors (the head does not change them); the discriminant of their sum must be
    the head the run saved.
    """
    from lora_flwr.aggregation.lda import decode_stats, lda_head, merge_stats
    from lora_flwr.experiment import get_workspace
    from lora_flwr.fl.client import LoRAClient

    ws = get_workspace(cfg)
    ws.adapter.load(run_dir / "adapter")
    saved = ws.adapter.get_named_weights()
    parts = []
    for pid in range(num_clients):
        client = LoRAClient(cfg, pid, num_clients)
        dim = client.ws.adapter.head_layer(2)[1].in_features
        parts.append(decode_stats(client.head_stats(), 2, dim))
    weight, bias = lda_head(merge_stats(parts), cfg.head.lda_shrinkage)
    np.testing.assert_allclose(saved["classifier.weight"], weight, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(saved["classifier.bias"], bias, rtol=1e-3, atol=1e-4)
    ws.reset_adapter()
