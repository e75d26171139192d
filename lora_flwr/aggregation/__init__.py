"""Aggregation rules for LoRA adapters: pure numpy, one function per rule.

Select a rule by name with ``fed.aggregation``. A rule is called as
``rule(current, updates, names)`` and returns the new global arrays.
"""

from lora_flwr.aggregation import fedit as _fedit  # noqa: F401  (registers "fedit")
from lora_flwr.aggregation.base import (
    AggregationRule,
    ClientUpdate,
    available_rules,
    example_weights,
    get_rule,
    register,
)
from lora_flwr.aggregation.fedit import fedit
from lora_flwr.aggregation.validation import check_update

__all__ = [
    "AggregationRule",
    "ClientUpdate",
    "available_rules",
    "check_update",
    "example_weights",
    "fedit",
    "get_rule",
    "register",
]
