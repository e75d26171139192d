"""BERT for sequence classification in plain torch (all-MiniLM-L6-v2).

Module names and state-dict keys are those of ``transformers``'
``BertForSequenceClassification`` (``bert.encoder.layer.0.attention.self.query``,
``bert.pooler.dense``, ``classifier``), so LoRA targets, ``modules_to_save`` and the
PEFT export are the same for both implementations. The maths follows BERT (Devlin
et al. 2019) as transformers computes it: post-LayerNorm residual blocks, exact
(erf) GELU, absolute position embeddings, the pooler's ``tanh(W h_[CLS] + b)``,
dropout on the embeddings, the attention probabilities, each block's output and the
pooled vector, with the probabilities from the config.

Padded positions are never computed. A batch with padding runs unpadded (as
FlashAttention's BERT does): the real tokens of every row are packed into one
``(tokens, hidden)`` matrix, so the linear layers, LayerNorms, GELU and dropout
see only real tokens, and only attention puts them back on the padded
``(batch, seq)`` grid, where the key mask hides the padding. The real tokens'
states are those of the padded computation (a padded query never reaches a real
token), so the logits match it to float rounding, at the cost of the real tokens
alone: random batches of Rotten Tomatoes snippets are ~45 % padding.

The last block computes only what the classifier reads: the pooler takes the
first token's ([CLS]) final state, so that block's query, attention output and
feed-forward run for one token per row (keys and values still for all of them).
The other positions' final states would never reach the logits or a gradient;
skipping them leaves both unchanged and saves ~1/7 of the encoder's work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_flwr.dropout import Dropout, dropout
from lora_flwr.models.native.common import (
    Checkpointable,
    ModelOutput,
    NativeConfig,
    embedding,
    run_block,
)

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


class TokenLayout:
    """Where the real tokens of a right-padded batch sit.

    Parameters
    ----------
    attention_mask
        ``(batch, seq)``, nonzero for real tokens. Each row's first position must
        be real (right padding), since the pooler reads it.
    """

    def __init__(self, attention_mask: torch.Tensor) -> None:
        keep = attention_mask.bool()
        self.batch, self.seq = keep.shape
        # Flat (row * seq + position) index of every real token, in row order.
        self.index = keep.reshape(-1).nonzero().squeeze(1)
        self.key_mask = keep[:, None, None, :]
        lengths = keep.sum(1)
        # Packed index of each row's first token: the real tokens before it.
        self.first = torch.cumsum(lengths, 0) - lengths

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, seq, ...)`` -> ``(tokens, ...)``: keep the real tokens."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(
            0, self.index
        )

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(tokens, d)`` -> ``(batch, seq, d)``, zeros at padded positions."""
        grid = x.new_zeros(self.batch * self.seq, x.shape[-1])
        return grid.index_copy(0, self.index, x).view(self.batch, self.seq, -1)


def first_tokens(x: torch.Tensor, layout: TokenLayout | None) -> torch.Tensor:
    """Each row's first token: ``x[:, 0]``, or its packed row with ``layout``."""
    return x[:, 0] if layout is None else x.index_select(0, layout.first)


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
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        layout: TokenLayout | None = None,
    ) -> torch.Tensor:
        """Embed ``input_ids`` ``(batch, seq)``, packed if given a ``layout``."""
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if layout is not None:
            input_ids = layout.pack(input_ids)
            token_type_ids = layout.pack(token_type_ids)
            positions = layout.pack(positions)
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)
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
        self.dropout = Dropout(config.attention_probs_dropout_prob)

    def forward(
        self, x: torch.Tensor, layout: TokenLayout | None, first_only: bool = False
    ) -> torch.Tensor:
        """Attend over ``x``: ``(batch, seq, hidden)``, or packed with ``layout``.

        Packed, the padded keys are masked out. With ``first_only``, only each
        row's first token queries, giving ``(batch, hidden)``.
        """
        q = self.query(first_tokens(x, layout) if first_only else x)
        k, v = self.key(x), self.value(x)
        mask = None
        if layout is not None:
            k, v, mask = layout.unpack(k), layout.unpack(v), layout.key_mask
        if first_only:
            q = q[:, None]  # one query per row
        elif layout is not None:
            q = layout.unpack(q)
        batch, seq, _ = k.shape
        q = q.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        p = self.dropout.p if self.training else 0.0
        if p > 0.0 and q.device.type == "cpu":
            # torch's CPU attention draws its dropout mask one number per
            # probability; spell attention out to use the cheaper masks.
            scores = (q @ k.transpose(-2, -1)) * (self.head_dim**-0.5)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(dropout(scores.softmax(-1), p), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(batch, -1, self.num_heads * self.head_dim)
        if first_only:
            return out[:, 0]
        return out if layout is None else layout.pack(out)


class BertSelfOutput(nn.Module):
    """Project the attention output, dropout, residual, LayerNorm."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

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

    def forward(
        self, x: torch.Tensor, layout: TokenLayout | None, first_only: bool = False
    ) -> torch.Tensor:
        """Attend and add the residual (each row's first token only, if asked)."""
        residual = first_tokens(x, layout) if first_only else x
        out: torch.Tensor = self.output(self.self(x, layout, first_only), residual)
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
        self.dropout = Dropout(config.hidden_dropout_prob)

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

    def forward(
        self, x: torch.Tensor, layout: TokenLayout | None, first_only: bool = False
    ) -> torch.Tensor:
        """Run the block (for each row's first token only, if asked)."""
        h = self.attention(x, layout, first_only)
        out: torch.Tensor = self.output(self.intermediate(h), h)
        return out


class BertEncoder(nn.Module):
    """The stack of encoder blocks."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.gradient_checkpointing = False  # see Checkpointable

    def forward(self, x: torch.Tensor, layout: TokenLayout | None) -> torch.Tensor:
        """Run every block; return each row's first token's final state.

        The result is ``(batch, hidden)``: the last block computes nothing else.
        """
        if not len(self.layer):
            return first_tokens(x, layout)
        *blocks, last = self.layer
        for block in blocks:
            x = run_block(self, block, x, layout)
        out = run_block(self, last, x, layout, first_only=True)
        return out


class BertPooler(nn.Module):
    """``tanh(dense(h_[CLS]))``: the first token's final state, projected."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        """Pool the first token's final state ``(batch, hidden)``."""
        out: torch.Tensor = self.activation(self.dense(first))
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
        """Return the pooled output ``(batch, hidden)``.

        With padding in ``attention_mask`` the batch runs packed (module
        docstring); a row whose first position is padding (left padding) is
        refused, as the pooler would read a padded position.
        """
        layout = None
        if attention_mask is not None and not bool(attention_mask.all()):
            if not bool(attention_mask[:, 0].all()):
                raise ValueError(
                    "The native BERT needs right padding (every row's first token "
                    "real: the pooler reads it); got a batch with padding at "
                    "position 0. Tokenize with padding_side='right'."
                )
            layout = TokenLayout(attention_mask)
        x = self.embeddings(input_ids, token_type_ids, layout)
        hidden = self.encoder(x, layout)
        out: torch.Tensor = self.pooler(hidden)
        return out


class BertForSequenceClassification(Checkpointable):
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
        self.dropout = Dropout(config.hidden_dropout_prob if p is None else p)
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
