"""Each instruction-data format on a real sample: the offline Alpaca rows, rewritten.

Thirty rows of ``alpaca_demo`` (LlamaFactory 0.9.5's ``alpaca_en_demo.json``) are
written as Alpaca JSONL, chat ``messages`` JSONL, ShareGPT ``conversations`` JSON,
parquet, arrow and a ``save_to_disk`` folder; every one must read to the same
conversations, and SmolLM2-135M-Instruct's tokenizer must put loss on exactly the
response tokens (checked on token ids by walking ChatML).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_chat_template_real import _chatml_mask

from lora_flwr.assets import fetch_asset
from lora_flwr.config import DataConfig, ModelConfig
from lora_flwr.data import TextDataset, load_splits, tokenize
from lora_flwr.models import load_model

pytestmark = pytest.mark.slow

ROWS = 30


def _user(row: dict[str, str]) -> str:
    return row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")


def _formats(rows: list[dict[str, str]], root: Path) -> dict[str, Path]:
    """The same rows in every format the project reads."""
    from datasets import Dataset

    chat = [
        {
            "messages": [
                {"role": "user", "content": _user(r)},
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in rows
    ]
    sharegpt = [
        {
            "conversations": [
                {"from": "human", "value": _user(r)},
                {"from": "gpt", "value": r["output"]},
            ]
        }
        for r in rows
    ]
    paths = {
        "alpaca.jsonl": root / "alpaca.jsonl",
        "chat.jsonl": root / "chat.jsonl",
        "sharegpt.json": root / "sharegpt.json",
        "alpaca.parquet": root / "alpaca.parquet",
        "saved": root / "saved",
    }
    paths["alpaca.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["chat.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in chat))
    paths["sharegpt.json"].write_text(json.dumps(sharegpt))
    table = Dataset.from_list(rows)
    table.to_parquet(str(paths["alpaca.parquet"]))
    table.save_to_disk(str(paths["saved"]))
    arrow = sorted(paths["saved"].glob("*.arrow"))
    assert len(arrow) == 1
    paths["arrow"] = arrow[0]
    return paths


def _conversations(name: str) -> list[Any]:
    splits = load_splits(DataConfig(name=name, test_fraction=0.2), seed=0)
    both = [*(splits.train.messages or ()), *(splits.test.messages or ())]
    return sorted(both)


def test_every_format_reads_the_real_rows_alike_and_masks_the_responses(
    tmp_path: Path,
) -> None:
    # Prepare
    rows = json.loads(fetch_asset("alpaca_demo").read_text(encoding="utf-8"))[:ROWS]
    paths = _formats(rows, tmp_path)
    tok = load_model(ModelConfig(name="smollm2-135m", task="causal_lm")).tokenizer

    # Execute
    read = {fmt: _conversations(str(path)) for fmt, path in paths.items()}

    # Assert: one set of conversations, the rows' own text
    want = sorted((("user", _user(r)), ("assistant", r["output"])) for r in rows)
    for fmt, conversations in read.items():
        assert conversations == want, fmt
    data = TextDataset(("",) * ROWS, None, ("",) * ROWS, tuple(want))
    out = tokenize(data, tok, "causal_lm", 1024)
    assert out.targets is not None and (out.truncated, out.dropped) == (0, 0)
    for conversation, ids, target in zip(want, out.input_ids, out.targets, strict=True):
        assert target.tolist() == _chatml_mask(ids.tolist(), tok)
        assert tok.decode(ids[target].tolist()) == conversation[1][1] + "<|im_end|>"
