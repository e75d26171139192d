"""Llama in plain torch (SmolLM2-135M): causal LM and sequence classifier.

Module names and state-dict keys are those of ``transformers``' ``LlamaForCausalLM``
and ``LlamaForSequenceClassification`` (``model.layers.0.self_attn.q_proj``,
``model.norm``, ``lm_head``, ``score``). The maths follows transformers' Llama:
pre-norm blocks with RMSNorm (computed in float32), rotary position embeddings
(the "default" type, ``inv_freq = theta^(-2i/d)``, halves rotated), grouped-query
attention (``num_key_value_heads`` shared by ``num_attention_heads``), a SiLU-gated
MLP, and the output head tied to the input embeddings when the config says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_flwr.models.native.common import (
    Checkpointable,
    ModelOutput,
    NativeConfig,
    embedding,
    run_block,
)

IGNORE_INDEX = -100


def rope_theta(config: NativeConfig) -> float:
    """Return the rotary base (``rope_parameters.rope_theta``, or ``rope_theta``)."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", scaling.get("rope_type", "default"))
    if kind != "default":
        raise RuntimeError(
            f"The native Llama supports the default rotary embedding, not {kind!r}; "
            "set model.implementation = 'transformers'"
        )
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check_llama_config(config: NativeConfig) -> None:
    """Reject configs this implementation does not compute like transformers."""
    act = config.require("hidden_act")
    if act != "silu":
        raise RuntimeError(
            f"The native Llama supports hidden_act 'silu', not {act!r}; "
            "set model.implementation = 'transformers'"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise RuntimeError(
            "The native Llama has no attention or MLP biases; set "
            "model.implementation = 'transformers'"
        )
    rope_theta(config)


class LlamaRMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class LlamaRotaryEmbedding(nn.Module):
    """Cosines and sines of the rotary angles ``position * inv_freq``.

    ``inv_freq`` is recomputed per call (``head_dim / 2`` numbers) instead of held
    in a buffer, so the model can be built on the ``meta`` device and loaded by
    assignment with nothing left to materialise.
    """

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.theta = rope_theta(config)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``cos`` and ``sin`` of shape ``(seq, head_dim)``."""
        exponents = torch.arange(
            0, self.head_dim, 2, dtype=torch.int64, device=positions.device
        ).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def head_dim_of(config: NativeConfig) -> int:
    """``head_dim`` from the config, or ``hidden_size / num_attention_heads``."""
    value = getattr(config, "head_dim", None)
    if value is None:
        return int(config.hidden_size // config.num_attention_heads)
    return int(value)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAttention(nn.Module):
    """Grouped-query attention with rotary embeddings on queries and keys."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0))
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attend causally; ``mask`` (boolean, True where kept) covers padding."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # each key/value head serves `groups` query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        p = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None
        )
        projected: torch.Tensor = self.o_proj(
            out.transpose(1, 2).reshape(batch, seq, -1)
        )
        return projected


class LlamaMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated feed-forward."""
        out: torch.Tensor = self.down_proj(
            self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        )
        return out


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        eps = float(config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run the block."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class LlamaModel(nn.Module):
    """Token embeddings, the decoder blocks and the final norm."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(
            config.vocab_size, config.hidden_size, config.pad_token_id
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, float(config.rms_norm_eps))
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False  # see Checkpointable

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the final hidden states ``(batch, seq, hidden)``.

        Positions are ``0 .. seq-1`` for every row, as transformers counts them
        when no ``position_ids`` are given (right padding keeps them right).
        """
        seq = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        positions = torch.arange(seq, device=input_ids.device)
        cos, sin = self.rotary_emb(positions, x.dtype)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = run_block(self, layer, x, cos, sin, mask)
        out: torch.Tensor = self.norm(x)
        return out


class _LlamaBase(Checkpointable):
    """What both heads share: the config, the body, ``dtype`` and ``init_head``."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        check_llama_config(config)
        self.config = config
        self.model = LlamaModel(config)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters."""
        return next(self.parameters()).dtype


class LlamaForCausalLM(_LlamaBase):
    """Llama with a language-model head (tied to the embeddings if configured).

    Parameters
    ----------
    config
        The checkpoint's ``config.json``.
    """

    def __init__(self, config: NativeConfig) -> None:
        super().__init__(config)
        self.vocab_size = int(config.vocab_size)
        self.lm_head = nn.Linear(config.hidden_size, self.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the input embeddings with the head when ``tie_word_embeddings``."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Return logits ``(batch, seq, vocab)`` and, given labels, the LM loss.

        The loss is the mean cross-entropy of predicting token ``t+1`` from the
        prefix up to ``t``, over labels that are not -100 (transformers' rule).
        """
        logits = self.lm_head(self.model(input_ids, attention_mask))
        loss = None
        if labels is not None:
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            loss = F.cross_entropy(
                logits.float().reshape(-1, self.vocab_size),
                shifted.reshape(-1).to(logits.device),
                ignore_index=IGNORE_INDEX,
            )
        return ModelOutput(logits=logits, loss=loss)


class LlamaForSequenceClassification(_LlamaBase):
    """Llama with a linear ``score`` head read at each row's last non-pad token.

    Parameters
    ----------
    config
        The checkpoint's ``config.json`` with ``num_labels`` set; its
        ``pad_token_id`` finds the last real token (as in transformers).
    """

    def __init__(self, config: NativeConfig) -> None:
        super().__init__(config)
        self.num_labels = int(config.num_labels)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)

    def init_head(self) -> None:
        """Draw the new head ``score.weight ~ N(0, initializer_range)``.

        The rule and RNG order of transformers' loader, which draws nothing else
        for a checkpoint that lacks only the head.
        """
        std = float(self.config.initializer_range)
        weight = torch.empty(self.num_labels, self.config.hidden_size)
        self.score.weight = nn.Parameter(weight.normal_(0.0, std))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Return logits ``(batch, num_labels)`` and, given labels, the mean CE."""
        logits = self.score(self.model(input_ids, attention_mask))
        batch = input_ids.shape[0]
        pad = getattr(self.config, "pad_token_id", None)
        if pad is None:
            if batch != 1:
                raise ValueError(
                    "A batch of several rows needs the model config's pad_token_id"
                )
            last = torch.full((1,), input_ids.shape[1] - 1, device=logits.device)
        else:
            # The rightmost token that is not padding, for right or left padding.
            real = (input_ids != pad).to(torch.int32)
            index = torch.arange(input_ids.shape[1], device=logits.device)
            last = (index * real).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                pooled.float().view(-1, self.num_labels), labels.view(-1)
            )
        return ModelOutput(logits=pooled, loss=loss)
