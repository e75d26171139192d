"""Label-skew losses (loss.name): formulas checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_trainer import _setup

from lora_flwr.config import LOSSES as CONFIG_LOSSES
from lora_flwr.config import LossConfig
from lora_flwr.data import TokenizedDataset
from lora_flwr.training.losses import LOSSES, class_counts, skew_loss

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
LABELS = torch.tensor([0, 2])
COUNTS = torch.tensor([16, 1, 0])


def _ce(logits: list[float], y: int) -> float:
    return -logits[y] + math.log(sum(math.exp(v) for v in logits))


def test_class_counts_count_every_class_and_refuse_out_of_range() -> None:
    assert class_counts(torch.tensor([0, 2, 2, 0, 0]), 3).tolist() == [3, 0, 2]
    with pytest.raises(ValueError, match=r"\[0, 2\).*0 to 2.*num_labels"):
        class_counts(torch.tensor([0, 2]), 2)


def test_the_config_and_the_trainer_list_the_same_losses() -> None:
    assert CONFIG_LOSSES == LOSSES


def test_ce_is_plain_cross_entropy() -> None:
    want = (_ce([2.0, 0.5, -1.0], 0) + _ce([0.0, 1.0, 3.0], 2)) / 2
    assert skew_loss("ce", LOGITS, LABELS, COUNTS).item() == pytest.approx(want)


def test_fedlc_subtracts_tau_over_the_fourth_root_of_the_counts() -> None:
    tau = 0.7
    # n = 16, 1, 0 (counted as 1): n^(-1/4) = 0.5, 1, 1
    shift = [tau * 0.5, tau * 1.0, tau * 1.0]
    rows = [[v - s for v, s in zip(r, shift, strict=True)] for r in LOGITS.tolist()]
    want = (_ce(rows[0], 0) + _ce(rows[1], 2)) / 2
    got = skew_loss("fedlc", LOGITS, LABELS, COUNTS, tau=tau).item()
    assert got == pytest.approx(want)
    assert skew_loss("fedlc", LOGITS, LABELS, COUNTS, tau=0.0).item() == (
        pytest.approx(skew_loss("ce", LOGITS, LABELS, COUNTS).item())
    )


def test_fedrs_scales_only_the_absent_classes_logits() -> None:
    alpha = 0.25
    rows = [[v, w, alpha * x] for v, w, x in LOGITS.tolist()]  # class 2 is absent
    want = (_ce(rows[0], 0) + _ce(rows[1], 2)) / 2
    got = skew_loss("fedrs", LOGITS, LABELS, COUNTS, alpha=alpha).item()
    assert got == pytest.approx(want)
    full = skew_loss("fedrs", LOGITS, LABELS, COUNTS, alpha=1.0).item()
    assert full == pytest.approx(skew_loss("ce", LOGITS, LABELS, COUNTS).item())


def test_logit_adjust_adds_tau_log_prior_and_drops_absent_classes() -> None:
    tau = 0.5
    # counts 16, 1, 0: prior 16/17, 1/17; class 2 is out of the softmax.
    shift = [tau * math.log(16 / 17), tau * math.log(1 / 17)]
    rows = [[v + s for v, s in zip(r[:2], shift, strict=True)] for r in LOGITS.tolist()]
    labels = torch.tensor([0, 1])
    want = (_ce(rows[0], 0) + _ce(rows[1], 1)) / 2
    got = skew_loss("logit_adjust", LOGITS, labels, COUNTS, tau=tau).item()
    assert got == pytest.approx(want)
    # tau = 0 with every class present is plain cross-entropy.
    full = torch.tensor([3, 4, 5])
    assert skew_loss("logit_adjust", LOGITS, LABELS, full, tau=0.0).item() == (
        pytest.approx(skew_loss("ce", LOGITS, LABELS, full).item())
    )


def test_logit_adjust_leaves_a_one_class_client_without_a_gradient() -> None:
    logits = LOGITS.clone().requires_grad_(True)
    loss = skew_loss(
        "logit_adjust", logits, torch.tensor([0, 0]), torch.tensor([9, 0, 0])
    )
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and not logits.grad.any()


def test_balanced_weights_by_the_effective_number_of_examples() -> None:
    beta = 0.9
    w = [(1 - beta) / (1 - beta**16), 1.0, 1.0]  # absent class counted as 1
    per = [_ce([2.0, 0.5, -1.0], 0), _ce([0.0, 1.0, 3.0], 2)]
    want = (w[0] * per[0] + w[2] * per[1]) / (w[0] + w[2])
    got = skew_loss("balanced", LOGITS, LABELS, COUNTS, beta=beta).item()
    assert got == pytest.approx(want)
    plain = skew_loss("balanced", LOGITS, LABELS, COUNTS, beta=0.0).item()
    assert plain == pytest.approx(skew_loss("ce", LOGITS, LABELS, COUNTS).item())


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(0, 50), min_size=3, max_size=3),
    st.floats(0.0, 3.0),
    st.floats(0.0, 1.0),
    st.floats(0.0, 0.999),
)
def test_every_loss_is_finite_and_positive(
    counts: list[int], tau: float, alpha: float, beta: float
) -> None:
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    for name in ("ce", "fedlc", "fedrs", "logit_adjust", "balanced"):
        if name == "logit_adjust" and 0 in counts:
            continue  # exactly 0 when a label's class is absent (tested above)
        value = skew_loss(
            name, logits, labels, torch.tensor(counts), tau=tau, alpha=alpha, beta=beta
        )
        assert torch.isfinite(value) and value.item() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "focal"}, "`loss.name` is 'focal'"),
        ({"name": "fedlc", "tau": -1.0}, r"`loss\.tau`"),
        ({"name": "logit_adjust", "tau": -1.0}, r"`loss\.tau`"),
        ({"name": "fedrs", "alpha": 1.5}, r"`loss\.fedrs_alpha`"),
        ({"name": "balanced", "beta": 1.0}, r"`loss\.balanced_beta`"),
    ],
)
def test_bad_loss_settings_are_refused(kwargs: dict[str, object], match: str) -> None:
    name = str(kwargs.pop("name"))
    with pytest.raises(ValueError, match=match):
        skew_loss(name, LOGITS, LABELS, COUNTS, **kwargs)  # type: ignore[arg-type]


def test_shapes_that_disagree_are_refused() -> None:
    with pytest.raises(ValueError, match="one entry per class"):
        skew_loss("fedlc", LOGITS, LABELS, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        skew_loss("ce", LOGITS[0], LABELS, COUNTS)


@pytest.mark.parametrize(
    ("key", "value"),
    [("name", "focal"), ("tau", -0.1), ("fedrs_alpha", 2.0), ("balanced_beta", 1)],
)
def test_config_refuses_bad_loss_values(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"`loss.{key}`"):
        LossConfig(**{key: value})  # type: ignore[arg-type]


def _skewed(data: TokenizedDataset, minority: int) -> TokenizedDataset:
    """Every class-0 example and the first ``minority`` class-1 examples."""
    assert data.labels is not None
    ones = [i for i, y in enumerate(data.labels.tolist()) if y == 1][:minority]
    keep = [i for i, y in enumerate(data.labels.tolist()) if y == 0] + ones
    return TokenizedDataset(
        tuple(data.input_ids[i] for i in keep),
        data.labels[keep],
        data.task,
        data.pad_token_id,
    )


@pytest.mark.parametrize(
    ("loss", "minority"),
    [("fedlc", 2), ("fedrs", 0), ("logit_adjust", 2), ("balanced", 2)],
)
def test_the_trainer_trains_with_each_skew_loss(loss: str, minority: int) -> None:
    # On a skewed client a different objective gives a different training run.
    base = _setup(seed=0)
    data = _skewed(base.train, minority)
    plain = base.trainer.train(data, steps=3, seed=0, progress=False)
    skew = _setup(
        seed=0,
        loss={"name": loss, "tau": 2.0, "fedrs_alpha": 0.0, "balanced_beta": 0.99},
    )
    metrics = skew.trainer.train(data, steps=3, seed=0, progress=False)
    assert math.isfinite(metrics["train_loss"])
    assert metrics["train_loss"] != pytest.approx(plain["train_loss"], abs=1e-4)


def test_a_skew_loss_on_a_causal_model_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a classification task.*'ce'"):
        _setup(model="tiny-llama", loss={"name": "fedlc"})
