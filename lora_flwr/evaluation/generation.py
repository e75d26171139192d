"""Greedy one-token answers for many prompts: one forward pass per batch.

Generating one token greedily is the argmax of the logits at each prompt's last
token, so a batch needs one forward pass and no ``generate`` loop, no cache and
no logits for the other positions. How a batch is padded depends on the model:

* ``transformers`` models (they have ``generate``): left padding, with the
  ``position_ids`` that ``generate`` derives from the attention mask
  (``cumsum - 1``, pads at 1), so each row's logits are those of
  ``model.generate(max_new_tokens=1, do_sample=False)`` on that batch; only the
  last position is projected to the vocabulary (``logits_to_keep=1``).
* the native models (:mod:`lora_flwr.models.native`) count positions from 0 in
  every row, so they get right padding and the hidden state of each row's last
  real token goes through ``lm_head``: the positions a prompt sees alone. Left
  padding would shift them (harmless for rotary embeddings only up to rounding)
  and give pad rows no key to attend to, which some torch versions turn into NaN.

Prompts are sorted by length before batching (less padding), and the answers
returned in the caller's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lora_flwr.evaluation.flowertune import (
    BenchmarkResult,
    MCQuestion,
    build_prompt,
    score_outputs,
)


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, with the tokenizer's default special tokens.

    This is ``tokenizer.encode(prompt)`` as FlowerTune's ``inference`` calls it.
    """
    encoded = tokenizer(list(texts))["input_ids"]
    return [list(map(int, ids)) for ids in encoded]


def greedy_next_tokens(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
) -> list[int]:
    """Return the greedy next token of every prompt.

    Parameters
    ----------
    model
        A causal LM: a ``transformers`` model or a native one with ``model``
        (the body, returning hidden states) and ``lm_head``.
    prompts
        Token ids of each prompt (none empty).
    pad_token_id
        Id written into padded positions (they are masked out).
    batch_size
        Prompts per forward pass.

    Returns
    -------
    list[int]
        The argmax token after each prompt, in the order of ``prompts``.

    Raises
    ------
    ValueError
        If ``batch_size`` is not positive or a prompt is empty.
    """
    greedy, _ = next_tokens(
        model, prompts, pad_token_id=pad_token_id, batch_size=batch_size
    )
    return greedy


