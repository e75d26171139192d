"""Pure-torch LoRA: layers, the adapter object and its file formats."""

from lora_flwr.lora.adapter import LoRAAdapter, load_adapter
from lora_flwr.lora.io import (
    load_base_delta,
    load_json,
    load_peft,
    save_base_delta,
    save_json,
    save_merged_model,
    save_peft,
)
from lora_flwr.lora.layers import LoRALinear
from lora_flwr.lora.model_ops import merge_and_unload

__all__ = [
    "LoRAAdapter",
    "LoRALinear",
    "load_adapter",
    "load_base_delta",
    "load_json",
    "load_peft",
    "merge_and_unload",
    "save_base_delta",
    "save_json",
    "save_merged_model",
    "save_peft",
]
