"""The native (plain torch) built-in models compute what transformers computes.

Tiny random configs check the maths against the transformers classes fast; the
real MiniLM (fast enough here) and SmolLM2 (marked slow) check the real weights,
tokenizers, LoRA gradients and the PEFT export.
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, LlamaConfig
from transformers import BertForSequenceClassification as HFBert
from transformers import LlamaForCausalLM as HFLlama
from transformers import LlamaForSequenceClassification as HFLlamaCls

from lora_flwr.assets import fetch_asset
from lora_flwr.config import LoraConfig, ModelConfig
from lora_flwr.data.corpus import TextDataset
from lora_flwr.data.tokenize import TokenizedDataset, collate, tokenize
from lora_flwr.lora import LoRAAdapter, save_peft
from lora_flwr.models import ModelBundle, load_model
from lora_flwr.models.native import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    NativeConfig,
    NativeTokenizer,
    build_bert_classifier,
    uses_native,
)

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def _real_texts(n: int) -> list[str]:
    """The first ``n`` critic snippets of the Rotten Tomatoes corpus (real text)."""
    path = fetch_asset("rotten_tomatoes")
    texts: list[str] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["category"] != "plot" and row["text"].strip():
                texts.append(row["text"].strip())
            if len(texts) == n:
                break
    return texts


def _batch(
    bundle: ModelBundle, texts: list[str], labels: list[int] | None = None
) -> tuple[TokenizedDataset, dict[str, torch.Tensor]]:
    """Tokenize with the pipeline's own code and pad like the trainer does."""
    ds = TextDataset(
        tuple(texts), tuple(labels) if labels is not None else None, ("",) * len(texts)
    )
    task = "seq_cls" if labels is not None else "causal_lm"
    tok = tokenize(ds, bundle.tokenizer, task, max_length=48)
    return tok, collate(tok, list(range(len(texts))))


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


# ---------------------------------------------------------------- tiny configs
def _tiny_bert_config(layers: int = 2, hidden: float = 0.2, attn: float = 0.3) -> Any:
    return BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        pad_token_id=0,
        num_labels=3,
        hidden_dropout_prob=hidden,
        attention_probs_dropout_prob=attn,
    )


def _tiny_bert_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = _tiny_bert_config()
    torch.manual_seed(seed)
    hf = HFBert(config).eval()
    native = BertForSequenceClassification(
        NativeConfig(config.to_dict(), num_labels=3)
    ).eval()
    native.load_state_dict(hf.state_dict())  # strict: same keys, same shapes
    return hf, native


def _tiny_llama_pair(causal: bool, seed: int = 0) -> tuple[Any, Any]:
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=40,
        tie_word_embeddings=causal,
        pad_token_id=0,
        num_labels=3,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    torch.manual_seed(seed)
    native_config = NativeConfig(config.to_dict(), num_labels=3)
    if causal:
        hf: Any = HFLlama(config).eval()
        native: Any = LlamaForCausalLM(native_config).eval()
    else:
        hf = HFLlamaCls(config).eval()  # type: ignore[no-untyped-call]
        native = LlamaForSequenceClassification(native_config).eval()
    native.load_state_dict(hf.state_dict())
    return hf, native


def _padded_ids() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 50, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_tiny_bert_matches_transformers_on_a_padded_batch() -> None:
    # Prepare
    hf, native = _tiny_bert_pair()
    ids, mask = _padded_ids()
    labels = torch.tensor([0, 2, 1])

    # Execute
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, labels=labels)
        got = native(input_ids=ids, attention_mask=mask, labels=labels)

    # Assert
    assert list(native.state_dict()) == list(hf.state_dict())
    assert got.logits.shape == (3, 3)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=ATOL)


