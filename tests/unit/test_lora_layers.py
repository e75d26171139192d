"""LoRALinear: init, delta, scaling, merge/unmerge, dropout (Linear and Conv1D)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_flwr.config import LoraConfig
from lora_flwr.lora.layers import LoRALinear, in_out_features, is_conv1d

IN, OUT, R = 6, 5, 4


def _linear(seed: int = 0, in_f: int = IN, out_f: int = OUT) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_f, out_f)


def _conv1d(seed: int = 0, in_f: int = IN, out_f: int = OUT) -> Conv1D:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = Conv1D(out_f, in_f)  # Conv1D(nf=out, nx=in): weight is (in, out)
        nn.init.normal_(layer.bias)
        return layer


def _base(kind: str, seed: int = 0) -> nn.Module:
    return _linear(seed) if kind == "linear" else _conv1d(seed)


def _wrap(base: nn.Module, *, r: int = R, alpha: float = 8.0, dropout: float = 0.0):
    return LoRALinear(
        base, r=r, lora_alpha=alpha, lora_dropout=dropout, scaling=alpha / r
    )


def _randomize(layer: LoRALinear, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.normal_(generator=generator)
        layer.lora_B.weight.normal_(generator=generator)


def _x(seed: int = 2, in_f: int = IN) -> torch.Tensor:
    return torch.randn(3, 7, in_f, generator=torch.Generator().manual_seed(seed))


def _dense_weight(base: nn.Module) -> torch.Tensor:
    """Return the base weight as (out, in), whatever the layer type."""
    weight = base.weight.detach()
    return weight.T if is_conv1d(base) else weight


# ------------------------------------------------------------------------ init
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_output_equals_base_output_at_init(kind: str) -> None:
    # Prepare
    reference = _base(kind)
    layer = _wrap(_base(kind))
    x = _x()

    # Execute
    out = layer(x)

    # Assert
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) == R * IN
    assert torch.equal(out, reference(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_shapes_follow_peft(kind: str) -> None:
    # Prepare / Execute
    layer = _wrap(_base(kind))

    # Assert
    assert layer.lora_A.weight.shape == (R, IN)
    assert layer.lora_B.weight.shape == (OUT, R)
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert layer.fan_in_fan_out is (kind == "conv1d")
    assert layer.get_delta_weight().shape == layer.base_layer.weight.shape


def test_kaiming_init_is_bounded_by_one_over_sqrt_fan_in() -> None:
    # Prepare
    in_f, r = 256, 4
    bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear

    # Execute
    layer = LoRALinear(
        _linear(in_f=in_f),
        r=r,
        lora_alpha=8,
        lora_dropout=0.0,
        scaling=2.0,
        init_lora_weights="kaiming",
        generator=torch.Generator().manual_seed(0),
    )

    # Assert
    a = layer.lora_A.weight
    assert a.abs().max().item() <= bound
    assert a.abs().max().item() > 0.9 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_gaussian_init_has_std_one_over_r() -> None:
    # Prepare
    in_f, r = 256, 4

    # Execute
    layer = LoRALinear(
        _linear(in_f=in_f),
        r=r,
        lora_alpha=8,
        lora_dropout=0.0,
        scaling=2.0,
        init_lora_weights="gaussian",
        generator=torch.Generator().manual_seed(0),
    )

    # Assert
    a = layer.lora_A.weight
    assert a.std().item() == pytest.approx(1.0 / r, rel=0.1)
    assert a.abs().max().item() > 1.0 / math.sqrt(in_f)  # far beyond kaiming's bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_same_generator_seed_gives_same_a_and_leaves_global_rng() -> None:
    # Prepare
    state = torch.get_rng_state()

    # Execute
    first = _wrap_seeded(seed=3)
    second = _wrap_seeded(seed=3)
    other = _wrap_seeded(seed=4)

    # Assert
    assert torch.equal(first.lora_A.weight, second.lora_A.weight)
    assert not torch.equal(first.lora_A.weight, other.lora_A.weight)
    assert torch.equal(state, torch.get_rng_state())


def _wrap_seeded(seed: int) -> LoRALinear:
    return LoRALinear(
        _linear(),
        r=R,
        lora_alpha=8,
        lora_dropout=0.0,
        scaling=2.0,
        generator=torch.Generator().manual_seed(seed),
    )


def test_unknown_init_raises() -> None:
    # Prepare
    layer = _wrap(_linear())

    # Execute / Assert
    with pytest.raises(ValueError, match="Unknown initialization"):
        layer.reset_lora_parameters("xavier")


def test_reset_zeroes_b_again() -> None:
    # Prepare
    layer = _wrap(_linear())
    _randomize(layer)

    # Execute
    layer.reset_lora_parameters("kaiming", generator=torch.Generator().manual_seed(0))

    # Assert
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.abs().max().item() <= 1.0 / math.sqrt(IN)


def test_non_linear_base_is_rejected() -> None:
    # Prepare
    embedding = nn.Embedding(10, 4)

    # Execute / Assert
    with pytest.raises(TypeError, match="Embedding"):
        in_out_features(embedding)
    with pytest.raises(TypeError, match="Embedding"):
        _wrap(embedding)


def test_base_is_frozen_and_lora_is_trainable() -> None:
    # Prepare / Execute
    layer = _wrap(_linear())

    # Assert
    assert all(not p.requires_grad for p in layer.base_layer.parameters())
    assert layer.lora_A.weight.requires_grad
    assert layer.lora_B.weight.requires_grad


def test_at_init_only_b_gets_a_gradient() -> None:
    # Prepare
    layer = _wrap(_linear())

    # Execute
    layer(_x()).sum().backward()

    # Assert: B = 0 blocks the gradient to A; B's gradient is (A x)^T-shaped
    assert layer.base_layer.weight.grad is None
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0
    assert torch.count_nonzero(layer.lora_B.weight.grad) > 0


# ---------------------------------------------------------------- delta/scaling
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_get_delta_weight_is_scaled_b_times_a(kind: str) -> None:
    # Prepare
    layer = _wrap(_base(kind), r=R, alpha=6.0)
    _randomize(layer)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    expected = 1.5 * (b @ a)  # (out, in); scaling = 6 / 4

    # Execute
    delta = layer.get_delta_weight()

    # Assert
    if kind == "conv1d":  # fan_in_fan_out: stored like the Conv1D weight, (in, out)
        expected = expected.T
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_adds_scaled_low_rank_update(kind: str) -> None:
    # Prepare
    base = _base(kind)
    layer = _wrap(_base(kind), alpha=2.0)
    _randomize(layer)
    x = _x()
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()

    # Execute
    out = layer(x)

    # Assert: h = W0 x + (alpha / r) B A x
    expected = base(x) + 0.5 * (x @ a.T @ b.T)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_rslora_scaling_is_alpha_over_sqrt_r() -> None:
    # Prepare
    plain = LoraConfig(r=16, lora_alpha=8)
    rslora = LoraConfig(r=16, lora_alpha=8, use_rslora=True)

    # Execute
    layer = _wrap(_linear(), r=16, alpha=8)
    layer.scaling = rslora.scaling
    _randomize(layer)

    # Assert
    assert plain.scaling == 0.5
    assert rslora.scaling == 2.0
    expected = 2.0 * (layer.lora_B.weight @ layer.lora_A.weight)
    torch.testing.assert_close(layer.get_delta_weight(), expected.detach())


# ------------------------------------------------------------------ merge
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_keeps_outputs_and_unmerge_restores_w0_exactly(kind: str) -> None:
    # Prepare
    layer = _wrap(_base(kind))
    _randomize(layer)
    w0 = layer.base_layer.weight.detach().clone()
    x = _x()
    adapted = layer(x)

    # Execute
    layer.merge()
    merged_out = layer(x)
    merged_weight = layer.base_layer.weight.detach().clone()
    layer.unmerge()

    # Assert
    torch.testing.assert_close(merged_out, adapted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged_weight, w0 + layer.get_delta_weight())
    assert not torch.equal(merged_weight, w0)
    assert torch.equal(layer.base_layer.weight, w0)
    assert not layer.merged
    torch.testing.assert_close(layer(x), adapted)


def test_merged_layer_skips_the_lora_branch() -> None:
    # Prepare
    layer = _wrap(_linear())
    _randomize(layer)
    x = _x()
    layer.merge()

    # Execute
    out = layer(x)

    # Assert
    assert layer.merged
    assert torch.equal(out, layer.base_layer(x))


def test_merge_twice_and_unmerge_twice_are_no_ops() -> None:
    # Prepare
    layer = _wrap(_linear())
    _randomize(layer)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    once = layer.base_layer.weight.detach().clone()

    # Execute
    layer.merge()
    twice = layer.base_layer.weight.detach().clone()
    layer.unmerge()
    layer.unmerge()

    # Assert
    assert torch.equal(once, twice)
    assert torch.equal(layer.base_layer.weight, w0)


def test_merge_with_nan_raises_and_keeps_w0() -> None:
    # Prepare
    layer = _wrap(_linear())
    _randomize(layer)
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    w0 = layer.base_layer.weight.detach().clone()

    # Execute / Assert
    with pytest.raises(ValueError, match="NaN"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, w0)


def test_half_precision_base_keeps_float32_factors() -> None:
    # Prepare
    base = _linear().to(torch.bfloat16)
    layer = _wrap(base)
    _randomize(layer)
    x = _x().to(torch.bfloat16)
    w0 = base.weight.detach().clone()

    # Execute
    out = layer(x)
    layer.merge()
    layer.unmerge()

    # Assert
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer.lora_B.weight.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    assert layer.get_delta_weight().dtype == torch.bfloat16
    assert torch.equal(base.weight, w0)


# ----------------------------------------------------------------- dropout
def test_dropout_applies_only_in_train_mode() -> None:
    # Prepare
    layer = _wrap(_linear(), dropout=0.5)
    _randomize(layer)
    x = _x()
    layer.eval()
    eval_out = layer(x)
    expected = layer.base_layer(x) + layer.scaling * (
        x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    )

    # Execute
    layer.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        train_1 = layer(x)
        train_2 = layer(x)
    layer.eval()

    # Assert
    assert isinstance(layer.lora_dropout, nn.Dropout)
    torch.testing.assert_close(eval_out, expected.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(layer(x), eval_out)
    assert not torch.allclose(train_1, eval_out)
    assert not torch.allclose(train_1, train_2)


def test_dropout_touches_only_the_lora_branch() -> None:
    # Prepare: B = 0, so the LoRA branch is zero whatever dropout does
    base = _linear()
    layer = _wrap(_linear(), dropout=0.9)
    x = _x()

    # Execute
    layer.train()
    out = layer(x)

    # Assert
    assert torch.equal(out, base(x))


def test_zero_dropout_is_identity() -> None:
    # Prepare / Execute
    layer = _wrap(_linear(), dropout=0.0)

    # Assert
    assert isinstance(layer.lora_dropout, nn.Identity)


def test_extra_repr_shows_rank_and_scaling() -> None:
    # Prepare
    layer = _wrap(_linear(), r=4, alpha=8)

    # Execute
    text = repr(layer)

    # Assert
    assert "r=4, scaling=2, merged=False" in text


# ---------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    in_f=st.integers(1, 12),
    out_f=st.integers(1, 12),
    r=st.integers(1, 6),
    alpha=st.floats(0.5, 64.0),
    conv=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_merged_weight_is_w0_plus_scaled_ba(
    in_f: int, out_f: int, r: int, alpha: float, conv: bool, seed: int
) -> None:
    # Prepare
    base = _conv1d(seed, in_f, out_f) if conv else _linear(seed, in_f, out_f)
    layer = LoRALinear(base, r=r, lora_alpha=alpha, lora_dropout=0.0, scaling=alpha / r)
    _randomize(layer, seed)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(seed))
    adapted = layer(x)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()

    # Execute
    layer.merge()
    merged = _dense_weight(base).clone()
    merged_out = layer(x)
    layer.unmerge()

    # Assert
    w0_dense = w0.T if conv else w0
    torch.testing.assert_close(
        merged, w0_dense + (alpha / r) * (b @ a), rtol=1e-5, atol=1e-5
    )
    # float32 rounding grows with the size of the summands, not of the result
    scale = 1.0 + adapted.abs().max().item()
    torch.testing.assert_close(merged_out, adapted, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(base.weight, w0)
