"""lora_flwr: federated LoRA fine-tuning of pretrained transformers on Flower."""

__version__ = "0.1.0"
