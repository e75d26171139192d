"""What every model loader shares: :class:`ModelBundle` and :func:`resolve_task`.

A leaf module, so that :mod:`~lora_flwr.models.loading` and
:mod:`~lora_flwr.models.tiny` can both import it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lora_flwr.config import ModelConfig, Task

if TYPE_CHECKING:  # transformers costs seconds to import; native models skip it
    from transformers import PreTrainedTokenizerBase

    from lora_flwr.models.native.tokenizer import NativeTokenizer

# model_type values of decoder-only language models: ``task = "auto"`` picks
# causal_lm for them even when the config lists no architecture.
CAUSAL_MODEL_TYPES: frozenset[str] = frozenset(
    {
        "bloom",
        "codegen",
        "cohere",
        "falcon",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "gpt_bigcode",
        "gpt_neo",
        "gpt_neox",
        "gptj",
        "granite",
        "llama",
        "mistral",
        "mixtral",
        "mpt",
        "olmo",
        "olmo2",
        "opt",
        "phi",
        "phi3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "smollm3",
        "stablelm",
        "starcoder2",
    }
)

# model_type values of encoder-only models, which cannot be adapted as causal LMs.
ENCODER_MODEL_TYPES: frozenset[str] = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "modernbert",
        "mpnet",
        "roberta",
        "xlm-roberta",
    }
)

_CAUSAL_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class ModelBundle:
    """A model ready to adapt, with its tokenizer.

    Attributes
    ----------
    model
        A ``transformers`` ``PreTrainedModel``, or its plain-torch twin from
        :mod:`lora_flwr.models.native` (same module names): float32, on the CPU,
        ``eval()`` mode, ``requires_grad`` as loaded (all True).
    tokenizer
        Its tokenizer (a ``transformers`` one, or a
        :class:`~lora_flwr.models.native.tokenizer.NativeTokenizer`), with a pad
        token set (for causal LMs the EOS token when the model has none;
        ``model.config.pad_token_id`` then matches).
    task
        ``"seq_cls"`` (logits of shape ``(batch, num_labels)``) or ``"causal_lm"``
        (logits of shape ``(batch, seq, vocab)``).
    name
        The ``ModelConfig.name`` it came from.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | NativeTokenizer
    task: Task
    name: str


class EncoderOnlyError(ValueError):
    """``causal_lm`` asked of an encoder-only model (it cannot generate text)."""

    def __init__(self, message: str, model_type: str) -> None:
        super().__init__(message)
        self.model_type = model_type


def resolve_task(cfg: ModelConfig, hf_config: Any) -> Task:
    """Decide the task for a model from ``cfg.task`` and the model's config.

    ``"auto"`` gives ``"causal_lm"`` when an architecture ends in ``ForCausalLM``
    or ``LMHeadModel`` or the ``model_type`` is a known decoder (llama, gpt2,
    mistral, qwen2, ...), and ``"seq_cls"`` otherwise.

    Parameters
    ----------
    cfg
        The model section; its ``task`` wins unless it is ``"auto"``.
    hf_config
        The model's config: a ``transformers`` ``PretrainedConfig`` or a
        :class:`~lora_flwr.models.native.common.NativeConfig` (``model_type`` and
        ``architectures`` are read).

    Returns
    -------
    Task
        ``"seq_cls"`` or ``"causal_lm"``.

    Raises
    ------
    EncoderOnlyError
        If ``cfg.task`` is ``"causal_lm"`` for an encoder-only model (BERT, ...).
    """
    model_type = str(getattr(hf_config, "model_type", "") or "")
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if cfg.task == "causal_lm":
        if model_type in ENCODER_MODEL_TYPES:
            raise EncoderOnlyError(
                f"`model.task` should be 'seq_cls' or 'auto' for {cfg.name!r}, an "
                f"encoder-only {model_type} model that cannot generate text, but the "
                f"value passed is {cfg.task!r}",
                model_type,
            )
        return "causal_lm"
    if cfg.task == "seq_cls":
        return "seq_cls"
    if model_type in CAUSAL_MODEL_TYPES or any(
        arch.endswith(_CAUSAL_ARCH_SUFFIXES) for arch in architectures
    ):
        return "causal_lm"
    return "seq_cls"
