"""Pretrained models and tokenizers, loaded offline.

``model.name`` picks one of

* a built-in name (:data:`BUILTIN_MODELS`):

  - ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 22.7 M parameters) with a new
    sequence-classification head, from a pinned package-index release;
  - ``smollm2-135m``: SmolLM2-135M-Instruct (Llama decoder, 134.5 M parameters) from a
    GGUF file in a pinned release, dequantised once and cached as safetensors;
  - ``tiny-bert``, ``tiny-llama``, ``tiny-gpt2``: randomly initialised 2-layer models
    with hidden size 32 and an in-code character tokenizer, for fast tests;

* a local directory written by ``save_pretrained``;
* a Hugging Face Hub id (needs a reachable hub).

Every model comes back in float32, on the CPU, in ``eval()`` mode, with
``requires_grad`` untouched (the LoRA code freezes the base weights). Weights read
from a float32 safetensors file stay views of a copy-on-write memory map of it, so
processes that load the same model (Ray actors) share one copy in the page cache.

Modules: :mod:`~lora_flwr.models.loading` (:func:`load_model`, local directories and
Hub ids), :mod:`~lora_flwr.models.tiny` (the tiny test models),
:mod:`~lora_flwr.models.smollm2` (the one-off GGUF conversion),
:mod:`~lora_flwr.models.source` (the name an export gives its base model, which
PEFT and transformers resolve),
:mod:`~lora_flwr.models.weights` (checks of safetensors files; which weights are
memory-mapped, i.e. shared between processes) and
:mod:`~lora_flwr.models.bundle` (:class:`ModelBundle` and :func:`resolve_task`,
which they all share).
"""

from lora_flwr.models.bundle import ModelBundle, resolve_task
from lora_flwr.models.loading import BUILTIN_MODELS, load_model, model_load_count
from lora_flwr.models.source import base_model_source

__all__ = [
    "BUILTIN_MODELS",
    "ModelBundle",
    "base_model_source",
    "load_model",
    "model_load_count",
    "resolve_task",
]