def next_tokens(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    candidates: Sequence[Sequence[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """Greedy next token of every prompt, and the best of its candidate tokens.

    One forward pass per batch gives both: the argmax over the vocabulary, and
    the argmax over ``candidates[i]`` (e.g. the tokens of the letters A-D), an
    index into that list. ``candidates`` None: the second list is empty.

    Raises
    ------
    ValueError
        If ``batch_size`` is not positive, a prompt is empty, or ``candidates``
        does not give a non-empty list per prompt.
    """
    if batch_size < 1:
        raise ValueError(
            f"`batch_size` should be a positive integer but the value passed is "
            f"{batch_size}"
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token; got an empty one")
    if candidates is not None and (
        len(candidates) != len(prompts) or any(not c for c in candidates)
    ):
        raise ValueError("`candidates` needs a non-empty list of tokens per prompt")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    greedy = [0] * len(prompts)
    chosen = [0] * len(prompts) if candidates is not None else []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                logits = last_token_logits(
                    model, [prompts[i] for i in rows], pad_token_id=pad_token_id
                )
                for row, i in enumerate(rows):
                    greedy[i] = int(logits[row].argmax())
                    if candidates is not None:
                        ids = torch.tensor(list(candidates[i]), device=logits.device)
                        chosen[i] = int(logits[row, ids].argmax())
    finally:
        model.train(was_training)
    return greedy, chosen


def last_token_logits(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, pad_token_id: int
) -> torch.Tensor:
    """Return the next-token logits ``(batch, vocab)`` of a batch, one forward pass.

    Parameters
    ----------
    model
        As in :func:`greedy_next_tokens`.
    prompts
        Token ids of each prompt in the batch.
    pad_token_id
        Id of the padded positions.

    Returns
    -------
    torch.Tensor
        The float logits at each prompt's last token.
    """
    device = _device_of(model)
    left = callable(getattr(model, "generate", None))
    ids, mask = _pad(prompts, pad_token_id, left=left)
    ids, mask = ids.to(device), mask.to(device)
    if left:
        # transformers' generate: position_ids = cumsum(mask) - 1, pads set to 1.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=1,
        )
        last_logits: torch.Tensor = out.logits[:, -1]
        return last_logits.float()
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    last = mask.sum(-1) - 1
    rows = torch.arange(ids.shape[0], device=device)
    if isinstance(body, nn.Module) and isinstance(head, nn.Module):
        hidden = body(ids, mask)[rows, last]
        logits: torch.Tensor = head(hidden)
        return logits.float()
    full: torch.Tensor = model(ids, mask).logits
    return full[rows, last].float()


def _pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts into ``(ids, attention_mask)``, padded on one side."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if left else slice(0, len(prompt))
        ids[row, span] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def _device_of(model: nn.Module) -> torch.device:
    """Return the device of the first parameter (CPU when there is none)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def answer_questions(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    *,
    batch_size: int = 16,
) -> list[str]:
    """Generate each question's one-token answer under FlowerTune's protocol.

    Parameters
    ----------
    model
        The causal LM (see :func:`greedy_next_tokens`).
    tokenizer
        Its tokenizer; needs a pad token (every loaded bundle has one).
    questions
        The questions.
    batch_size
        Prompts per forward pass.

    Returns
    -------
    list[str]
        The decoded answer token of each question (``skip_special_tokens=True``,
        so an end-of-turn token decodes to ``""`` and scores wrong).
    """
    prompts = encode_prompts(tokenizer, [build_prompt(q) for q in questions])
    tokens = greedy_next_tokens(
        model, prompts, pad_token_id=_pad_id(tokenizer), batch_size=batch_size
    )
    return [str(tokenizer.decode([t], skip_special_tokens=True)) for t in tokens]


def answer_and_choose(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    *,
    batch_size: int = 16,
) -> tuple[list[str], list[str]]:
    """Each question's protocol answer, and the option letter the model ranks first.

    Both come from the same next-token logits: the first is the decoded greedy
    token (:func:`answer_questions`); the second is the letter among the
    question's own (``A``-``D`` for MMLU) whose token has the highest logit, the
    "letter choice" scoring of lm-evaluation-harness-style MMLU. It measures what
    the model knows whether or not it answers with a letter on its own.
    """
    prompts = encode_prompts(tokenizer, [build_prompt(q) for q in questions])
    letters = [
        chr(65 + k) for k in range(max((len(q.choices) for q in questions), default=0))
    ]
    letter_ids = [_letter_token(tokenizer, letter) for letter in letters]
    candidates = [letter_ids[: len(q.choices)] for q in questions]
    greedy, chosen = next_tokens(
        model,
        prompts,
        pad_token_id=_pad_id(tokenizer),
        batch_size=batch_size,
        candidates=candidates,
    )
    outputs = [str(tokenizer.decode([t], skip_special_tokens=True)) for t in greedy]
    return outputs, [letters[k] for k in chosen]


def _pad_id(tokenizer: Any) -> int:
    """Return the tokenizer's pad token id; refuse a tokenizer without one."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set `pad_token` first")
    return int(pad)


def _letter_token(tokenizer: Any, letter: str) -> int:
    """Return the id of the single token that spells ``letter``."""
    ids = encode_prompts(tokenizer, [letter])[0]
    if not ids or str(tokenizer.decode([ids[-1]])).strip() != letter:
        raise ValueError(
            f"the tokenizer has no single token for the option letter {letter!r}; "
            "letter-choice scoring needs one"
        )
    return ids[-1]


def run_benchmark(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    *,
    batch_size: int = 16,
) -> tuple[BenchmarkResult, list[str]]:
    """Answer and score ``questions``: the result and each decoded answer."""
    outputs = answer_questions(model, tokenizer, questions, batch_size=batch_size)
    return score_outputs(questions, outputs), outputs


def score_benchmark(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    *,
    batch_size: int = 16,
) -> tuple[BenchmarkResult, BenchmarkResult]:
    """Score ``questions`` two ways from one pass: FlowerTune's protocol, and letters.

    Returns
    -------
    tuple[BenchmarkResult, BenchmarkResult]
        The protocol's result (greedy token, :func:`answer_questions`) and the
        letter-choice result (the highest-ranked option letter,
        :func:`answer_and_choose`).
    """
    outputs, letters = answer_and_choose(
        model, tokenizer, questions, batch_size=batch_size
    )
    return score_outputs(questions, outputs), score_outputs(questions, letters)
