"""Shared test fixtures: tiny models built in code (no hub, no downloads).

Every factory is seeded and leaves the global RNG as it found it, so two calls with
the same seed return identical models and tests never depend on their order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lora_flwr import experiment

# Nothing in the test suite may reach the network (no hub ids, only local dirs).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 64  # vocabulary of every tiny transformer below
HIDDEN = 32  # hidden size of every tiny transformer below


class MLP(nn.Module):
    """PEFT's test model (tests/test_custom_models.py): lin0 -> relu -> drop -> lin1."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.drop(self.relu(self.lin0(x))))


def _seeded(seed: int, build: Callable[[], nn.Module]) -> Any:
    """Build a model under ``seed`` without touching the caller's RNG; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def build_mlp(seed: int = 0) -> MLP:
    """Return the PEFT-style MLP (10 -> 20 -> 2), eval mode."""
    return _seeded(seed, MLP)


def build_tiny_bert(seed: int = 0) -> Any:
    """Return a 2-layer BertForSequenceClassification (hidden 32, 2 labels)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return _seeded(seed, lambda: BertForSequenceClassification(config))


def build_tiny_llama(seed: int = 0) -> Any:
    """Return a 2-layer LlamaForCausalLM (hidden 32, GQA: 4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _seeded(seed, lambda: LlamaForCausalLM(config))


def build_tiny_gpt2(seed: int = 0) -> Any:
    """Return a 2-layer GPT2LMHeadModel (hidden 32; its projections are Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return _seeded(seed, lambda: GPT2LMHeadModel(config))


def randomize_adapter(adapter: Any, seed: int = 1, std: float = 0.1) -> None:
    """Give every adapter tensor (B included) seeded random values."""
    generator = torch.Generator().manual_seed(seed)
    adapter.set_weights(
        [
            (torch.randn(shape, generator=generator) * std).numpy()
            for shape in adapter.weight_shapes()
        ]
    )


@pytest.fixture
def make_mlp() -> Callable[..., MLP]:
    """Return the MLP factory (``make_mlp(seed=0)``)."""
    return build_mlp


@pytest.fixture
def make_tiny_bert() -> Callable[..., Any]:
    """Return the tiny BERT classifier factory."""
    return build_tiny_bert


@pytest.fixture
def make_tiny_llama() -> Callable[..., Any]:
    """Return the tiny Llama causal LM factory."""
    return build_tiny_llama


@pytest.fixture
def make_tiny_gpt2() -> Callable[..., Any]:
    """Return the tiny GPT-2 causal LM factory (Conv1D projections)."""
    return build_tiny_gpt2


@pytest.fixture
def randomize() -> Callable[..., None]:
    """Return :func:`randomize_adapter` (random A, B and saved-module values)."""
    return randomize_adapter


@pytest.fixture
def mlp_input() -> torch.Tensor:
    """Return a fixed (4, 10) batch for the MLP."""
    return torch.randn(4, 10, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def token_ids() -> torch.Tensor:
    """Return a fixed (2, 8) batch of token ids for the tiny transformers."""
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


# One intra-op thread per test process: on a shared 2-core machine torch's default
# thread pool oversubscribes the cores and slows the suite ~10x; results are the same.
torch.set_num_threads(1)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache directory; every in-process cache cleared before and after."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LORA_FLWR_CACHE", str(root))
    experiment.clear_caches()
    yield root
    experiment.clear_caches()


# ------------------------------------------------ a writer killed midway
_KILLED = """
import os, sys
from pathlib import Path
from lora_flwr import atomic

target, kind, after = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real_replace = os.replace
renames = 0


def replace(src, dst):
    global renames
    real_replace(src, dst)
    renames += 1
    if renames == after:
        os._exit(9)


def write(tmp):
    if kind == "dir":
        (tmp / "a.json").write_bytes(b"new")
    else:
        tmp.write_bytes(b"ne")
    if after == 0:
        os._exit(9)


os.replace = replace
if kind == "dir":
    atomic.atomic_write_dir(target, write)
else:
    atomic.atomic_write(target, write)
"""


@pytest.fixture
def killed_writer() -> Callable[[Path, str, int], None]:
    """Run an atomic writer of a target in a child process that is killed midway.

    ``kind`` is ``"dir"`` (:func:`~lora_flwr.atomic.atomic_write_dir`) or
    ``"file"`` (:func:`~lora_flwr.atomic.atomic_write`); ``after=0`` kills it
    inside its write, ``after=n`` right after its n-th rename.
    """
    return _killed_writer


def _killed_writer(target: Path, kind: str, after: int) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _KILLED, str(target), kind, str(after)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 9, out.stderr
