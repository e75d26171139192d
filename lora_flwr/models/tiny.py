"""Tiny random test models (BERT, Llama, GPT-2) and their character tokenizer.

Fully offline and built in milliseconds, for fast tests.
"""

from __future__ import annotations

import string
from typing import cast

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from lora_flwr.config import ModelConfig
from lora_flwr.models.bundle import ModelBundle, resolve_task

# Sizes of the tiny random models: big enough to have every module kind of the
# real ones (attention projections, MLP, norms, embeddings), small enough to build
# and train in milliseconds.
TINY_HIDDEN = 32
TINY_LAYERS = 2
TINY_INTERMEDIATE = 64
TINY_MAX_POSITIONS = 512


def _load_tiny_bert(cfg: ModelConfig) -> ModelBundle:
    """Build a random 2-layer BERT classifier with a character tokenizer."""
    tokenizer = _char_tokenizer(encoder=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=2,
        intermediate_size=TINY_INTERMEDIATE,
        max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.num_labels = cfg.num_labels
    task = resolve_task(cfg, config)
    return ModelBundle(BertForSequenceClassification(config), tokenizer, task, cfg.name)


def _load_tiny_llama(cfg: ModelConfig) -> ModelBundle:
    """Build a random 2-layer Llama (GQA, tied embeddings, like SmolLM2)."""
    tokenizer = _char_tokenizer(encoder=False)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.num_labels = cfg.num_labels
    task = resolve_task(cfg, config)
    model: PreTrainedModel
    if task == "causal_lm":
        model = LlamaForCausalLM(config)
    else:
        model = LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]
    return ModelBundle(model, tokenizer, task, cfg.name)


def _load_tiny_gpt2(cfg: ModelConfig) -> ModelBundle:
    """Build a random 2-layer GPT-2 (``Conv1D`` layers ``c_attn``, ``c_proj``)."""
    tokenizer = _char_tokenizer(encoder=False)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=TINY_HIDDEN,
        n_layer=TINY_LAYERS,
        n_head=2,
        n_inner=TINY_INTERMEDIATE,
        n_positions=TINY_MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.num_labels = cfg.num_labels
    task = resolve_task(cfg, config)
    model: PreTrainedModel
    if task == "causal_lm":
        model = GPT2LMHeadModel(config)
    else:
        model = GPT2ForSequenceClassification(config)
    return ModelBundle(model, tokenizer, task, cfg.name)


def _char_tokenizer(*, encoder: bool) -> PreTrainedTokenizerBase:
    """Build a character-level tokenizer over printable ASCII, fully offline.

    Encoders get BERT's specials and ``[CLS] text [SEP]``; decoders get
    ``<pad> <unk> <s> </s>`` and no added tokens (like GPT-2). Other characters map
    to the unknown token. Decoding joins the characters back, so ASCII text
    round-trips exactly.
    """
    if encoder:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=specials[1]))
    # Every character (newlines included) is its own word.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if encoder:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        names = {"cls_token": "[CLS]", "sep_token": "[SEP]"}
    else:
        names = {"bos_token": "<s>", "eos_token": "</s>"}
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        pad_token=specials[0],
        unk_token=specials[1],
        model_max_length=TINY_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        **names,
    )
    return cast(PreTrainedTokenizerBase, tokenizer)
