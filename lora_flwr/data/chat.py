r"""Render conversations with the tokenizer's chat template; loss on responses only.

Each conversation is rendered whole by ``tokenizer.apply_chat_template`` (the
model's own template: ChatML for SmolLM2-Instruct) and tokenized once with
character offsets. The assistant turns are located as character spans by
rendering the prefixes around each one, as TRL's and FastChat's masking do:

* ``before`` = the turns before it, with the generation prompt
  (``"<|im_start|>assistant\n"``), so the span starts at the response itself;
* ``upto`` = the turns up to and including it; the span ends where ``upto`` ends,
  less trailing whitespace (ChatML's newline after ``<|im_end|>`` is never
  generated, the ``<|im_end|>`` that stops generation is learnt).

A token is a target when it overlaps a span (transformers'
``return_assistant_tokens_mask`` uses the same rule); every other token gets the
label -100. This needs no ``{% generation %}`` markers in the template, which
SmolLM2's lacks.

Truncation keeps the first ``max_length`` tokens. A conversation that loses part
of a response there is kept and counted (``truncated``); one that loses every
response token would train on nothing and is left out and counted (``dropped``):
no response is dropped silently.

Batches: length-bucketed, not packed. ``train.bucket_batches`` (shuffle, cut the
order into chunks of that many batches, sort each chunk by length) already keeps
padding low for conversations of mixed length, and every batch row stays one
conversation. Packing would need per-document attention masks and position ids
(else one conversation attends to the one packed before it), which neither the
native models nor the ``transformers`` path give here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_flwr.data.corpus import Conversation

logger = logging.getLogger(__name__)

# model.fallback_template = "chatml": ChatML as SmolLM2-Instruct writes it, without
# its default system prompt. Used only when the tokenizer has no template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FALLBACK_TEMPLATES: dict[str, str] = {"chatml": CHATML}


@dataclass(frozen=True)
class RenderedChat:
    """Token ids and target masks of rendered conversations, with the cut counts."""

    input_ids: tuple[torch.Tensor, ...]
    targets: tuple[torch.Tensor, ...]
    truncated: int  # kept, with part of a response cut at max_length
    dropped: int  # left out: every response token was cut


@dataclass(frozen=True)
class RenderedSpans:
    """One rendered conversation and its assistant spans ``[start, end)`` in it."""

    text: str
    spans: tuple[tuple[int, int], ...]


def chat_template(tokenizer: Any, fallback: str = "none", model_name: str = "") -> str:
    """Return the template to render with: the tokenizer's own, else the fallback.

    Parameters
    ----------
    tokenizer
        A ``transformers`` tokenizer or a
        :class:`~lora_flwr.models.native.tokenizer.NativeTokenizer`.
    fallback
        ``model.fallback_template``: ``"none"`` refuses a tokenizer without a
        template, ``"chatml"`` uses :data:`CHATML` then.
    model_name
        ``model.name``, for the message.

    Returns
    -------
    str
        A Jinja chat template.

    Raises
    ------
    ValueError
        In one line, when the tokenizer has no template and ``fallback`` is
        ``"none"``.
    """
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if isinstance(own, str) and own.strip():
        return own
    if fallback in FALLBACK_TEMPLATES:
        return FALLBACK_TEMPLATES[fallback]
    if fallback != "none":
        raise ValueError(
            f"`model.fallback_template` should be one of "
            f"{['none', *FALLBACK_TEMPLATES]} but the value passed is {fallback!r}"
        )
    raise ValueError(
        f"`model.name` = {model_name!r} has a tokenizer without a chat template, "
        "and instruction data is rendered with one; use an instruct model whose "
        "tokenizer has one (e.g. model.name = 'smollm2-135m'), or set "
        "model.fallback_template = 'chatml'"
    )


def render(tokenizer: Any, template: str, conversation: Conversation) -> RenderedSpans:
    """Render one conversation; return its text and the assistant spans in it.

    Raises
    ------
    ValueError
        If the template does not render a conversation as the rendering of its
        earlier turns followed by the later ones (the spans cannot be found).
    """
    messages = [{"role": r, "content": c} for r, c in conversation]
    full = _apply(tokenizer, template, messages)
    spans: list[tuple[int, int]] = []
    for k, (role, content) in enumerate(conversation):
        if role != "assistant":
            continue
        last = k == len(messages) - 1  # the usual end: upto is the whole text
        upto = full if last else _apply(tokenizer, template, messages[: k + 1])
        # transformers renders no empty conversation; k == 0 goes by the content.
        before = _apply(tokenizer, template, messages[:k], generation=True) if k else ""
        if k and upto.startswith(before):
            start = len(before)
        else:  # e.g. a default system turn added only before a first user turn
            start = upto.rfind(content.strip())
        if start < 0 or not full.startswith(upto):
            raise ValueError(
                "The chat template renders a turn differently once later turns "
                "follow, so the responses cannot be located for response-only "
                "loss; use a model whose template renders the turns in order "
                "(ChatML does)"
            )
        spans.append((start, max(start, len(upto.rstrip()))))
    return RenderedSpans(full, tuple(spans))


def last_response(conversation: Conversation) -> int:
    """Return the index of the conversation's last assistant turn (-1: none)."""
    return max(
        (k for k, (role, _) in enumerate(conversation) if role == "assistant"),
        default=-1,
    )


