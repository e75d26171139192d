"""LoRAAdapter: apply, seeded init, trainable set, weight order, get/set, merge."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_flwr.config import LoraConfig
from lora_flwr.lora import LoRAAdapter, LoRALinear, merge_and_unload

R = 4
MLP_CFG = LoraConfig(r=R, lora_alpha=8, lora_dropout=0.0, target_modules=("lin0",))
BOTH_CFG = LoraConfig(
    r=R, lora_alpha=8, lora_dropout=0.0, target_modules=("lin0", "lin1")
)
SAVE_CFG = LoraConfig(
    r=R,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=("lin0",),
    modules_to_save=("lin1",),
)


@pytest.fixture
def applied(make_mlp: Callable[..., nn.Module]) -> Callable[..., LoRAAdapter]:
    """Return ``applied(config=BOTH_CFG, seed=0)``: an adapter on a fresh MLP."""

    def build(config: LoraConfig = BOTH_CFG, seed: int = 0) -> LoRAAdapter:
        adapter = LoRAAdapter(config, seed=seed)
        adapter.apply(make_mlp())
        return adapter

    return build


def _lora_count(model: nn.Module) -> int:
    return sum(isinstance(m, LoRALinear) for m in model.modules())


# ----------------------------------------------------------------- defaults
def test_default_config_is_the_seeds() -> None:
    # Prepare / Execute
    adapter = LoRAAdapter()

    # Assert
    cfg = adapter.config
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16.0, 0.1)
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert not adapter.is_applied


def test_default_config_wraps_q_and_v_of_llama(
    make_tiny_llama: Callable[..., Any], token_ids: torch.Tensor
) -> None:
    # Prepare
    model = make_tiny_llama()
    reference = copy.deepcopy(model)

    # Execute
    adapter = LoRAAdapter()
    returned = adapter.apply(model)

    # Assert
    assert returned is model
    assert adapter.module_names == [
        f"model.layers.{i}.self_attn.{p}"
        for i in range(2)
        for p in ("q_proj", "v_proj")
    ]
    assert _lora_count(model) == 4
    # B = 0: the adapted model starts out computing exactly the base model.
    assert torch.equal(
        model(input_ids=token_ids).logits, reference(input_ids=token_ids).logits
    )


def test_gpt2_conv1d_starts_identical_to_base(
    make_tiny_gpt2: Callable[..., Any], token_ids: torch.Tensor
) -> None:
    # Prepare
    model = make_tiny_gpt2()
    reference = copy.deepcopy(model)
    adapter = LoRAAdapter(LoraConfig(r=R, target_modules=("c_attn",)))

    # Execute
    adapter.apply(model)

    # Assert
    layers = list(adapter.layers.values())
    assert len(layers) == 2 and all(layer.fan_in_fan_out for layer in layers)
    assert adapter.weight_shapes()[:2] == [(R, 32), (96, R)]
    assert torch.equal(
        model(input_ids=token_ids).logits, reference(input_ids=token_ids).logits
    )


# ---------------------------------------------------------------- seeded init
def test_same_seed_gives_same_a_and_different_seed_different_a(
    applied: Callable[..., LoRAAdapter],
) -> None:
    # Prepare / Execute
    first = applied(seed=7).get_weights()
    second = applied(seed=7).get_weights()
    other = applied(seed=8).get_weights()

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], other[0])  # lin0.lora_A.weight
    assert not np.array_equal(first[2], other[2])  # lin1.lora_A.weight
    assert np.count_nonzero(first[1]) == 0 and np.count_nonzero(other[1]) == 0


def test_apply_neither_reads_nor_advances_the_global_rng(
    applied: Callable[..., LoRAAdapter],
) -> None:
    # Prepare
    torch.manual_seed(123)
    state = torch.get_rng_state()

    # Execute
    after_123 = applied(seed=0).get_weights()
    state_after = torch.get_rng_state()
    torch.manual_seed(456)
    after_456 = applied(seed=0).get_weights()

    # Assert
    assert torch.equal(state, state_after)
    assert all(np.array_equal(a, b) for a, b in zip(after_123, after_456, strict=True))


def test_reset_restores_the_seeded_init(
    applied: Callable[..., LoRAAdapter], randomize: Callable[..., None]
) -> None:
    # Prepare
    adapter = applied(seed=3)
    initial = adapter.get_weights()
    randomize(adapter)

    # Execute
    adapter.reset()

    # Assert
    assert all(
        np.array_equal(a, b)
        for a, b in zip(initial, adapter.get_weights(), strict=True)
    )


def test_reset_with_another_seed_draws_another_a(
    applied: Callable[..., LoRAAdapter],
) -> None:
    # Prepare
    adapter = applied(seed=3)
    initial = adapter.get_weights()

    # Execute
    adapter.reset(seed=4)

    # Assert
    assert not np.array_equal(initial[0], adapter.get_weights()[0])
    assert np.count_nonzero(adapter.get_weights()[1]) == 0


# ----------------------------------------------------------- trainable set
def test_only_lora_and_saved_params_are_updated(
    mlp_input: torch.Tensor, applied: Callable[..., LoRAAdapter]
) -> None:
    # Prepare (PEFT's test_only_params_are_updated)
    adapter = applied(SAVE_CFG)
    model = adapter.model
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    # Execute
    for _ in range(2):
        optimizer.zero_grad()
        model(mlp_input).pow(2).sum().backward()
        optimizer.step()

    # Assert
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {
        "lin0.lora_A.weight",
        "lin0.lora_B.weight",
        "lin1.weight",
        "lin1.bias",
    }


def test_base_params_are_frozen(make_tiny_bert: Callable[..., Any]) -> None:
    # Prepare
    model = make_tiny_bert()
    adapter = LoRAAdapter(
        LoraConfig(
            r=R, target_modules=("query", "value"), modules_to_save=("classifier",)
        )
    )

    # Execute
    adapter.apply(model)

    # Assert
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter.weight_names())
    assert {id(p) for p in adapter.parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert all(".lora_" in n or n.startswith("classifier.") for n in trainable)


# ------------------------------------------------------------------ order
def test_weight_order_names_shapes_and_count(
    applied: Callable[..., LoRAAdapter],
) -> None:
    # Prepare
    adapter = applied(BOTH_CFG)

    # Execute
    names = adapter.weight_names()
    shapes = adapter.weight_shapes()

    # Assert
    assert names == [
        "lin0.lora_A.weight",
        "lin0.lora_B.weight",
        "lin1.lora_A.weight",
        "lin1.lora_B.weight",
    ]
    assert shapes == [(R, 10), (20, R), (R, 20), (2, R)]
    assert adapter.num_parameters() == R * (10 + 20) + R * (20 + 2)
    assert [a.shape for a in adapter.get_weights()] == shapes


def test_weight_order_follows_the_model_not_the_config(
    applied: Callable[..., LoRAAdapter],
) -> None:
    # Prepare
    forward = LoraConfig(r=R, target_modules=("lin0", "lin1"))
    backward = LoraConfig(r=R, target_modules=("lin1", "lin0"))

    # Execute
    names_forward = applied(forward).weight_names()
    names_backward = applied(backward).weight_names()

    # Assert
    assert names_forward == names_backward


def test_saved_module_params_come_after_lora_factors(
    applied: Callable[..., LoRAAdapter],
) -> None:
    # Prepare / Execute
    adapter = applied(SAVE_CFG)

    # Assert
    assert adapter.weight_names() == [
        "lin0.lora_A.weight",
        "lin0.lora_B.weight",
        "lin1.weight",
        "lin1.bias",
    ]
    assert adapter.num_parameters() == R * (10 + 20) + 2 * 20 + 2


def test_count_is_r_times_in_plus_out_per_module(
    make_tiny_llama: Callable[..., Any],
) -> None:
    # Prepare
    model = make_tiny_llama()
    adapter = LoRAAdapter(LoraConfig(r=R))

    # Execute
    adapter.apply(model)

    # Assert: q_proj is 32 -> 32; v_proj is 32 -> 16 (2 KV heads of size 8)
    assert adapter.weight_shapes()[:4] == [(R, 32), (32, R), (R, 32), (16, R)]
    assert adapter.num_parameters() == 2 * (R * (32 + 32) + R * (32 + 16))


# --------------------------------------------------------------- get / set
def test_get_set_round_trip_and_copies(applied: Callable[..., LoRAAdapter]) -> None:
    # Prepare
    adapter = applied()
    generator = np.random.default_rng(0)
    arrays = [
        generator.standard_normal(s).astype(np.float32) for s in adapter.weight_shapes()
    ]

    # Execute
    adapter.set_weights(arrays)
    got = adapter.get_weights()
    got[0][...] = 0.0  # mutating the returned copy must not touch the adapter
    arrays[1][...] = 0.0  # nor mutating the array that was passed in

    # Assert
    again = adapter.get_weights()
    assert not np.array_equal(again[0], got[0])
    assert not np.array_equal(again[1], arrays[1])
    assert all(a.dtype == np.float32 for a in again)


def test_set_weights_accepts_read_only_arrays_without_warning(
    applied: Callable[..., LoRAAdapter],
) -> None:
    # Prepare
    adapter = applied()
    arrays = [np.full(s, 0.5, dtype=np.float32) for s in adapter.weight_shapes()]
    for array in arrays:
        array.setflags(write=False)

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.set_weights(arrays)

    # Assert
    assert all(np.all(a == 0.5) for a in adapter.get_weights())


def _bad_arrays(case: str, shapes: list[tuple[int, ...]]) -> list[Any]:
    """A batch whose first array is valid (and new) and whose third is bad."""
    arrays: list[Any] = [np.full(s, 0.25, dtype=np.float32) for s in shapes]
    if case == "count":
        return arrays[:-1]
    if case == "shape":
        arrays[2] = np.zeros((R + 1, 20), dtype=np.float32)
    elif case == "dtype":
        arrays[2] = arrays[2].astype(np.float64)
    elif case == "nan":
        arrays[2][0, 0] = np.nan
    elif case == "inf":
        arrays[2][0, 0] = np.inf
    elif case == "list":
        arrays[2] = arrays[2].tolist()
    elif case == "int":
        arrays[2] = arrays[2].astype(np.int32)
    return arrays


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("count", "Expected 4 adapter arrays"),
        ("shape", r"lin1\.lora_A\.weight: shape \(5, 20\)"),
        ("dtype", r"lin1\.lora_A\.weight: dtype float64"),
        ("int", r"lin1\.lora_A\.weight: dtype int32"),
        ("nan", r"lin1\.lora_A\.weight: contains NaN or Inf"),
        ("inf", r"lin1\.lora_A\.weight: contains NaN or Inf"),
        ("list", r"lin1\.lora_A\.weight: not a numpy array"),
    ],
)
def test_set_weights_rejects_bad_input_all_or_nothing(
    case: str, message: str, applied: Callable[..., LoRAAdapter]
) -> None:
    # Prepare
    adapter = applied()
    before = adapter.get_weights()
    arrays = _bad_arrays(case, adapter.weight_shapes())

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        adapter.set_weights(arrays)
    after = adapter.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_load_state_dict_rejects_values_that_overflow_float32(
    applied: Callable[..., LoRAAdapter],
) -> None:
    # Prepare
    adapter = applied()
    before = adapter.get_weights()
    state = adapter.state_dict()
    state["lin0.lora_B.weight"] = torch.full((20, R), 1e300, dtype=torch.float64)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"lin0\.lora_B\.weight: contains NaN or Inf"):
        adapter.load_state_dict(state)
    assert all(
        np.array_equal(a, b) for a, b in zip(before, adapter.get_weights(), strict=True)
    )


def test_load_state_dict_names_missing_and_unexpected_keys(
    applied: Callable[..., LoRAAdapter],
) -> None:
    # Prepare
    adapter = applied()
    state = adapter.state_dict()
    state["lin9.lora_A.weight"] = state.pop("lin1.lora_A.weight")

    # Execute / Assert
    with pytest.raises(ValueError, match=r"missing \['lin1\.lora_A\.weight'\]") as info:
        adapter.load_state_dict(state)
    assert "unexpected ['lin9.lora_A.weight']" in str(info.value)


def test_weights_need_an_applied_adapter() -> None:
    # Prepare
    adapter = LoRAAdapter(MLP_CFG)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="not applied"):
        adapter.get_weights()


@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # a pure factory
)
@given(data=st.data())
def test_property_set_then_get_is_identity(
    data: st.DataObject, applied: Callable[..., LoRAAdapter]
) -> None:
    # Prepare
    adapter = applied(SAVE_CFG)
    finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
    arrays = [
        data.draw(hnp.arrays(np.float32, shape, elements=finite))
        for shape in adapter.weight_shapes()
    ]

    # Execute
    adapter.set_weights(arrays)
    got = adapter.get_weights()

    # Assert
    assert all(a.tobytes() == b.tobytes() for a, b in zip(arrays, got, strict=True))


# --------------------------------------------------------------- apply errors
def test_apply_twice_raises(
    applied: Callable[..., LoRAAdapter], make_mlp: Callable[..., nn.Module]
) -> None:
    # Prepare
    adapter = applied()
    other = LoRAAdapter(BOTH_CFG)

    # Execute / Assert
    with pytest.raises(ValueError, match="already applied"):
        adapter.apply(make_mlp())
    with pytest.raises(ValueError, match="already contains LoRA layers"):
        other.apply(adapter.model)
    assert _lora_count(adapter.model) == 2


def test_no_match_lists_existing_linear_layers(
    make_mlp: Callable[..., nn.Module],
) -> None:
    # Prepare
    adapter = LoRAAdapter(LoraConfig(target_modules=("q_proj", "v_proj")))
    model = make_mlp()

    # Execute / Assert
    with pytest.raises(ValueError, match="matches no module") as info:
        adapter.apply(model)
    assert "['lin0', 'lin1']" in str(info.value)
    assert _lora_count(model) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_regex_target_must_match_the_whole_name(
    make_tiny_bert: Callable[..., Any],
) -> None:
    # Prepare
    model = make_tiny_bert()
    adapter = LoRAAdapter(LoraConfig(r=R, target_modules=r".*\.(query|value)"))

    # Execute
    adapter.apply(model)

    # Assert
    assert adapter.module_names == [
        f"bert.encoder.layer.{i}.attention.self.{p}"
        for i in range(2)
        for p in ("query", "value")
    ]


def test_regex_partial_match_is_not_enough(make_mlp: Callable[..., nn.Module]) -> None:
    # Prepare
    adapter = LoRAAdapter(LoraConfig(target_modules="lin"))

    # Execute / Assert
    with pytest.raises(ValueError, match="matches no module"):
        adapter.apply(make_mlp())
    assert LoRAAdapter(LoraConfig(target_modules=r"lin\d")).apply(make_mlp())


def test_list_entries_match_exact_names_and_dotted_suffixes(
    make_tiny_bert: Callable[..., Any],
) -> None:
    # Prepare
    exact = "bert.encoder.layer.1.attention.self.key"

    # Execute
    suffix = LoRAAdapter(LoraConfig(r=R, target_modules=("query",)))
    suffix.apply(make_tiny_bert())
    full = LoRAAdapter(LoraConfig(r=R, target_modules=(exact,)))
    full.apply(make_tiny_bert())

    # Assert
    assert suffix.module_names == [
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)
    ]
    assert full.module_names == [exact]
    with pytest.raises(ValueError, match="matches no module"):
        LoRAAdapter(LoraConfig(target_modules=("uery",))).apply(make_tiny_bert())


@pytest.mark.parametrize(("target", "kind"), [("relu", "ReLU"), ("drop", "Dropout")])
def test_match_on_a_non_linear_module_raises(
    target: str, kind: str, make_mlp: Callable[..., nn.Module]
) -> None:
    # Prepare
    model = make_mlp()
    adapter = LoRAAdapter(LoraConfig(target_modules=(target, "lin0")))

    # Execute / Assert
    with pytest.raises(ValueError, match=f"matched '{target}', a {kind}"):
        adapter.apply(model)
    assert _lora_count(model) == 0


def test_match_on_a_container_raises(make_tiny_bert: Callable[..., Any]) -> None:
    # Prepare
    adapter = LoRAAdapter(LoraConfig(target_modules=("attention",)))

    # Execute / Assert
    with pytest.raises(ValueError, match="BertAttention"):
        adapter.apply(make_tiny_bert())


def test_unknown_modules_to_save_raises(make_mlp: Callable[..., nn.Module]) -> None:
    # Prepare
    adapter = LoRAAdapter(
        LoraConfig(target_modules=("lin0",), modules_to_save=("classifier",))
    )

    # Execute / Assert
    with pytest.raises(ValueError, match="`modules_to_save` entry 'classifier'"):
        adapter.apply(make_mlp())


def test_target_inside_modules_to_save_raises(
    make_mlp: Callable[..., nn.Module],
) -> None:
    # Prepare
    adapter = LoRAAdapter(
        LoraConfig(target_modules=("lin1",), modules_to_save=("lin1",))
    )

    # Execute / Assert
    with pytest.raises(
        ValueError, match="both a LoRA target and inside modules_to_save"
    ):
        adapter.apply(make_mlp())


# ------------------------------------------------------------------- merge
def test_merge_unmerge_keep_outputs_and_restore_base(
    mlp_input: torch.Tensor,
    applied: Callable[..., LoRAAdapter],
    randomize: Callable[..., None],
) -> None:
    # Prepare
    adapter = applied()
    randomize(adapter)
    model = adapter.model
    adapted = model(mlp_input)
    base_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n
    }

    # Execute
    adapter.merge()
    merged = model(mlp_input)
    adapter.unmerge()

    # Assert
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if "base_layer" in name:
            assert torch.equal(param, base_before[name]), name


def test_merge_is_all_or_nothing_when_a_layer_is_broken(
    applied: Callable[..., LoRAAdapter],
    randomize: Callable[..., None],
    mlp_input: torch.Tensor,
) -> None:
    # Prepare: lin0 merges fine, lin1 holds a NaN (e.g. training diverged)
    adapter = applied()
    randomize(adapter)
    with torch.no_grad():
        adapter.layers["lin1"].lora_B.weight[0, 0] = float("nan")
    base = {n: layer.base_layer.weight.clone() for n, layer in adapter.layers.items()}

    # Execute / Assert
    with pytest.raises(ValueError, match="NaN"):
        adapter.merge()
    with pytest.raises(ValueError, match="NaN"):
        adapter.merge_and_unload()
    assert adapter.is_applied
    assert _lora_count(adapter.model) == 2
    for name, layer in adapter.layers.items():
        assert not layer.merged
        assert torch.equal(layer.base_layer.weight, base[name])


def test_merge_and_unload_leaves_plain_layers(
    mlp_input: torch.Tensor,
    applied: Callable[..., LoRAAdapter],
    make_mlp: Callable[..., nn.Module],
    randomize: Callable[..., None],
) -> None:
    # Prepare
    adapter = applied(SAVE_CFG)
    randomize(adapter)
    adapted = adapter.model(mlp_input)

    # Execute
    plain = adapter.merge_and_unload()

    # Assert
    assert _lora_count(plain) == 0
    assert type(plain.lin0) is nn.Linear and type(plain.lin1) is nn.Linear
    assert not adapter.is_applied
    assert set(plain.state_dict()) == set(make_mlp().state_dict())
    torch.testing.assert_close(plain(mlp_input), adapted, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_on_gpt2_gives_back_conv1d(
    make_tiny_gpt2: Callable[..., Any],
    token_ids: torch.Tensor,
    randomize: Callable[..., None],
) -> None:
    # Prepare
    model = make_tiny_gpt2()
    adapter = LoRAAdapter(LoraConfig(r=R, target_modules=("c_attn", "c_fc")))
    adapter.apply(model)
    randomize(adapter)
    adapted = model(input_ids=token_ids).logits

    # Execute
    plain = merge_and_unload(model)

    # Assert
    assert _lora_count(plain) == 0
    assert type(plain.transformer.h[0].attn.c_attn) is Conv1D
    torch.testing.assert_close(
        plain(input_ids=token_ids).logits, adapted, rtol=1e-4, atol=1e-5
    )


# --------------------------------------------------------------- save/load
@pytest.mark.parametrize("fmt", ["peft", "json"])
def test_save_and_load_dispatch_on_format(
    fmt: str,
    tmp_path: Any,
    applied: Callable[..., LoRAAdapter],
    randomize: Callable[..., None],
) -> None:
    # Prepare
    source = applied()
    randomize(source)
    target = applied(seed=1)
    path = tmp_path / ("adapter.json" if fmt == "json" else "adapter")

    # Execute
    source.save(path, format=fmt)
    target.load(path)

    # Assert
    assert all(
        np.array_equal(a, b)
        for a, b in zip(source.get_weights(), target.get_weights(), strict=True)
    )


def test_save_with_unknown_format_raises(
    tmp_path: Any, applied: Callable[..., LoRAAdapter]
) -> None:
    # Prepare
    adapter = applied()

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape("`format` should be")):
        adapter.save(tmp_path / "x", format="bin")


@pytest.mark.parametrize("training", [True, False])
def test_lora_layers_follow_the_model_mode(
    training: bool, make_mlp: Callable[..., nn.Module]
) -> None:
    # Prepare
    model = make_mlp().train(training)

    # Execute
    LoRAAdapter(BOTH_CFG).apply(model)

    # Assert: a LoRA layer built in train mode would keep its dropout on in eval
    assert all(m.training is training for m in model.modules())
