"""ClientApp: serves :class:`~lora_flwr.fl.client.LoRAClient` to Flower.

``app`` serves ``flwr run`` and SuperNodes (config from ``run_config``);
``make_client_app(cfg)`` serves the in-process simulation.
"""

from __future__ import annotations

from flwr.client import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, Message

from lora_flwr import profiling
from lora_flwr.config import ExperimentConfig
from lora_flwr.fl.client import make_client_fn
from lora_flwr.fl.compat import ClientAppCallable, Mod

# In a deployed node's fresh ClientApp process the imports above are the first
# of this package (profiling's import notes their start): compute.profile reports
# how long they took (torch, transformers).
profiling.mark_app_imports_done()


def make_secagg_mod(
    cfg: ExperimentConfig | None = None,
) -> Mod:
    """Return a mod that runs Flower's SecAgg+ protocol when the run asks for it.

    ``secaggplus_mod`` cannot sit on a plain run's fit messages (it expects its
    protocol stages), so whether it runs follows ``secagg.enabled`` of the run's
    config: the closure's ``cfg``, or else the node's ``run_config``.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        exp = cfg if cfg is not None else ExperimentConfig.from_flat(context.run_config)
        if exp.secagg.enabled:
            return secaggplus_mod(msg, context, call_next)
        return call_next(msg, context)

    return mod


def make_client_app(cfg: ExperimentConfig | None = None) -> ClientApp:
    """Build a ClientApp for ``cfg`` (or for the run_config when ``cfg`` is None)."""
    return ClientApp(client_fn=make_client_fn(cfg), mods=[make_secagg_mod(cfg)])


app = make_client_app()
