"""compute.gradient_checkpointing: same gradients and adapter, on both model paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers import BertConfig, LlamaConfig

from lora_flwr.config import ComputeConfig, LoraConfig, ModelConfig, TrainConfig
from lora_flwr.data import TokenizedDataset
from lora_flwr.lora import LoRAAdapter
from lora_flwr.models import load_model
from lora_flwr.models.native import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    NativeConfig,
)
from lora_flwr.training import LoRATrainer
from lora_flwr.training.checkpointing import is_checkpointing, set_checkpointing

LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj")
BERT_TARGETS = ("query", "value", "intermediate.dense")


# ------------------------------------------------------------------- models
def _native_llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=40,
        tie_word_embeddings=True,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    return LlamaForCausalLM(NativeConfig(config.to_dict()))


def _native_bert() -> nn.Module:
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        pad_token_id=0,
        hidden_dropout_prob=0.2,  # dropout inside the blocks: the recompute
        attention_probs_dropout_prob=0.3,  # must draw the same masks
    )
    return BertForSequenceClassification(NativeConfig(config.to_dict(), num_labels=3))


def _hf(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        task = "causal_lm" if name == "tiny-llama" else "seq_cls"
        model: nn.Module = load_model(ModelConfig(name=name, task=task)).model
        return model

    return build


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...], bool]] = {
    # name: (builder, LoRA targets, causal)
    "native-llama": (_native_llama, LLAMA_TARGETS, True),
    "native-bert": (_native_bert, BERT_TARGETS, False),
    "hf-llama": (_hf("tiny-llama"), LLAMA_TARGETS, True),
    "hf-bert": (_hf("tiny-bert"), BERT_TARGETS, False),
}


def _adapted(which: str, seed: int = 0) -> tuple[nn.Module, LoRAAdapter]:
    """A seeded model of ``which`` with a LoRA adapter (dropout 0.1, B random)."""
    build, targets, _ = MODELS[which]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        cfg = LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.1, target_modules=targets)
        adapter = LoRAAdapter(cfg, seed=seed)
        adapter.apply(model)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would give A no gradient to compare
                nn.init.normal_(p, std=0.1)
    return model, adapter


def _batch(causal: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 30, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100) if causal else torch.tensor([0, 1, 1])
    return {
        "input_ids": ids.masked_fill(mask == 0, 0),
        "attention_mask": mask,
        "labels": labels,
    }


def _lora_grads(which: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    model, _ = _adapted(which)
    set_checkpointing(model, checkpointing)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model(**_batch(MODELS[which][2])).loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name  # every factor of every block
            grads[name] = p.grad.clone()
    return grads


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("which", list(MODELS))
def test_checkpointing_gives_the_same_lora_gradients(which: str) -> None:
    # Execute
    plain = _lora_grads(which, checkpointing=False)
    checkpointed = _lora_grads(which, checkpointing=True)

    # Assert: every LoRA factor has a gradient, the same one.
    assert set(plain) == set(checkpointed)
    assert sum("lora_A" in n for n in plain) >= 2 * len(MODELS[which][1])
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["native-llama", "hf-bert"])
def test_a_checkpointed_block_runs_twice_in_training_once_in_eval(which: str) -> None:
    # Prepare: count the forward calls of every attention module.
    model, _ = _adapted(which)
    calls: list[str] = []
    blocks = 0
    for name, module in model.named_modules():
        if name.endswith(("self_attn", "attention.self")):
            module.register_forward_hook(lambda *_, n=name: calls.append(n))
            blocks += 1
    batch = _batch(MODELS[which][2])
    set_checkpointing(model, True)

    # Execute
    model.train()
    model(**batch).loss.backward()
    trained = len(calls)
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(**batch)

    # Assert: forward, then the recompute in backward; evaluation runs it once.
    assert is_checkpointing(model)
    assert blocks > 1 and (trained, len(calls)) == (2 * blocks, blocks)


def test_switching_twice_is_harmless_and_off_undoes_on() -> None:
    # Prepare
    model, _ = _adapted("hf-llama")

    # Execute
    set_checkpointing(model, True)
    set_checkpointing(model, True)
    hooks = list(getattr(model, "_require_grads_hooks", []))
    set_checkpointing(model, False)

    # Assert: one input hook, removed with the switch.
    assert len(hooks) == 1
    assert not is_checkpointing(model)
    embed = model.get_input_embeddings()  # type: ignore[operator]
    assert not embed._forward_hooks


def _trained_adapter(which: str, checkpointing: bool) -> list[Any]:
    model, adapter = _adapted(which)
    causal = MODELS[which][2]
    batch = _batch(causal)
    data = TokenizedDataset(
        tuple(
            ids[m.bool()]
            for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ),
        None if causal else batch["labels"],
        "causal_lm" if causal else "seq_cls",
        0,
    )
    trainer = LoRATrainer(
        adapter,
        "causal_lm" if causal else "seq_cls",
        TrainConfig(lr=1e-2, batch_size=2, local_steps=4),
        compute=ComputeConfig(device="cpu", gradient_checkpointing=checkpointing),
    )
    trainer.train(data, seed=5, progress=False)
    assert is_checkpointing(model) is checkpointing
    return adapter.get_weights()


@pytest.mark.parametrize("which", ["native-llama", "native-bert", "hf-llama"])
def test_the_trained_adapter_is_the_same_with_checkpointing(which: str) -> None:
    # Execute: 4 AdamW steps each, same seed and data.
    plain = _trained_adapter(which, checkpointing=False)
    checkpointed = _trained_adapter(which, checkpointing=True)

    # Assert
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(
            torch.from_numpy(b), torch.from_numpy(a), rtol=0, atol=1e-6
        )


def test_a_model_without_a_switch_is_refused_by_name() -> None:
    # Prepare: a plain module with a LoRA target.
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    adapter = LoRAAdapter(LoraConfig(r=2, target_modules=("q_proj",)), seed=0)
    adapter.apply(model)

    # Execute / Assert
    with pytest.raises(
        ValueError, match="`compute.gradient_checkpointing` is on but Sequential"
    ):
        LoRATrainer(
            adapter,
            "causal_lm",
            TrainConfig(),
            compute=ComputeConfig(device="cpu", gradient_checkpointing=True),
        )


def test_the_native_models_refuse_reentrant_checkpointing() -> None:
    # Prepare
    model = _native_llama()

    # Execute / Assert
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model.activation_checkpointing_enable({"use_reentrant": True})  # type: ignore[operator]
