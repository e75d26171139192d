"""Pure-torch LoRA: layers, the adapter object and its file formats."""

from lora_flwr.lora.adapter import LoRAAdapter, merge_and_unload
from lora_flwr.lora.io import (
    load_adapter,
    load_json,
    load_peft,
    save_json,
    save_merged_model,
    save_peft,
)
from lora_flwr.lora.layers import LoRALinear

__all__ = [
    "LoRAAdapter",
    "LoRALinear",
    "load_adapter",
    "load_json",
    "load_peft",
    "merge_and_unload",
    "save_json",
    "save_merged_model",
    "save_peft",
]
