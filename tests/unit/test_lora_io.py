"""Adapter files: PEFT directory (safetensors + adapter_config.json) and JSON."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lora_flwr import atomic
from lora_flwr.config import LoraConfig
from lora_flwr.lora import (
    LoRAAdapter,
    LoRALinear,
    load_adapter,
    load_json,
    load_peft,
    save_json,
    save_merged_model,
    save_peft,
)
from lora_flwr.lora import io as lora_io
from lora_flwr.lora.adapter import MAX_ABS_VALUE

R = 4
CFG = LoraConfig(r=R, lora_alpha=8, lora_dropout=0.0, target_modules=("lin0", "lin1"))
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# The field set of a real PEFT save (STYLE.md section 9).
PEFT_FIELDS = {
    "alpha_pattern",
    "base_model_name_or_path",
    "bias",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "layers_pattern",
    "layers_to_transform",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "modules_to_save",
    "peft_type",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "task_type",
    "use_dora",
    "use_rslora",
}

Factory = Callable[..., LoRAAdapter]


@pytest.fixture
def applied(make_mlp: Callable[..., nn.Module]) -> Factory:
    """Return ``applied(config=CFG, seed=0)``: an adapter on a fresh MLP."""

    def build(config: LoraConfig = CFG, seed: int = 0) -> LoRAAdapter:
        adapter = LoRAAdapter(config, seed=seed)
        adapter.apply(make_mlp())
        return adapter

    return build


@pytest.fixture
def source(applied: Factory, randomize: Callable[..., None]) -> LoRAAdapter:
    """Return an adapter whose A, B (and saved modules) hold random values."""
    adapter = applied()
    randomize(adapter)
    return adapter


def _same(a: LoRAAdapter, b: LoRAAdapter) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _snapshot(adapter: LoRAAdapter) -> dict[str, torch.Tensor]:
    return adapter.state_dict()


def _unchanged(adapter: LoRAAdapter, snapshot: dict[str, torch.Tensor]) -> bool:
    now = adapter.state_dict()
    return all(torch.equal(now[k], v) for k, v in snapshot.items())


# ------------------------------------------------------------ PEFT round trip
def test_peft_round_trip_gives_identical_outputs(
    source: LoRAAdapter, applied: Factory, mlp_input: torch.Tensor, tmp_path: Path
) -> None:
    # Prepare
    target = applied(seed=1)  # another seed: another A before loading
    assert not _same(source, target)

    # Execute
    returned = save_peft(source, tmp_path / "adapter")
    load_peft(target, tmp_path / "adapter")

    # Assert
    assert returned == tmp_path / "adapter"
    assert _same(source, target)
    assert torch.equal(target.model(mlp_input), source.model(mlp_input))


def test_json_round_trip_is_bit_exact(applied: Factory, tmp_path: Path) -> None:
    # Prepare: extreme float32 values that a decimal round trip could lose (up to
    # the largest magnitude a file may hold)
    adapter = applied()
    largest = np.nextafter(np.float32(MAX_ABS_VALUE), np.float32(0))
    specials = np.array(
        [largest, np.finfo(np.float32).tiny, 1e-45, -0.0, 1 / 3],
        dtype=np.float32,
    )
    arrays = []
    for i, shape in enumerate(adapter.weight_shapes()):
        values = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
        values.flat[: specials.size] = specials
        arrays.append(values)
    adapter.set_weights(arrays)
    target = applied(seed=1)

    # Execute
    save_json(adapter, tmp_path / "adapter.json")
    load_json(target, tmp_path / "adapter.json")

    # Assert
    got = target.get_weights()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(arrays, got, strict=True))


def test_json_file_holds_config_and_named_tensors(
    source: LoRAAdapter, tmp_path: Path
) -> None:
    # Prepare
    path = tmp_path / "adapter.json"

    # Execute
    save_json(source, path)

    # Assert
    doc = json.loads(path.read_text())
    assert doc["format"] == "lora_flwr-adapter" and doc["version"] == 1
    assert doc["config"]["r"] == R and doc["config"]["target_modules"] == [
        "lin0",
        "lin1",
    ]
    assert [t["name"] for t in doc["tensors"]] == source.weight_names()
    assert [tuple(t["shape"]) for t in doc["tensors"]] == source.weight_shapes()


# -------------------------------------------------------------- file layout
def test_safetensors_keys_and_shapes_follow_peft(
    make_tiny_llama: Callable[..., Any], randomize: Callable[..., None], tmp_path: Path
) -> None:
    # Prepare
    adapter = LoRAAdapter(LoraConfig(r=R))
    adapter.apply(make_tiny_llama())
    randomize(adapter)

    # Execute
    save_peft(adapter, tmp_path)

    # Assert
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as fh:
        metadata = fh.metadata()
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    expected = {}
    for i in range(2):
        for proj, out in (("q_proj", 32), ("v_proj", 16)):
            stem = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            expected[f"{stem}.lora_A.weight"] = (R, 32)
            expected[f"{stem}.lora_B.weight"] = (out, R)
    assert shapes == expected
    assert metadata == {"format": "pt"}
    stored = load_file(str(tmp_path / WEIGHTS))
    for name, tensor in adapter.state_dict().items():
        assert torch.equal(stored[f"base_model.model.{name}"], tensor)


def test_saved_modules_are_stored_under_their_plain_names(
    applied: Factory, randomize: Callable[..., None], tmp_path: Path
) -> None:
    # Prepare
    adapter = applied(
        LoraConfig(r=R, target_modules=("lin0",), modules_to_save=("lin1",))
    )
    randomize(adapter)

    # Execute
    save_peft(adapter, tmp_path)

    # Assert
    assert set(load_file(str(tmp_path / WEIGHTS))) == {
        "base_model.model.lin0.lora_A.weight",
        "base_model.model.lin0.lora_B.weight",
        "base_model.model.lin1.weight",
        "base_model.model.lin1.bias",
    }
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["modules_to_save"] == ["lin1"]


def test_adapter_config_json_has_peft_fields(
    source: LoRAAdapter, tmp_path: Path
) -> None:
    # Prepare / Execute
    save_peft(source, tmp_path, base_model_name_or_path="tiny-mlp", task_type=None)

    # Assert
    text = (tmp_path / CONFIG).read_text()
    config = json.loads(text)
    assert PEFT_FIELDS <= set(config)
    assert set(config) - PEFT_FIELDS <= {"auto_mapping"}
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (R, 8.0, 0.0)
    assert config["target_modules"] == ["lin0", "lin1"]
    assert config["base_model_name_or_path"] == "tiny-mlp"
    assert config["task_type"] is None
    assert config["modules_to_save"] is None
    assert config["fan_in_fan_out"] is False
    assert config["init_lora_weights"] is True
    assert config["bias"] == "none"
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["lora_bias"] is False
    assert config["inference_mode"] is True


def test_adapter_config_marks_gpt2_as_fan_in_fan_out(
    make_tiny_gpt2: Callable[..., Any], tmp_path: Path
) -> None:
    # Prepare
    adapter = LoRAAdapter(
        LoraConfig(r=R, target_modules=r".*\.c_attn", init_lora_weights="gaussian")
    )
    adapter.apply(make_tiny_gpt2())

    # Execute
    save_peft(adapter, tmp_path, task_type="CAUSAL_LM")

    # Assert
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["fan_in_fan_out"] is True
    assert config["task_type"] == "CAUSAL_LM"
    assert config["init_lora_weights"] == "gaussian"
    # A regex is written as the full names it matched, so PEFT wraps the same layers.
    assert config["target_modules"] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]


# ----------------------------------------------------------- load_adapter
def test_load_adapter_builds_from_the_saved_config(
    make_mlp: Callable[..., nn.Module],
    mlp_input: torch.Tensor,
    randomize: Callable[..., None],
    tmp_path: Path,
) -> None:
    # Prepare
    config = LoraConfig(
        r=2, lora_alpha=3, lora_dropout=0.0, target_modules=r"lin\d", use_rslora=True
    )
    source = LoRAAdapter(config)
    source.apply(make_mlp())
    randomize(source)
    save_peft(source, tmp_path)
    model = make_mlp()

    # Execute
    loaded = load_adapter(model, tmp_path, seed=5)

    # Assert
    assert loaded.model is model
    assert loaded.config.r == 2 and loaded.config.use_rslora
    assert loaded.config.scaling == pytest.approx(3 / math.sqrt(2))
    assert loaded.module_names == ["lin0", "lin1"]
    assert _same(source, loaded)
    assert torch.equal(model(mlp_input), source.model(mlp_input))


def test_load_adapter_skips_saved_module_names_the_model_lacks(
    applied: Factory,
    make_mlp: Callable[..., nn.Module],
    randomize: Callable[..., None],
    mlp_input: torch.Tensor,
    tmp_path: Path,
) -> None:
    # Prepare: PEFT's SEQ_CLS saves list both "classifier" and "score"
    source = applied(
        LoraConfig(r=R, target_modules=("lin0",), modules_to_save=("lin1",))
    )
    randomize(source)
    save_peft(source, tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    config["modules_to_save"] = ["lin1", "score"]
    (tmp_path / CONFIG).write_text(json.dumps(config))
    model = make_mlp()

    # Execute
    loaded = load_adapter(model, tmp_path)

    # Assert
    assert loaded.config.modules_to_save == ("lin1",)
    assert torch.equal(model(mlp_input), source.model(mlp_input))


# --------------------------------------------------------------- PEFT errors
def _rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS))


def _edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


P = "base_model.model."


def _corrupt(case: str, path: Path) -> Path:
    """Break the saved adapter at ``path``; return the path to load from."""
    weights = path / WEIGHTS
    if case == "missing dir":
        return path / "nope"
    if case == "missing config":
        (path / CONFIG).unlink()
    elif case == "missing weights":
        weights.unlink()
    elif case == "garbage weights":
        weights.write_bytes(np.random.default_rng(0).bytes(256))
    elif case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "garbage config":
        (path / CONFIG).write_bytes(b"\xff\xfe{not json")
    elif case == "truncated config":
        (path / CONFIG).write_text((path / CONFIG).read_text()[:40])
    elif case == "not lora":
        _edit_config(path, peft_type="PREFIX_TUNING")
    elif case == "other rank":
        _edit_config(path, r=8)
    elif case == "other alpha":
        _edit_config(path, lora_alpha=32)
    elif case == "alpha pattern":
        _edit_config(path, alpha_pattern={"lin0": 32})
    elif case == "dora":
        _edit_config(path, use_dora=True)
    elif case == "nan":
        _rewrite(path, lambda t: t[P + "lin0.lora_B.weight"].fill_(float("nan")))
    elif case == "inf":
        _rewrite(path, lambda t: t[P + "lin1.lora_A.weight"].fill_(float("inf")))
    elif case == "missing key":
        _rewrite(path, lambda t: t.pop(P + "lin1.lora_A.weight"))
    elif case == "unexpected key":
        _rewrite(path, lambda t: t.update({P + "lin2.lora_A.weight": torch.ones(R, 2)}))
    elif case == "wrong shape":
        _rewrite(
            path, lambda t: t.update({P + "lin0.lora_A.weight": torch.ones(R, 11)})
        )
    elif case == "int dtype":
        _rewrite(
            path,
            lambda t: t.update(
                {P + "lin0.lora_A.weight": torch.ones(R, 10, dtype=torch.int32)}
            ),
        )
    else:  # pragma: no cover
        raise AssertionError(case)
    return path


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("missing dir", FileNotFoundError, "Adapter directory not found"),
        ("missing config", FileNotFoundError, "No adapter_config.json"),
        ("missing weights", FileNotFoundError, "Adapter weights not found"),
        ("garbage weights", ValueError, "not a readable safetensors file"),
        ("truncated weights", ValueError, "not a readable safetensors file"),
        ("garbage config", ValueError, "is not valid JSON"),
        ("truncated config", ValueError, "is not valid JSON"),
        ("not lora", ValueError, "is not a LoRA adapter config"),
        ("other rank", ValueError, "r=8, lora_alpha=8.*this adapter has r=4"),
        ("other alpha", ValueError, "lora_alpha=32"),
        ("alpha pattern", ValueError, "does not support: {'alpha_pattern'"),
        ("dora", ValueError, "does not support: {'use_dora': True}"),
        ("nan", ValueError, r"lin0\.lora_B\.weight: contains NaN or Inf"),
        ("inf", ValueError, r"lin1\.lora_A\.weight: contains NaN or Inf"),
        ("missing key", ValueError, r"missing \['lin1\.lora_A\.weight'\]"),
        ("unexpected key", ValueError, r"unexpected \['lin2\.lora_A\.weight'\]"),
        ("wrong shape", ValueError, r"lin0\.lora_A\.weight: shape \(4, 11\)"),
        ("int dtype", ValueError, r"lin0\.lora_A\.weight: dtype torch\.int32"),
    ],
)
def test_bad_peft_dir_raises_and_leaves_adapter_unchanged(
    case: str,
    error: type[Exception],
    message: str,
    source: LoRAAdapter,
    applied: Factory,
    tmp_path: Path,
) -> None:
    # Prepare
    save_peft(source, tmp_path)
    path = _corrupt(case, tmp_path)
    target = applied(seed=1)
    before = _snapshot(target)

    # Execute / Assert
    with pytest.raises(error, match=message):
        load_peft(target, path)
    assert _unchanged(target, before)


def test_loading_rank_4_into_rank_8_names_both_ranks(
    source: LoRAAdapter, applied: Factory, tmp_path: Path
) -> None:
    # Prepare
    save_peft(source, tmp_path)
    target = applied(LoraConfig(r=8, lora_alpha=16, target_modules=("lin0", "lin1")))
    before = _snapshot(target)

    # Execute / Assert
    with pytest.raises(ValueError, match="holds an adapter with r=4") as info:
        load_peft(target, tmp_path)
    assert "this adapter has r=8" in str(info.value)
    assert _unchanged(target, before)


def test_loading_tensors_of_another_model_names_the_tensor(
    source: LoRAAdapter, tmp_path: Path
) -> None:
    # Prepare: same names and rank, other layer sizes
    save_peft(source, tmp_path)
    other = nn.Sequential()
    other.add_module("lin0", nn.Linear(12, 20))
    other.add_module("lin1", nn.Linear(20, 2))
    target = LoRAAdapter(CFG)
    target.apply(other)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"lin0\.lora_A\.weight: shape \(4, 10\)"):
        load_peft(target, tmp_path)


def test_load_accepts_keys_with_the_adapter_name(
    source: LoRAAdapter, applied: Factory, tmp_path: Path
) -> None:
    # Prepare: older PEFT saves keep ".default." in the key
    save_peft(source, tmp_path)
    _rewrite(
        tmp_path,
        lambda t: t.update(
            {
                k.replace(".lora_A.", ".lora_A.default."): t.pop(k)
                for k in list(t)
                if ".lora_A." in k
            }
        ),
    )
    target = applied(seed=1)

    # Execute
    load_peft(target, tmp_path)

    # Assert
    assert _same(source, target)


def test_half_precision_file_is_cast_to_float32(
    source: LoRAAdapter, applied: Factory, tmp_path: Path
) -> None:
    # Prepare: PEFT saves in the model's dtype, e.g. bfloat16
    save_peft(source, tmp_path)
    _rewrite(tmp_path, lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    target = applied(seed=1)

    # Execute
    load_peft(target, tmp_path)

    # Assert
    for name, tensor in target.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, source.state_dict()[name].bfloat16().float())


# --------------------------------------------------------------- JSON errors
def _corrupt_json(case: str, path: Path) -> Path:
    if case == "missing file":
        return path.with_name("nope.json")
    text = path.read_text()
    doc = json.loads(text)
    if case == "truncated":
        path.write_text(text[: len(text) // 2])
        return path
    if case == "garbage":
        path.write_bytes(b"\x00\xff garbage")
        return path
    if case == "not ours":
        doc = [1, 2, 3]
    elif case == "version":
        doc["version"] = 99
    elif case == "config not object":
        doc["config"] = [1, 2]
    elif case == "other rank":
        doc["config"]["r"] = 8
    elif case == "numel":
        doc["tensors"][1]["data"].pop()
    elif case == "negative shape":
        doc["tensors"][0]["shape"] = [-R, -10]
    elif case == "dtype":
        doc["tensors"][0]["dtype"] = "float16"
    elif case == "no data":
        del doc["tensors"][0]["data"]
    elif case == "nan":
        doc["tensors"][2]["data"][0] = float("nan")
    elif case == "unknown name":
        doc["tensors"][0]["name"] = "lin7.lora_A.weight"
    elif case == "absurd value":
        doc["tensors"][2]["data"][0] = 3e5
    elif case == "oversized":
        doc["padding"] = " " * (2 << 20)
    else:  # pragma: no cover
        raise AssertionError(case)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("missing file", FileNotFoundError, "Adapter JSON file not found"),
        ("truncated", ValueError, "is not valid JSON"),
        ("garbage", ValueError, "is not valid JSON"),
        ("not ours", ValueError, "is not a lora_flwr adapter JSON file"),
        ("version", ValueError, "unsupported version 99"),
        ("config not object", ValueError, "`config` should be an object"),
        ("other rank", ValueError, "holds an adapter with r=8"),
        ("numel", ValueError, r"tensor #1 is malformed: 79 values for shape \[20, 4\]"),
        ("negative shape", ValueError, "tensor #0 is malformed"),
        ("dtype", ValueError, "tensor #0 is malformed: dtype 'float16'"),
        ("no data", ValueError, "tensor #0 is malformed"),
        ("nan", ValueError, r"lin1\.lora_A\.weight: contains NaN or Inf"),
        ("unknown name", ValueError, r"unexpected \['lin7\.lora_A\.weight'\]"),
        ("absurd value", ValueError, r"a value of magnitude 3e\+05 exceeds 10000"),
        ("oversized", ValueError, r"bytes, more than the .* an adapter of"),
    ],
)
def test_bad_json_raises_and_leaves_adapter_unchanged(
    case: str,
    error: type[Exception],
    message: str,
    source: LoRAAdapter,
    applied: Factory,
    tmp_path: Path,
) -> None:
    # Prepare
    path = save_json(source, tmp_path / "adapter.json")
    path = _corrupt_json(case, path)
    target = applied(seed=1)
    before = _snapshot(target)

    # Execute / Assert
    with pytest.raises(error, match=message):
        load_json(target, path)
    assert _unchanged(target, before)


# ------------------------------------------------------------ atomic writes
def test_failed_safetensors_write_keeps_the_previous_file(
    source: LoRAAdapter,
    randomize: Callable[..., None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    save_peft(source, tmp_path)
    before = (tmp_path / WEIGHTS).read_bytes()
    randomize(source, seed=9)

    def broken_writer(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lora_io, "save_file", broken_writer)

    # Execute / Assert
    with pytest.raises(OSError, match="disk full"):
        save_peft(source, tmp_path)
    assert (tmp_path / WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG, WEIGHTS])


def test_failed_first_write_leaves_no_file(
    source: LoRAAdapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    def broken_writer(tensors: Any, filename: str, metadata: Any = None) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(lora_io, "save_file", broken_writer)

    # Execute / Assert
    with pytest.raises(OSError, match="disk full"):
        save_peft(source, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_keeps_the_previous_json_and_no_temp_file(
    source: LoRAAdapter,
    randomize: Callable[..., None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    path = save_json(source, tmp_path / "adapter.json")
    before = path.read_bytes()
    randomize(source, seed=9)

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)

    # Execute / Assert
    with pytest.raises(OSError, match="rename failed"):
        save_json(source, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.json"]


# ------------------------------------------------------------ merged export
def test_save_merged_model_writes_a_plain_state_dict(
    source: LoRAAdapter,
    make_mlp: Callable[..., nn.Module],
    mlp_input: torch.Tensor,
    tmp_path: Path,
) -> None:
    # Prepare
    adapted = source.model(mlp_input)
    before = _snapshot(source)

    # Execute
    save_merged_model(source, tmp_path)
    plain = make_mlp(seed=3)
    plain.load_state_dict(load_file(str(tmp_path / "model.safetensors")))

    # Assert
    torch.testing.assert_close(plain(mlp_input), adapted, rtol=1e-5, atol=1e-6)
    assert _unchanged(source, before)
    assert all(not layer.merged for layer in source.layers.values())
    assert sum(isinstance(m, LoRALinear) for m in source.model.modules()) == 2


def test_save_merged_hf_model_loads_with_from_pretrained(
    make_tiny_llama: Callable[..., Any],
    randomize: Callable[..., None],
    token_ids: torch.Tensor,
    tmp_path: Path,
) -> None:
    # Prepare
    from transformers import LlamaForCausalLM

    adapter = LoRAAdapter(LoraConfig(r=R, lora_dropout=0.0))
    adapter.apply(make_tiny_llama())
    randomize(adapter)
    adapted = adapter.model(input_ids=token_ids).logits

    # Execute
    save_merged_model(adapter, tmp_path)
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()

    # Assert
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    torch.testing.assert_close(
        plain(input_ids=token_ids).logits, adapted, rtol=1e-4, atol=1e-5
    )


# ----------------------------------------------------------------- property
@settings(
    max_examples=15,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # a pure factory
)
@given(data=st.data())
def test_property_json_and_peft_round_trips_are_bit_exact(
    data: st.DataObject, applied: Factory
) -> None:
    # Prepare
    adapter = applied()
    # Every value a file may hold: finite, |x| <= MAX_ABS_VALUE (incl. subnormals).
    finite = st.floats(
        width=32,
        allow_nan=False,
        allow_infinity=False,
        min_value=-MAX_ABS_VALUE,
        max_value=MAX_ABS_VALUE,
    )
    arrays = [
        data.draw(hnp.arrays(np.float32, shape, elements=finite))
        for shape in adapter.weight_shapes()
    ]
    adapter.set_weights(arrays)
    from_json, from_peft = applied(seed=1), applied(seed=2)

    # Execute
    with tempfile.TemporaryDirectory() as tmp:
        save_json(adapter, Path(tmp) / "a.json")
        load_json(from_json, Path(tmp) / "a.json")
        save_peft(adapter, Path(tmp) / "peft")
        load_peft(from_peft, Path(tmp) / "peft")

    # Assert
    for loaded in (from_json, from_peft):
        got = loaded.get_weights()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(arrays, got, strict=True))


def test_load_peft_puts_back_an_adapter_a_killed_save_set_aside(
    source: LoRAAdapter, applied: Factory, tmp_path: Path, killed_writer: Any
) -> None:
    # Prepare: a second save was killed between the swap's two renames.
    save_peft(source, tmp_path / "adapter")
    killed_writer(tmp_path / "adapter", "dir", 1)
    assert not (tmp_path / "adapter").exists()
    target = applied(seed=1)

    # Execute
    load_peft(target, tmp_path / "adapter")

    # Assert
    assert _same(source, target)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
