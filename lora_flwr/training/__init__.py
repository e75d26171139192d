"""Local training: the LoRATrainer loop, its metrics and the setup shared by runs."""

from lora_flwr.protocol import (
    ACCURACY,
    EVAL_LOSS,
    NUM_EXAMPLES,
    NUM_STEPS,
    NUM_TOKENS,
    PERPLEXITY,
    SECONDS,
    TOKENS_PER_S,
    TRAIN_LOSS,
)
from lora_flwr.training.trainer import (
    LoRATrainer,
    lr_factor,
    resolve_device,
)

__all__ = [
    "ACCURACY",
    "EVAL_LOSS",
    "NUM_EXAMPLES",
    "NUM_STEPS",
    "NUM_TOKENS",
    "PERPLEXITY",
    "SECONDS",
    "TOKENS_PER_S",
    "TRAIN_LOSS",
    "LoRATrainer",
    "lr_factor",
    "resolve_device",
]
