"""Native (plain torch) implementations of the two built-in pretrained models.

``minilm`` (BERT) and ``smollm2-135m`` (Llama) built without importing
``transformers``: a fresh process (a deployed SuperNode starts one per message)
then pays for torch, ``safetensors`` and ``tokenizers`` only, and the weights are
memory-mapped from the same safetensors files. Module names, state-dict keys, the
forward maths and the seeded new heads are those of the ``transformers`` classes
(tests compare logits, losses and LoRA gradients with them), so LoRA targets,
``modules_to_save`` and PEFT exports do not depend on the implementation.

``model.implementation`` picks: ``"auto"`` (native for these built-ins, transformers
for everything else), ``"native"`` or ``"transformers"``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_flwr.config import NATIVE_MODEL_NAMES, ModelConfig, Task
from lora_flwr.models.bundle import ModelBundle, resolve_task
from lora_flwr.models.native.bert import BertForSequenceClassification
from lora_flwr.models.native.common import ModelOutput, NativeConfig
from lora_flwr.models.native.llama import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)
from lora_flwr.models.native.tokenizer import NativeTokenizer
from lora_flwr.models.native.weights import (
    WEIGHTS_NAME,
    assign_weights,
    load_weights,
    read_config,
)

NATIVE_MODELS: tuple[str, ...] = NATIVE_MODEL_NAMES

__all__ = [
    "NATIVE_MODELS",
    "BertForSequenceClassification",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "ModelOutput",
    "NativeConfig",
    "NativeTokenizer",
    "build_bert_classifier",
    "build_llama",
    "uses_native",
]


def uses_native(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` is built by this package (see ``model.implementation``)."""
    if cfg.implementation == "transformers":
        return False
    return cfg.name in NATIVE_MODELS


def build_bert_classifier(cfg: ModelConfig, model_dir: Path) -> ModelBundle:
    """Build a BERT checkpoint with a new, seeded classification head.

    The global torch RNG must be seeded by the caller (``load_model`` does); the
    head is its first draw, as in transformers.

    Raises
    ------
    ValueError
        If ``cfg.task`` is ``"causal_lm"`` (BERT is an encoder).
    RuntimeError
        If the config, weights or tokenizer files are missing or do not match.
    """
    config = NativeConfig(read_config(model_dir), num_labels=cfg.num_labels)
    task = resolve_task(cfg, config)  # raises for causal_lm
    with torch.device("meta"):  # no memory, no random draws
        model = BertForSequenceClassification(config)
    # BERT checkpoints (BertModel) store the body without the "bert." prefix.
    weights = {
        (k if k.startswith(("bert.", "classifier.")) else f"bert.{k}"): v
        for k, v in load_weights(model_dir).items()
    }
    left = assign_weights(
        model, weights, source=model_dir / WEIGHTS_NAME, new=("classifier.",)
    )
    if left:
        model.init_head()
    tokenizer = NativeTokenizer.from_dir(
        model_dir, model_input_names=("input_ids", "token_type_ids", "attention_mask")
    )
    return ModelBundle(model, tokenizer, task, cfg.name)


def build_llama(cfg: ModelConfig, model_dir: Path) -> ModelBundle:
    """Build a Llama checkpoint as a causal LM, or as a classifier with a new head.

    Raises
    ------
    RuntimeError
        If the config, weights or tokenizer files are missing or do not match.
    """
    config = NativeConfig(read_config(model_dir), num_labels=cfg.num_labels)
    task: Task = resolve_task(cfg, config)
    weights = load_weights(model_dir)
    source = model_dir / WEIGHTS_NAME
    model: LlamaForCausalLM | LlamaForSequenceClassification
    with torch.device("meta"):  # no memory, no random draws
        if task == "causal_lm":
            model = LlamaForCausalLM(config)
        else:
            model = LlamaForSequenceClassification(config)
    if isinstance(model, LlamaForCausalLM):
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied and "lm_head.weight" not in weights:
            embed = weights.get("model.embed_tokens.weight")
            if embed is not None:
                weights = {**weights, "lm_head.weight": embed}
        assign_weights(model, weights, source=source)
        model.tie_weights()  # assignment replaced the shared parameter
    else:
        if assign_weights(model, weights, source=source, new=("score.",)):
            model.init_head()
    tokenizer = NativeTokenizer.from_dir(
        model_dir, model_input_names=("input_ids", "attention_mask")
    )
    return ModelBundle(model, tokenizer, task, cfg.name)
