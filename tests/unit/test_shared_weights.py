"""Frozen base weights memory-mapped from safetensors: shared, exact, never written."""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from lora_flwr.config import (
    ComputeConfig,
    DataConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
)
from lora_flwr.data import load_splits, tokenize
from lora_flwr.lora import LoRAAdapter
from lora_flwr.models import load_model
from lora_flwr.models.smollm2 import _converted_ok
from lora_flwr.models.weights import (
    CorruptWeightsError,
    check_safetensors,
    weight_residency,
)
from lora_flwr.training import LoRATrainer

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/maps"
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A tiny Llama (tied embedding and lm_head) saved as a model directory."""
    bundle = load_model(ModelConfig(name="tiny-llama"), seed=3)
    path = tmp_path / "tiny-llama"
    bundle.model.save_pretrained(path)  # type: ignore[operator]
    bundle.tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- file checks
def test_check_safetensors_reads_names_dtypes_and_shapes(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "w.safetensors"
    save_file(
        {"a": torch.zeros(2, 3), "b": torch.ones(5, dtype=torch.bfloat16)},
        path,
        metadata={"format": "pt"},
    )

    # Execute
    tensors = check_safetensors(path)

    # Assert
    assert tensors == {"a": ("F32", (2, 3)), "b": ("BF16", (5,))}


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:-1])
    elif how == "padded":
        path.write_bytes(data + b"\0")
    elif how == "huge_header":
        path.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    elif how == "not_json":
        (n,) = struct.unpack("<Q", data[:8])
        path.write_bytes(data[:8] + b"x" * n + data[8 + n :])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # pragma: no cover - a typo in the parametrisation
        raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", r"spans bytes \[0, 48\) of a 47-byte"),
        ("padded", "cover"),
        ("huge_header", "runs past the end"),
        ("not_json", "not JSON"),
        ("empty", "shorter than"),
    ],
)
def test_check_safetensors_refuses_a_damaged_file(
    tmp_path: Path, how: str, message: str
) -> None:
    # Prepare
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(12.0).reshape(3, 4)}, path)
    _damage(path, how)

    # Execute / Assert
    with pytest.raises(CorruptWeightsError, match=message) as info:
        check_safetensors(path)
    assert str(path) in str(info.value)


def test_load_model_names_a_truncated_weights_file(tiny_llama_dir: Path) -> None:
    # Prepare
    _damage(tiny_llama_dir / "model.safetensors", "truncated")

    # Execute / Assert
    with pytest.raises(ValueError, match="model.safetensors is not a complete"):
        load_model(ModelConfig(name=str(tiny_llama_dir)))


def test_a_damaged_smollm2_conversion_is_not_accepted(tiny_llama_dir: Path) -> None:
    # Prepare: a whole Llama directory with the embedding name SmolLM2 has.
    weights = tiny_llama_dir / "model.safetensors"
    assert _converted_ok(tiny_llama_dir)
    whole = weights.read_bytes()

    # Execute / Assert: damaged or incomplete directories are converted again.
    _damage(weights, "truncated")
    assert not _converted_ok(tiny_llama_dir)
    weights.write_bytes(whole)
    (tiny_llama_dir / "config.json").unlink()
    assert not _converted_ok(tiny_llama_dir)
    assert not _converted_ok(tiny_llama_dir / "missing")


# ---------------------------------------------------------------- the mapping
@linux_only
def test_loaded_base_weights_are_views_of_the_file(tiny_llama_dir: Path) -> None:
    # Execute
    bundle = load_model(ModelConfig(name=str(tiny_llama_dir)))
    residency = weight_residency(bundle.model)

    # Assert: every parameter and buffer that the file holds is mapped from it;
    # the rotary inv_freq buffer is computed at build time, so it is private.
    assert residency is not None
    weights = str(tiny_llama_dir / "model.safetensors")
    file_bytes = sum(t.numel() * 4 for t in _file_tensors(tiny_llama_dir).values())
    assert residency.mapped == {weights: file_bytes}
    inv_freq = sum(b.numel() * b.element_size() for b in bundle.model.buffers())
    assert residency.private == inv_freq


def _file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The file's tensors read eagerly (a private copy, no map)."""
    return load_safetensors_bytes((directory / "model.safetensors").read_bytes())


def test_mapped_weights_equal_an_eager_read_and_stay_tied(
    tiny_llama_dir: Path,
) -> None:
    # Prepare
    saved = load_model(ModelConfig(name="tiny-llama"), seed=3).model.state_dict()

    # Execute
    model = load_model(ModelConfig(name=str(tiny_llama_dir))).model

    # Assert: bit for bit what was saved and what the file holds, in float32,
    # with lm_head still the same tensor as the input embedding.
    eager = _file_tensors(tiny_llama_dir)
    loaded = model.state_dict()
    assert set(loaded) == set(saved)
    for name, value in loaded.items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, saved[name]), name
        if name in eager:
            assert torch.equal(value, eager[name]), name
    assert "lm_head.weight" not in eager
    assert model.lm_head.weight is model.model.embed_tokens.weight


@linux_only
def test_training_and_base_deltas_never_write_the_file(tiny_llama_dir: Path) -> None:
    # Prepare: LoRA on q/v, trained; a FLoRA-style delta and a merge both write
    # into base weights that are views of the map.
    weights = tiny_llama_dir / "model.safetensors"
    digest = _sha256(weights)
    bundle = load_model(ModelConfig(name=str(tiny_llama_dir)))
    lora = LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj"))
    adapter = LoRAAdapter(lora, seed=0)
    adapter.apply(bundle.model)
    trainer = LoRATrainer(
        adapter,
        bundle.task,
        TrainConfig(lr=1e-2, batch_size=8),
        compute=ComputeConfig(device="cpu"),
    )
    data = load_splits(DataConfig(name="synthetic_lm"), seed=0).train
    q_proj = bundle.model.model.layers[0].self_attn.q_proj.base_layer
    before = q_proj.weight.detach().clone()
    delta = np.full(tuple(before.shape), 0.5, dtype=np.float32)

    # Execute
    trainer.train(tokenize(data, bundle.tokenizer, bundle.task, 32), steps=3)
    adapter.set_base_delta({"model.layers.0.self_attn.q_proj": delta})
    adapter.merge()
    changed = q_proj.weight.detach().clone()
    adapter.unmerge()
    adapter.set_base_delta(None)

    # Assert: the writes happened in this process, the file is untouched, the
    # restored weight is W0 again, and the untouched weights are still mapped.
    assert not torch.equal(changed, before)
    assert torch.equal(q_proj.weight, before)
    assert _sha256(weights) == digest
    residency = weight_residency(bundle.model, frozen_only=True)
    assert residency is not None
    assert residency.mapped[str(weights)] > 0.9 * weights.stat().st_size
    reloaded = load_model(ModelConfig(name=str(tiny_llama_dir))).model
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, before)
