"""Tests for lora_flwr.models: offline tiny models, load count, task resolution."""

from __future__ import annotations

import math
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from lora_flwr.config import ModelConfig
from lora_flwr.models import (
    BUILTIN_MODELS,
    ModelBundle,
    load_model,
    model_load_count,
    resolve_task,
)

TINY = ("tiny-bert", "tiny-llama", "tiny-gpt2")
TEXTS = ["To be, or not to be: that is the question.", "Hi!"]


def _forward(
    bundle: ModelBundle, texts: list[str], max_length: int = 16
) -> torch.Tensor:
    """Run the model on padded, truncated texts and return its logits."""
    enc = bundle.tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return bundle.model(**enc).logits


def _weights(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """Return a copy of every parameter."""
    return {k: v.detach().clone() for k, v in bundle.model.named_parameters()}


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any Hugging Face Hub access fail at once instead of retrying."""
    # huggingface_hub reads the variable at import time, so patch its constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    ("name", "task", "expected_class"),
    [
        ("tiny-bert", "seq_cls", "BertForSequenceClassification"),
        ("tiny-llama", "causal_lm", "LlamaForCausalLM"),
        ("tiny-gpt2", "causal_lm", "GPT2LMHeadModel"),
    ],
)
def test_tiny_models_load_offline_in_eval_float32(
    name: str, task: str, expected_class: str
) -> None:
    # Prepare
    cfg = ModelConfig(name=name, num_labels=3)

    # Execute
    bundle = load_model(cfg)

    # Assert
    assert bundle.name == name
    assert bundle.task == task
    assert type(bundle.model).__name__ == expected_class
    assert bundle.model.training is False
    params = list(bundle.model.parameters())
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.device.type for p in params} == {"cpu"}
    assert all(p.requires_grad for p in params)
    assert bundle.tokenizer.pad_token is not None
    assert bundle.model.config.pad_token_id == bundle.tokenizer.pad_token_id
    assert bundle.model.config.vocab_size == len(bundle.tokenizer)
    assert bundle.model.config.name_or_path == name


def test_tiny_bert_seq_cls_logits_have_shape_batch_by_num_labels() -> None:
    # Prepare
    bundle = load_model(ModelConfig(name="tiny-bert", num_labels=5))

    # Execute
    logits = _forward(bundle, TEXTS)

    # Assert
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_causal_logits_have_shape_batch_seq_vocab(name: str) -> None:
    # Prepare
    bundle = load_model(ModelConfig(name=name))

    # Execute
    logits = _forward(bundle, TEXTS, max_length=12)

    # Assert
    assert logits.shape == (2, 12, len(bundle.tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("name", "expected_class"),
    [
        ("tiny-llama", "LlamaForSequenceClassification"),
        ("tiny-gpt2", "GPT2ForSequenceClassification"),
    ],
)
def test_tiny_decoders_can_classify_a_padded_batch(
    name: str, expected_class: str
) -> None:
    # Prepare
    cfg = ModelConfig(name=name, task="seq_cls", num_labels=4)

    # Execute
    bundle = load_model(cfg)
    logits = _forward(bundle, TEXTS)

    # Assert
    assert bundle.task == "seq_cls"
    assert type(bundle.model).__name__ == expected_class
    assert logits.shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("tiny-bert", ("query", "value")),
        ("tiny-llama", ("q_proj", "v_proj")),
        ("tiny-gpt2", ("c_attn",)),
    ],
)
def test_tiny_models_have_the_lora_target_module_names(
    name: str, targets: tuple[str, ...]
) -> None:
    # Prepare
    bundle = load_model(ModelConfig(name=name))

    # Execute
    leaves = {n.rsplit(".", 1)[-1] for n, _ in bundle.model.named_modules()}
    matches = {
        t: [n for n, _ in bundle.model.named_modules() if n.endswith("." + t)]
        for t in targets
    }

    # Assert
    assert set(targets) <= leaves
    assert all(len(found) == 2 for found in matches.values())  # one per layer


def test_tiny_gpt2_attention_uses_conv1d() -> None:
    # Prepare
    bundle = load_model(ModelConfig(name="tiny-gpt2"))

    # Execute
    c_attn = bundle.model.get_submodule("transformer.h.0.attn.c_attn")

    # Assert
    assert isinstance(c_attn, Conv1D)
    assert tuple(c_attn.weight.shape) == (32, 96)  # (in, 3 * out): fan_in_fan_out


@pytest.mark.parametrize("name", TINY)
def test_same_seed_gives_identical_weights(name: str) -> None:
    # Prepare
    cfg = ModelConfig(name=name)

    # Execute
    first = _weights(load_model(cfg, seed=7))
    second = _weights(load_model(cfg, seed=7))

    # Assert
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", TINY)
def test_different_seeds_give_different_weights(name: str) -> None:
    # Prepare
    cfg = ModelConfig(name=name)

    # Execute
    first = _weights(load_model(cfg, seed=0))
    second = _weights(load_model(cfg, seed=1))

    # Assert
    # Biases and norms start at constants; every weight matrix is drawn.
    matrices = [k for k, v in first.items() if v.dim() == 2]
    assert len(matrices) >= 6
    assert not any(torch.equal(first[k], second[k]) for k in matrices)


def test_load_model_leaves_the_global_rng_alone() -> None:
    # Prepare
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    # Execute
    load_model(ModelConfig(name="tiny-llama"), seed=5)
    drawn = torch.rand(3)

    # Assert
    assert torch.equal(drawn, expected)


def test_load_model_always_builds_a_new_instance() -> None:
    # Prepare
    cfg = ModelConfig(name="tiny-bert")
    before = model_load_count()

    # Execute
    first = load_model(cfg)
    second = load_model(cfg)

    # Assert
    assert first.model is not second.model
    assert model_load_count() == before + 2


@pytest.mark.parametrize("name", TINY)
def test_char_tokenizer_round_trips_ascii_text(name: str) -> None:
    # Prepare
    tokenizer = load_model(ModelConfig(name=name)).tokenizer
    text = "HAMLET.\nTo be, or not to be: that is the question!\t(42 ~ 7%)"

    # Execute
    ids = tokenizer(text)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)

    # Assert
    special = 2 if name == "tiny-bert" else 0  # [CLS] ... [SEP]
    assert len(ids) == len(text) + special
    assert decoded == text


def test_char_tokenizer_maps_unknown_characters_to_unk() -> None:
    # Prepare
    tokenizer = load_model(ModelConfig(name="tiny-llama")).tokenizer

    # Execute
    ids = tokenizer("é✓")["input_ids"]

    # Assert
    assert ids == [tokenizer.unk_token_id, tokenizer.unk_token_id]


def test_tiny_bert_tokenizer_wraps_text_in_cls_and_sep() -> None:
    # Prepare
    tokenizer = load_model(ModelConfig(name="tiny-bert")).tokenizer

    # Execute
    ids = tokenizer("ab")["input_ids"]

    # Assert
    assert ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a", "b"]


@pytest.mark.parametrize("name", TINY)
def test_char_tokenizer_truncates_and_pads(name: str) -> None:
    # Prepare
    tokenizer = load_model(ModelConfig(name=name)).tokenizer
    texts = ["a" * 50, "bc"]

    # Execute
    plain = tokenizer(texts, truncation=True, max_length=10)
    padded = tokenizer(texts, truncation=True, max_length=10, padding=True)

    # Assert
    special = 2 if name == "tiny-bert" else 0
    assert [len(ids) for ids in plain["input_ids"]] == [10, 2 + special]
    assert [len(ids) for ids in padded["input_ids"]] == [10, 10]
    pad = tokenizer.pad_token_id
    assert padded["input_ids"][1][2 + special :] == [pad] * (8 - special)
    assert padded["attention_mask"][1] == [1] * (2 + special) + [0] * (8 - special)


@pytest.mark.parametrize(
    ("hf_config", "task", "expected"),
    [
        (LlamaConfig(), "auto", "causal_lm"),
        (GPT2Config(), "auto", "causal_lm"),
        (BertConfig(), "auto", "seq_cls"),
        (PretrainedConfig(architectures=["FooForCausalLM"]), "auto", "causal_lm"),
        (PretrainedConfig(architectures=["FooLMHeadModel"]), "auto", "causal_lm"),
        (PretrainedConfig(architectures=["FooModel"]), "auto", "seq_cls"),
        (PretrainedConfig(), "auto", "seq_cls"),
        (LlamaConfig(), "seq_cls", "seq_cls"),
        (BertConfig(), "seq_cls", "seq_cls"),
        (GPT2Config(), "causal_lm", "causal_lm"),
    ],
)
def test_resolve_task(hf_config: PretrainedConfig, task: str, expected: str) -> None:
    # Prepare
    cfg = ModelConfig(name="some-model", task=task)  # type: ignore[arg-type]

    # Execute
    resolved = resolve_task(cfg, hf_config)

    # Assert
    assert resolved == expected


def test_resolve_task_rejects_causal_lm_for_an_encoder() -> None:
    # Prepare
    cfg = ModelConfig(name="some-bert", task="causal_lm")

    # Execute / Assert
    with pytest.raises(ValueError, match="`model.task`.*encoder-only bert"):
        resolve_task(cfg, BertConfig())


def test_tiny_bert_as_causal_lm_is_a_clear_error() -> None:
    # Prepare
    cfg = ModelConfig(name="tiny-bert", task="causal_lm")

    # Execute / Assert
    with pytest.raises(ValueError, match="the value passed is 'causal_lm'"):
        load_model(cfg)


@pytest.mark.parametrize(
    ("name", "num_labels", "task"),
    [("tiny-llama", 2, "causal_lm"), ("tiny-bert", 3, "seq_cls")],
)
def test_local_directory_loads_like_the_saved_model(
    tmp_path: Path, name: str, num_labels: int, task: str
) -> None:
    # Prepare
    saved = load_model(ModelConfig(name=name, num_labels=num_labels), seed=3)
    saved.model.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)

    # Execute
    loaded = load_model(ModelConfig(name=str(tmp_path), num_labels=num_labels))

    # Assert
    assert loaded.task == task
    assert loaded.name == str(tmp_path)
    assert type(loaded.model) is type(saved.model)
    assert loaded.model.training is False
    assert torch.equal(_forward(loaded, TEXTS), _forward(saved, TEXTS))


def test_local_directory_load_prints_nothing_and_restores_logging(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a classifier head of another size forces a re-initialised head,
    # which transformers reports loudly by default.
    saved = load_model(ModelConfig(name="tiny-bert", num_labels=2))
    saved.model.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)
    capfd.readouterr()
    verbosity = hf_logging.get_verbosity()
    progress = hf_logging.is_progress_bar_enabled()

    # Execute
    loaded = load_model(ModelConfig(name=str(tmp_path), num_labels=4))
    out, err = capfd.readouterr()

    # Assert
    assert loaded.model.config.num_labels == 4
    assert _forward(loaded, TEXTS).shape == (2, 4)
    assert (out, err) == ("", "")
    assert hf_logging.get_verbosity() == verbosity
    assert hf_logging.is_progress_bar_enabled() == progress


def test_local_causal_model_without_pad_token_pads_with_eos(tmp_path: Path) -> None:
    # Prepare
    saved = load_model(ModelConfig(name="tiny-gpt2"))
    saved.tokenizer.pad_token = None
    saved.model.config.pad_token_id = None
    saved.model.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)

    # Execute
    loaded = load_model(ModelConfig(name=str(tmp_path)))

    # Assert
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.model.config.pad_token_id == loaded.tokenizer.eos_token_id


def test_directory_without_a_model_is_refused_in_one_line(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "notes.txt").write_text("no model here")

    # Execute / Assert
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(ModelConfig(name=str(tmp_path)))


def test_missing_local_path_is_a_clear_error(tmp_path: Path, offline_hub: None) -> None:
    # Prepare
    missing = tmp_path / "no-such-model"
    before = model_load_count()

    # Execute
    with pytest.raises(ValueError) as info:
        load_model(ModelConfig(name=str(missing)))

    # Assert
    message = str(info.value)
    assert "`model.name`" in message
    assert repr(str(missing)) in message
    assert "not tried as a Hugging Face Hub id" in message
    assert all(name in message for name in BUILTIN_MODELS)
    assert "local-dir" in message
    assert model_load_count() == before


@pytest.mark.parametrize("name", ["tiny-bart", "no-such-org/no-such-model"])
def test_unknown_name_is_a_clear_error_offline(name: str, offline_hub: None) -> None:
    # Prepare
    cfg = ModelConfig(name=name)

    # Execute
    with pytest.raises(ValueError) as info:
        load_model(cfg)

    # Assert
    message = str(info.value)
    assert f"the value passed is {name!r}" in message
    assert "there is no directory" in message
    assert "as a Hugging Face Hub id failed" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "tiny-llama" in message


@pytest.mark.slow
def test_smollm2_predicts_english_and_minilm_classifies() -> None:
    # Prepare
    smollm2_cfg = ModelConfig(name="smollm2-135m")
    minilm_cfg = ModelConfig(name="minilm", num_labels=2)

    # Execute
    smollm2 = load_model(smollm2_cfg)
    enc = smollm2.tokenizer(["The capital of France is Paris."], return_tensors="pt")
    with torch.no_grad():
        loss = smollm2.model(**enc, labels=enc["input_ids"]).loss.item()
    minilm = load_model(minilm_cfg)
    minilm_logits = _forward(minilm, TEXTS)

    # Assert
    assert smollm2.task == "causal_lm"
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.model.dtype == torch.float32
    assert math.isfinite(loss) and loss < 6.0 < math.log(len(smollm2.tokenizer))
    assert smollm2.model.config.pad_token_id == smollm2.tokenizer.pad_token_id
    assert not hasattr(smollm2.model.config, "quantization_config")
    assert minilm.task == "seq_cls"
    assert type(minilm.model).__name__ == "BertForSequenceClassification"
    assert minilm_logits.shape == (2, 2)
    with pytest.raises(ValueError, match="encoder-only"):
        load_model(ModelConfig(name="minilm", task="causal_lm"))
