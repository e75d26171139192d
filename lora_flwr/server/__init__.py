"""The Flower-free server side: the round core and its side protocols.

:class:`RoundCore` owns the server state, the rule, the server optimizer and the
guards, and answers in values: the plan and payload for each sampled partition,
and the outcome of a round's replies. :mod:`lora_flwr.fl.strategy` translates
between it and Flower. Side protocols plug in as hooks (:mod:`.hooks`: DP,
SecAgg+) or as modules the core calls (:mod:`.head`, :mod:`.evaluation`).
"""

from lora_flwr.server.core import Outgoing, RoundCore, build_optimizer, build_rule
from lora_flwr.server.evaluation import Arrays, EvaluateFn, RoundView
from lora_flwr.server.guards import RunAborted
from lora_flwr.server.record import RoundRecord

__all__ = [
    "Arrays",
    "EvaluateFn",
    "Outgoing",
    "RoundCore",
    "RoundRecord",
    "RoundView",
    "RunAborted",
    "build_optimizer",
    "build_rule",
]
