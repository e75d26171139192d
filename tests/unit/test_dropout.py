"""lora_flwr.dropout: torch's dropout with 16-bit masks on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_flwr.dropout import Dropout, dropout, effective_p, keep_mask

N = 1 << 20


def _sigmas(count: float, n: int, p: float) -> float:
    """How many binomial standard deviations ``count`` is from ``n * p``."""
    return abs(count - n * p) / math.sqrt(n * p * (1 - p))


@given(st.floats(min_value=0.0, max_value=1.0))
def test_effective_p_is_within_half_a_16_bit_step(p: float) -> None:
    # Execute / Assert
    assert abs(effective_p(p) - p) <= 2.0**-17


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_drop_rate_is_p_overall_and_in_every_lane(p: float) -> None:
    # Prepare
    torch.manual_seed(0)

    # Execute
    dropped = ~keep_mask((N,), p)

    # Assert: overall, and in each 16-bit lane of the 64-bit draws separately
    # (a lane with a biased top bit would show up here).
    assert _sigmas(float(dropped.sum()), N, effective_p(p)) < 5
    lanes = dropped.view(-1, 4)
    for lane in range(4):
        count = float(lanes[:, lane].sum())
        assert _sigmas(count, N // 4, effective_p(p)) < 5


def test_kept_entries_are_rescaled_so_the_expectation_is_exact() -> None:
    # Prepare
    torch.manual_seed(1)
    x = torch.linspace(-3.0, 3.0, N)

    # Execute
    y = dropout(x, 0.1)

    # Assert: every entry is 0 or x / (1 - p'), and the mean of y / x is ~1.
    kept = y != 0
    scale = 1.0 / (1.0 - effective_p(0.1))
    torch.testing.assert_close(y[kept], x[kept] * scale)
    ratio = (y[x != 0] / x[x != 0]).mean()
    assert abs(float(ratio) - 1.0) < 5 * math.sqrt(0.1 / 0.9 / N)


def test_the_gradient_is_the_mask_times_the_scale() -> None:
    # Prepare
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)

    # Execute
    y = dropout(x, 0.25)
    y.sum().backward()

    # Assert
    assert x.grad is not None
    scale = 1.0 / (1.0 - effective_p(0.25))
    want = torch.where(y != 0, torch.tensor(scale), torch.tensor(0.0))
    torch.testing.assert_close(x.grad, want)


def test_masks_follow_the_global_seed() -> None:
    # Prepare
    x = torch.ones(5, 7, 9)

    # Execute
    torch.manual_seed(3)
    first = dropout(x, 0.3)
    second = dropout(x, 0.3)
    torch.manual_seed(3)
    again = dropout(x, 0.3)

    # Assert
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_eval_mode_p0_and_p1_behave_like_torch() -> None:
    # Prepare
    x = torch.randn(10, 10)
    module = Dropout(0.5)

    # Execute
    module.eval()
    in_eval = module(x)

    # Assert
    assert in_eval is x
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert isinstance(module, torch.nn.Dropout)


def test_odd_sizes_and_non_contiguous_inputs_keep_their_shape() -> None:
    # Prepare
    torch.manual_seed(4)
    x = torch.randn(7, 5, 3).transpose(0, 2)  # 105 elements, not a multiple of 4

    # Execute
    y = dropout(x, 0.2)

    # Assert
    assert y.shape == x.shape
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1.0 - effective_p(0.2)))
