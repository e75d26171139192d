"""ClientApp: serves :class:`~lora_flwr.fl.client.LoRAClient` to Flower.

``app`` serves ``flwr run`` and SuperNodes (config from ``run_config``);
``make_client_app(cfg)`` serves the in-process simulation.
"""

from __future__ import annotations

from flwr.client import ClientApp

from lora_flwr.config import ExperimentConfig
from lora_flwr.fl.client import make_client_fn


def make_client_app(cfg: ExperimentConfig | None = None) -> ClientApp:
    """Build a ClientApp for ``cfg`` (or for the run_config when ``cfg`` is None)."""
    return ClientApp(client_fn=make_client_fn(cfg))


app = make_client_app()
