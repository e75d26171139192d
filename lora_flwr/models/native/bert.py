"""BERT for sequence classification in plain torch (all-MiniLM-L6-v2).

Module names and state-dict keys are those of ``transformers``'
``BertForSequenceClassification`` (``bert.encoder.layer.0.attention.self.query``,
``bert.pooler.dense``, ``classifier``), so LoRA targets, ``modules_to_save`` and the
PEFT export are the same for both implementations. The maths follows BERT (Devlin
et al. 2019) as transformers computes it: post-LayerNorm residual blocks, exact
(erf) GELU, absolute position embeddings, the pooler's ``tanh(W h_[CLS] + b)``,
dropout on the embeddings, the attention probabilities, each block's output and the
pooled vector, with the probabilities from the config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_flwr.models.native.common import ModelOutput, NativeConfig, embedding

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def check_bert_config(config: NativeConfig) -> None:
    """Reject configs this implementation does not compute like transformers."""
    act = config.require("hidden_act")
    if act not in _ACTIVATIONS:
        raise RuntimeError(
            f"The native BERT supports hidden_act {sorted(_ACTIVATIONS)}, not {act!r};"
            " set model.implementation = 'transformers'"
        )
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise RuntimeError(
            f"The native BERT supports absolute position embeddings only, not {kind!r};"
            " set model.implementation = 'transformers'"
        )
    if config.require("hidden_size") % config.require("num_attention_heads"):
        raise RuntimeError("hidden_size is not a multiple of num_attention_heads")


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = embedding(
            config.vocab_size, hidden, padding_idx=config.pad_token_id
        )
        self.position_embeddings = embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = embedding(config.type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Embed ``input_ids`` of shape ``(batch, seq)``."""
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)[None]
        )
        out: torch.Tensor = self.dropout(self.LayerNorm(x))
        return out


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over the unpadded keys."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attend; ``mask`` is boolean ``(batch, 1, 1, seq)``, True where kept."""
        batch, seq, _ = x.shape
        shape = (batch, seq, self.num_heads, self.head_dim)
        q = self.query(x).view(shape).transpose(1, 2)
        k = self.key(x).view(shape).transpose(1, 2)
        v = self.value(x).view(shape).transpose(1, 2)
        p = self.dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).reshape(batch, seq, -1)


class BertSelfOutput(nn.Module):
    """Project the attention output, dropout, residual, LayerNorm."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Return ``LayerNorm(dropout(dense(x)) + residual)``."""
        out: torch.Tensor = self.LayerNorm(self.dropout(self.dense(x)) + residual)
        return out


class BertAttention(nn.Module):
    """Self-attention and its output block."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attend and add the residual."""
        out: torch.Tensor = self.output(self.self(x, mask), x)
        return out


class BertIntermediate(nn.Module):
    """The feed-forward expansion and its activation."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _ACTIVATIONS[config.hidden_act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``act(dense(x))``."""
        out: torch.Tensor = self.intermediate_act_fn(self.dense(x))
        return out


class BertOutput(nn.Module):
    """The feed-forward projection back, dropout, residual, LayerNorm."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Return ``LayerNorm(dropout(dense(x)) + residual)``."""
        out: torch.Tensor = self.LayerNorm(self.dropout(self.dense(x)) + residual)
        return out


class BertLayer(nn.Module):
    """One encoder block: attention, then feed-forward."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Run the block."""
        h = self.attention(x, mask)
        out: torch.Tensor = self.output(self.intermediate(h), h)
        return out


class BertEncoder(nn.Module):
    """The stack of encoder blocks."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config) for _ in range(config.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Run every block."""
        for block in self.layer:
            x = block(x, mask)
        return x


class BertPooler(nn.Module):
    """``tanh(dense(h_[CLS]))``: the first token's final state, projected."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool the sequence ``(batch, seq, hidden)`` to ``(batch, hidden)``."""
        out: torch.Tensor = self.activation(self.dense(x[:, 0]))
        return out


class BertModel(nn.Module):
    """Embeddings, encoder and pooler."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the pooled output ``(batch, hidden)``."""
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids), mask)
        out: torch.Tensor = self.pooler(hidden)
        return out


class BertForSequenceClassification(nn.Module):
    """BERT with dropout and a linear classifier on the pooled output.

    Parameters
    ----------
    config
        The checkpoint's ``config.json`` with ``num_labels`` set.
    """

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        check_bert_config(config)
        self.config = config
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters."""
        return next(self.parameters()).dtype

    def init_head(self) -> None:
        """Draw the new classifier: weight ~ N(0, initializer_range), bias 0.

        The same rule and RNG order as transformers (whose loader draws nothing
        else for a checkpoint that lacks only the head), so a seed gives the same
        head in both implementations.
        """
        std = float(self.config.initializer_range)
        weight = torch.empty(self.num_labels, self.config.hidden_size)
        self.classifier.weight = nn.Parameter(weight.normal_(0.0, std))
        self.classifier.bias = nn.Parameter(torch.zeros(self.num_labels))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Return logits ``(batch, num_labels)`` and, given labels, the mean CE."""
        pooled = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return ModelOutput(logits=logits, loss=loss)
