"""LoRA-aware aggregation rules and server optimizers: pure numpy, no Flower.

Select a rule by name with ``fed.aggregation`` and an optimizer with
``server_opt.name``. Each rule is one module whose class docstring states its
formula and cites its paper; :mod:`lora_flwr.aggregation.base` describes the API,
:mod:`lora_flwr.aggregation.state` the values it passes around.
"""

# Importing a rule module registers it.
from lora_flwr.aggregation import (  # noqa: F401
    fedex,
    fedit,
    fedsa,
    fedsvd,
    ffa,
    flexlora,
    flora,
    hetlora,
    rolora,
)
from lora_flwr.aggregation.base import Rule, available_rules, get_rule, register
from lora_flwr.aggregation.linalg import fold_block
from lora_flwr.aggregation.optimizers import OPTIMIZERS, ServerOptimizer
from lora_flwr.aggregation.state import (
    ClientInfo,
    ClientReply,
    FoldBlock,
    GroupPlan,
    ServerState,
    example_weights,
)

__all__ = [
    "OPTIMIZERS",
    "ClientInfo",
    "ClientReply",
    "FoldBlock",
    "GroupPlan",
    "Rule",
    "ServerOptimizer",
    "ServerState",
    "available_rules",
    "example_weights",
    "fold_block",
    "get_rule",
    "register",
]
