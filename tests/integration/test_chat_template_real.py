"""SmolLM2-135M-Instruct's own tokenizer: ChatML rendering and the response mask."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lora_flwr.data import TextDataset, tokenize
from lora_flwr.data.corpus import Conversation
from lora_flwr.models.native.tokenizer import NativeTokenizer
from lora_flwr.models.smollm2 import _smollm2_hf_dir

CONVERSATIONS: tuple[Conversation, ...] = (
    (("user", "What is the capital of France?"), ("assistant", "Paris.")),
    (
        ("system", "You answer in one word."),
        ("user", "Colour of the sky?"),
        ("assistant", "Blue"),
        ("user", "And grass?"),
        ("assistant", "Green, mostly."),
    ),
    (
        ("user", "Write <|im_end|> literally? Then 2+2."),
        ("assistant", "4, with spaces after  "),
    ),
)


def _chatml_mask(ids: list[int], tok: Any) -> list[bool]:
    """The assistant tokens found by walking ChatML: header ... <|im_end|>."""
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids(["<|im_end|>"])[0]
    mask = [False] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i : i + len(header)] == header:
            j = i + len(header)
            while ids[j] != end:
                mask[j] = True
                j += 1
            mask[j] = True  # the <|im_end|> that ends the turn is learnt
            i = j
        i += 1
    return mask


@pytest.mark.slow
def test_smollm2_chat_template_and_response_mask() -> None:
    # Prepare
    from transformers import AutoTokenizer

    directory = _smollm2_hf_dir()
    hf = AutoTokenizer.from_pretrained(directory)
    native = NativeTokenizer.from_dir(directory)
    ds = TextDataset(
        ("",) * len(CONVERSATIONS), None, ("",) * len(CONVERSATIONS), CONVERSATIONS
    )

    # Execute
    outs = {
        name: tokenize(ds, t, "causal_lm", 512)
        for name, t in [("hf", hf), ("native", native)]
    }

    # Assert
    assert hf.chat_template and native.chat_template == hf.chat_template
    for name, out in outs.items():
        assert out.targets is not None and (out.truncated, out.dropped) == (0, 0)
        for conv, ids, target in zip(
            CONVERSATIONS, out.input_ids, out.targets, strict=True
        ):
            messages = [{"role": r, "content": c} for r, c in conv]
            rendered: Any = hf.apply_chat_template(messages, tokenize=True)
            want = [int(i) for i in rendered["input_ids"]]
            assert ids.tolist() == want, name
            assert target.tolist() == _chatml_mask(want, hf), name
            answers = "".join(c + "<|im_end|>" for r, c in conv if r == "assistant")
            assert hf.decode(ids[target].tolist()) == answers
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            outs["hf"].targets or (), outs["native"].targets or (), strict=True
        )
    )