@pytest.mark.parametrize("causal", [True, False])
def test_tiny_llama_matches_transformers_on_a_padded_batch(causal: bool) -> None:
    # Prepare
    hf, native = _tiny_llama_pair(causal)
    ids, mask = _padded_ids()
    labels = ids.masked_fill(mask == 0, -100) if causal else torch.tensor([0, 2, 1])

    # Execute
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, labels=labels)
        got = native(input_ids=ids, attention_mask=mask, labels=labels)

    # Assert
    assert list(native.state_dict()) == list(hf.state_dict())
    if causal:  # padded positions' logits are never read
        kept = mask.bool()
        torch.testing.assert_close(
            got.logits[kept], want.logits[kept], rtol=0, atol=ATOL
        )
        assert native.lm_head.weight is native.model.embed_tokens.weight
    else:
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=ATOL)


def _tiny_bert_pair_without_dropout(
    attention_dropout: float = 0.0,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """HF BERT without dropout; the native twin with attention dropout ``p``."""
    config = _tiny_bert_config(layers=3, hidden=0.0, attn=0.0)
    torch.manual_seed(1)
    hf = HFBert(config).train()
    values = config.to_dict() | {"attention_probs_dropout_prob": attention_dropout}
    native = BertForSequenceClassification(NativeConfig(values, num_labels=3)).train()
    native.load_state_dict(hf.state_dict())
    return hf, native


def _param_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = model.named_parameters()
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


@pytest.mark.parametrize("padded", [True, False])
def test_tiny_bert_gradients_match_transformers_packed_and_not(padded: bool) -> None:
    # Prepare: the packed layout (padded batch) and the plain one (no padding) both
    # skip the last block's non-first positions; the gradients must not notice.
    hf, native = _tiny_bert_pair_without_dropout()
    ids, mask = _padded_ids()
    if not padded:
        mask = torch.ones_like(ids)
    labels = torch.tensor([0, 2, 1])

    # Execute
    want = hf(input_ids=ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    got = native(input_ids=ids, attention_mask=mask, labels=labels)
    got.loss.backward()

    # Assert: every parameter that reaches the logits gets the same gradient;
    # the last block's query of non-first positions reaches nothing in either.
    hf_grads, native_grads = _param_grads(hf), _param_grads(native)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=ATOL)
    assert set(native_grads) == set(hf_grads)
    for name, grad in hf_grads.items():
        torch.testing.assert_close(native_grads[name], grad, rtol=1e-4, atol=ATOL)


def test_the_spelled_out_cpu_attention_matches_transformers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: attention dropout on, so the CPU path spells attention out; its
    # masks made identity, so the result must equal attention without dropout.
    hf, native = _tiny_bert_pair_without_dropout(attention_dropout=0.3)
    import lora_flwr.models.native.bert as native_bert

    calls: list[float] = []

    def no_drop(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
        calls.append(p)
        return x

    monkeypatch.setattr(native_bert, "dropout", no_drop)
    ids, mask = _padded_ids()

    # Execute
    want = hf(input_ids=ids, attention_mask=mask).logits
    got = native(input_ids=ids, attention_mask=mask).logits

    # Assert
    assert calls == [0.3, 0.3, 0.3]  # one per block
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_tiny_bert_refuses_left_padding_with_the_fix() -> None:
    # Prepare
    _, native = _tiny_bert_pair()
    ids, mask = _padded_ids()

    # Execute / Assert
    with pytest.raises(ValueError, match="right padding.*padding_side='right'"):
        native(input_ids=ids, attention_mask=mask.flip(1))


def test_tiny_bert_applies_the_configured_dropout_in_train_mode() -> None:
    # Prepare
    _, native = _tiny_bert_pair()
    ids, mask = _padded_ids()
    probs = {
        n: m.p for n, m in native.named_modules() if isinstance(m, torch.nn.Dropout)
    }

    # Execute
    native.train()
    torch.manual_seed(0)
    first = native(input_ids=ids, attention_mask=mask).logits
    second = native(input_ids=ids, attention_mask=mask).logits
    native.eval()
    eval_a = native(input_ids=ids, attention_mask=mask).logits
    eval_b = native(input_ids=ids, attention_mask=mask).logits

    # Assert
    assert probs["bert.encoder.layer.0.attention.self.dropout"] == 0.3
    assert probs["bert.embeddings.dropout"] == 0.2
    assert probs["dropout"] == 0.2  # no classifier_dropout: hidden's
    assert not torch.allclose(first, second)
    assert torch.equal(eval_a, eval_b)


def test_unsupported_configs_are_refused_with_the_key() -> None:
    # Prepare
    bert = BertConfig(hidden_act="gelu_new").to_dict()
    llama = LlamaConfig(
        rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    ).to_dict()

    # Execute / Assert
    with pytest.raises(RuntimeError, match="hidden_act"):
        BertForSequenceClassification(NativeConfig(bert))
    with pytest.raises(RuntimeError, match="'linear'"):
        LlamaForCausalLM(NativeConfig(llama))


# ---------------------------------------------------------------- config key
def test_implementation_key_picks_the_builder() -> None:
    # Execute / Assert
    assert uses_native(ModelConfig(name="minilm"))
    assert uses_native(ModelConfig(name="smollm2-135m", implementation="native"))
    assert not uses_native(ModelConfig(name="minilm", implementation="transformers"))
    assert not uses_native(ModelConfig(name="tiny-bert"))
    assert not uses_native(ModelConfig(name="some-org/some-model"))
    with pytest.raises(ValueError, match="`model.implementation`"):
        ModelConfig(name="tiny-bert", implementation="native")
    with pytest.raises(ValueError, match="`model.implementation`"):
        ModelConfig(name="minilm", implementation="torch")  # type: ignore[arg-type]


# ---------------------------------------------------------------- real MiniLM
@pytest.fixture(scope="module")
def minilm_pair() -> tuple[ModelBundle, ModelBundle]:
    """Native and transformers MiniLM classifiers, both built with seed 0."""
    native = load_model(ModelConfig(name="minilm", implementation="native"), seed=0)
    hf = load_model(ModelConfig(name="minilm", implementation="transformers"), seed=0)
    return native, hf


def test_native_minilm_has_the_transformers_keys_head_and_config(
    minilm_pair: tuple[ModelBundle, ModelBundle],
) -> None:
    # Prepare
    native, hf = minilm_pair

    # Execute
    native_sd, hf_sd = native.model.state_dict(), hf.model.state_dict()

    # Assert
    assert isinstance(native.model, BertForSequenceClassification)
    assert list(native_sd) == list(hf_sd)
    for key in hf_sd:  # same pretrained weights, same seeded head
        assert torch.equal(native_sd[key], hf_sd[key]), key
    assert native.model.config.name_or_path == "minilm"
    assert native.model.config.pad_token_id == hf.model.config.pad_token_id == 0
    assert native.model.config.num_labels == 2
    assert native.model.training is False


def test_native_tokenizer_encodes_real_text_like_transformers(
    minilm_pair: tuple[ModelBundle, ModelBundle],
) -> None:
    # Prepare
    native, hf = minilm_pair
    texts = _real_texts(300)

    # Execute
    ours, _ = _batch(native, texts, [0] * len(texts))
    theirs, _ = _batch(hf, texts, [0] * len(texts))
    padded = native.tokenizer(texts[:4], padding=True, return_tensors="pt")
    hf_padded = hf.tokenizer(texts[:4], padding=True, return_tensors="pt")

    # Assert
    assert [t.tolist() for t in ours.input_ids] == [
        t.tolist() for t in theirs.input_ids
    ]
    assert max(len(t) for t in ours.input_ids) == 48  # truncation happened
    assert set(padded) == set(hf_padded)
    assert all(torch.equal(padded[k], hf_padded[k]) for k in hf_padded)
    assert len(native.tokenizer) == len(hf.tokenizer)
    for name in ("pad", "unk", "cls", "sep"):
        assert getattr(native.tokenizer, f"{name}_token_id") == getattr(
            hf.tokenizer, f"{name}_token_id"
        )
    assert (
        native.tokenizer.decode(
            native.tokenizer("A three-hour cinema master class.")["input_ids"],
            skip_special_tokens=True,
        )
        == "a three - hour cinema master class."
    )


def test_native_minilm_logits_match_transformers_on_real_text(
    minilm_pair: tuple[ModelBundle, ModelBundle],
) -> None:
    # Prepare
    native, hf = minilm_pair
    _, batch = _batch(native, _real_texts(16), [1, 0] * 8)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    # Execute
    with torch.no_grad():
        got = native.model(**inputs, labels=batch["labels"])
        want = hf.model(**inputs, labels=batch["labels"])

    # Assert
    assert bool((batch["attention_mask"] == 0).any())  # a padded batch
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=ATOL)


def _lora_step(
    bundle: ModelBundle, batch: dict[str, torch.Tensor]
) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward/backward of a seeded LoRA adapter, dropout off (eval mode)."""
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=("query", "value", "dense"),
        modules_to_save=("classifier",),
    )
    adapter = LoRAAdapter(config, seed=3)
    adapter.apply(bundle.model)
    generator = torch.Generator().manual_seed(4)
    for p in adapter.parameters():  # non-zero B, so every factor gets a gradient
        p.data.add_(0.05 * torch.randn(p.shape, generator=generator))
    loss = bundle.model(**batch).loss
    loss.backward()
    return float(loss.detach()), _lora_grads(bundle.model)


def test_native_minilm_lora_step_matches_transformers() -> None:
    # Prepare: fresh models, the adapter is applied in place
    native = load_model(ModelConfig(name="minilm", implementation="native"), seed=1)
    hf = load_model(ModelConfig(name="minilm", implementation="transformers"), seed=1)
    _, batch = _batch(native, _real_texts(8), [1, 0, 0, 1, 1, 1, 0, 0])

    # Execute
    native_loss, native_grads = _lora_step(native, batch)
    hf_loss, hf_grads = _lora_step(hf, batch)

    # Assert
    assert list(native_grads) == list(hf_grads)
    assert any("lora_A" in n for n in native_grads)
    assert any("classifier" in n for n in native_grads)
    assert abs(native_loss - hf_loss) <= ATOL
    for name, grad in hf_grads.items():
        torch.testing.assert_close(native_grads[name], grad, rtol=0, atol=ATOL)


@pytest.mark.peft_compat
def test_native_trained_adapter_loads_in_peft_with_transformers(
    tmp_path: Path,
) -> None:
    # Prepare: train a few steps on the native model
    peft = pytest.importorskip("peft")
    native = load_model(ModelConfig(name="minilm", implementation="native"), seed=0)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=("query", "value"),
        modules_to_save=("classifier",),
    )
    adapter = LoRAAdapter(config, seed=0)
    adapter.apply(native.model)
    _, batch = _batch(native, _real_texts(8), [1, 0, 0, 1, 1, 1, 0, 0])
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    native.model.train()
    for _ in range(3):
        optimizer.zero_grad()
        native.model(**batch).loss.backward()
        optimizer.step()
    native.model.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ours = native.model(**inputs).logits

    # Execute
    save_peft(adapter, tmp_path, base_model_name_or_path="minilm")
    base = load_model(ModelConfig(name="minilm", implementation="transformers"))
    with torch.no_grad():
        plain = base.model(**inputs).logits
    peft_model = peft.PeftModel.from_pretrained(base.model, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits

    # Assert
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)


def test_building_native_minilm_imports_no_transformers() -> None:
    # Prepare
    code = (
        "import sys\n"
        "from lora_flwr.config import ModelConfig\n"
        "from lora_flwr.models import load_model\n"
        "b = load_model(ModelConfig(name='minilm'))\n"
        "print(type(b.model).__module__, 'transformers' in sys.modules)"
    )

    # Execute
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )

    # Assert
    assert out.stdout.split() == ["lora_flwr.models.native.bert", "False"]


def test_native_tokenizer_saves_a_directory_transformers_loads(
    minilm_pair: tuple[ModelBundle, ModelBundle], tmp_path: Path
) -> None:
    # Prepare
    from transformers import AutoTokenizer

    native, _ = minilm_pair
    texts = _real_texts(20)
    assert isinstance(native.tokenizer, NativeTokenizer)

    # Execute
    native.tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())

    # Assert
    assert settings["pad_token"] == "[PAD]"
    assert (
        loaded(texts, truncation=True, max_length=20)["input_ids"]
        == native.tokenizer(texts, truncation=True, max_length=20)["input_ids"]
    )
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        native.tokenizer.pad_token = "<no such token>"


# ---------------------------------------------------------------- bad files
def _model_copy(tmp_path: Path, skip: str) -> Path:
    """Link every file of the MiniLM directory into ``tmp_path`` except ``skip``."""
    source = fetch_asset("minilm")
    for item in source.iterdir():
        if item.is_file() and item.name != skip:
            (tmp_path / item.name).symlink_to(item)
    return tmp_path


@pytest.mark.parametrize(
    ("broken", "content", "match"),
    [
        ("model.safetensors", None, "weights .* are missing"),
        ("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "damaged"),
        ("tokenizer.json", None, "Cannot read the tokenizer"),
        ("config.json", b"[1, 2]", "not a JSON object"),
    ],
)
def test_bad_or_missing_model_files_give_a_clear_error(
    tmp_path: Path, broken: str, content: bytes | None, match: str
) -> None:
    # Prepare
    model_dir = _model_copy(tmp_path, skip=broken)
    if content is not None:
        (model_dir / broken).write_bytes(content)

    # Execute / Assert
    with pytest.raises(RuntimeError, match=match) as info:
        build_bert_classifier(ModelConfig(name="minilm"), model_dir)
    assert str(model_dir) in str(info.value)


def test_weights_of_another_shape_name_the_tensor(tmp_path: Path) -> None:
    # Prepare: a config that does not fit the weights
    model_dir = _model_copy(tmp_path, skip="config.json")
    config = json.loads((fetch_asset("minilm") / "config.json").read_text())
    config["intermediate_size"] = 1000
    (model_dir / "config.json").write_text(json.dumps(config))

    # Execute / Assert
    with pytest.raises(RuntimeError, match="intermediate.dense.weight.*shape"):
        build_bert_classifier(ModelConfig(name="minilm"), model_dir)


# ---------------------------------------------------------------- real SmolLM2
@pytest.mark.slow
def test_native_smollm2_matches_transformers_logits_loss_and_lora_grads() -> None:
    # Prepare
    native = load_model(ModelConfig(name="smollm2-135m", implementation="native"))
    hf = load_model(ModelConfig(name="smollm2-135m", implementation="transformers"))
    _, batch = _batch(native, _real_texts(4))
    kept = batch["attention_mask"].bool()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=("q_proj", "v_proj", "down_proj"),
    )

    # Execute
    with torch.no_grad():
        got = native.model(**batch)
        want = hf.model(**batch)
    losses, grads = [], []
    for bundle in (native, hf):
        adapter = LoRAAdapter(config, seed=3)
        adapter.apply(bundle.model)
        generator = torch.Generator().manual_seed(4)
        for p in adapter.parameters():
            p.data.add_(0.05 * torch.randn(p.shape, generator=generator))
        loss = bundle.model(**batch).loss
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(_lora_grads(bundle.model))

    # Assert
    assert list(native.model.state_dict()) == list(hf.model.state_dict())
    assert bool((~kept).any())
    torch.testing.assert_close(got.logits[kept], want.logits[kept], rtol=0, atol=ATOL)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=ATOL)
    assert abs(losses[0] - losses[1]) <= ATOL
    assert list(grads[0]) == list(grads[1]) and grads[0]
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=0, atol=ATOL)