def render_prompt(tokenizer: Any, template: str, conversation: Conversation) -> str:
    r"""Render a conversation's turns before its last response, ready to answer.

    The turns up to (not including) the last assistant turn, with the generation
    prompt (``"<|im_start|>assistant\n"`` in ChatML): what the model sees when it
    is asked to write that response.

    Raises
    ------
    ValueError
        If the conversation has no assistant turn, or none with a turn before it.
    """
    last = last_response(conversation)
    if last < 1:
        raise ValueError(
            "a conversation needs a turn before its last assistant turn to be asked"
        )
    messages = [{"role": r, "content": c} for r, c in conversation[:last]]
    return _apply(tokenizer, template, messages, generation=True)


def _apply(
    tokenizer: Any,
    template: str,
    messages: list[dict[str, str]],
    *,
    generation: bool = False,
) -> str:
    """``tokenizer.apply_chat_template`` to text."""
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        add_generation_prompt=generation,
        tokenize=False,
    )
    return str(text)


def tokenize_chat(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    max_length: int,
    *,
    fallback_template: str = "none",
    model_name: str = "",
) -> RenderedChat:
    """Render, tokenize and mask conversations for response-only training.

    Parameters
    ----------
    conversations
        One conversation per example (``TextDataset.messages``).
    tokenizer
        A fast tokenizer (character offsets are needed) with ``apply_chat_template``.
    max_length
        Tokens kept per example (the first ones).
    fallback_template
        ``model.fallback_template`` (see :func:`chat_template`).
    model_name
        ``model.name``, for messages.

    Returns
    -------
    RenderedChat
        Ids and target masks of the kept examples, and how many were cut.

    Raises
    ------
    ValueError
        For a tokenizer without a chat template (and no fallback), one without
        character offsets, or data where ``max_length`` cuts every response.
    """
    template = chat_template(tokenizer, fallback_template, model_name)
    rendered = [render(tokenizer, template, conv) for conv in conversations]
    if not rendered:
        return RenderedChat((), (), 0, 0)
    try:
        encoded = tokenizer(
            [r.text for r in rendered],
            add_special_tokens=False,  # the template writes the special tokens
            return_offsets_mapping=True,
        )
    except (NotImplementedError, TypeError):
        raise ValueError(
            f"`model.name` = {model_name!r} has a tokenizer without character "
            "offsets (a slow tokenizer); response-only loss needs a fast one "
            "(tokenizer.json)"
        ) from None
    ids_out: list[torch.Tensor] = []
    targets_out: list[torch.Tensor] = []
    truncated = dropped = 0
    for item, ids, offsets in zip(
        rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        target = _target_mask(offsets, item.spans)
        kept = int(target[:max_length].sum())
        if kept == 0:
            dropped += 1
            continue
        truncated += int(kept < int(target.sum()))
        ids_out.append(torch.tensor(ids[:max_length], dtype=torch.long))
        targets_out.append(target[:max_length].clone())
    if not ids_out:
        raise ValueError(
            f"`model.max_length` = {max_length} cuts every response of all "
            f"{len(rendered)} conversations (the prompts fill it); raise "
            "model.max_length"
        )
    return RenderedChat(tuple(ids_out), tuple(targets_out), truncated, dropped)


def _target_mask(
    offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Mark each token whose characters ``[start, end)`` overlap a span."""
    bounds = torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)
    start, end = bounds[:, 0], bounds[:, 1]
    target = torch.zeros(start.shape, dtype=torch.bool)
    for s, e in spans:
        target |= (start < e) & (end > s)
    return target & (end > start)


def report_cuts(
    where: str, max_length: int, kept: int, truncated: int, dropped: int
) -> None:
    """Log how many responses ``model.max_length`` cut (a warning when any)."""
    if truncated == 0 and dropped == 0:
        logger.info(
            "%s: %d conversations, no response cut at model.max_length = %d",
            where,
            kept,
            max_length,
        )
        return
    logger.warning(
        "%s: model.max_length = %d cut the responses of %d conversation(s) short "
        "(kept, %d in all) and of %d entirely (left out); raise model.max_length "
        "to keep them whole",
        where,
        max_length,
        truncated,
        kept,
        dropped,
    )
