"""What model.max_length cut of the responses reaches the run history.

The client reports its training set's counts (``responses_truncated``,
``responses_dropped``) in each fit reply; the round core sums them into the
round's record; metric hygiene keeps only non-negative integers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_server_core import open_fit
from test_server_rounds import ALL, core_on, full, reply, warnings_of

from lora_flwr.config import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    FedConfig,
    LoraConfig,
    ModelConfig,
    SamplingConfig,
    TrainConfig,
)
from lora_flwr.fl.client import LoRAClient
from lora_flwr.protocol import (
    LOCAL_STEPS,
    LR,
    RESPONSES_DROPPED,
    RESPONSES_TRUNCATED,
    ROUND,
    TRAIN_LOSS,
    Plan,
)
from lora_flwr.server.guards import clean_metrics
from lora_flwr.server.record import FIELDS, RoundRecord


# ------------------------------------------------------------ server side
def test_the_round_record_sums_the_clients_counts() -> None:
    # Prepare: partition 2 sends no counts (plain text data, or an old client).
    core = core_on()
    open_fit(core, 1, ALL)
    replies = [
        reply(0, full(1.0), 10, metrics={RESPONSES_TRUNCATED: 3, RESPONSES_DROPPED: 1}),
        reply(1, full(2.0), 10, metrics={RESPONSES_TRUNCATED: 4, RESPONSES_DROPPED: 0}),
        reply(2, full(3.0), 10),
    ]

    # Execute
    core.fit_outcome(1, replies, [])

    # Assert
    assert core.record is not None
    row = core.record.to_dict()
    assert (row[RESPONSES_TRUNCATED], row[RESPONSES_DROPPED]) == (7, 1)
    back = RoundRecord.from_dict(row)
    assert (back.responses_truncated, back.responses_dropped) == (7, 1)
    assert {RESPONSES_TRUNCATED, RESPONSES_DROPPED} <= FIELDS


def test_a_round_without_instruction_data_has_no_count_fields() -> None:
    # Prepare
    core = core_on()
    open_fit(core, 1, ALL)

    # Execute
    core.fit_outcome(1, [reply(0, full(1.0), 10), reply(1, full(2.0), 10)], [])

    # Assert
    assert core.record is not None
    row = core.record.to_dict()
    assert RESPONSES_TRUNCATED not in row and RESPONSES_DROPPED not in row


@pytest.mark.parametrize("value", [-1, 2.5, True, "3", float("nan")])
def test_a_count_that_is_not_a_non_negative_integer_is_dropped(value: Any) -> None:
    # Execute
    kept, problems = clean_metrics({RESPONSES_TRUNCATED: value, RESPONSES_DROPPED: 2})

    # Assert
    assert kept == {RESPONSES_DROPPED: 2}
    assert problems == [
        f"metric {RESPONSES_TRUNCATED}={value!r} should be a non-negative integer"
    ]


def test_a_bad_count_is_left_out_of_the_sum_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    core = core_on()
    open_fit(core, 1, ALL)
    bad = reply(1, full(2.0), 10, metrics={RESPONSES_TRUNCATED: -5})
    good = reply(0, full(1.0), 10, metrics={RESPONSES_TRUNCATED: 2})

    # Execute
    with caplog.at_level("WARNING", logger="flwr"):
        core.fit_outcome(1, [good, bad], [])

    # Assert: both replies aggregated; only the good count summed.
    assert core.record is not None and core.record.fit_ok == 2
    assert core.record.responses_truncated == 2
    assert any("responses_truncated=-5" in w for w in warnings_of(caplog))


# ------------------------------------------------------------ client side
def _chat_file(path: Path) -> Path:
    """Conversations whose responses max_length 72 keeps, cuts or drops whole."""
    rows = []
    for i in range(10):
        fits = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"},
        ]
        cut = [
            {"role": "user", "content": "q" * 8},
            {"role": "assistant", "content": "a" * 40},
        ]
        gone = [
            {"role": "user", "content": "x" * 60},
            {"role": "assistant", "content": "b"},
        ]
        rows.append({"messages": (fits, cut, gone)[i % 3]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _instruct_cfg(data: Path) -> ExperimentConfig:
    return ExperimentConfig(
        name="cut-counts",
        model=ModelConfig(name="tiny-llama", max_length=72, fallback_template="chatml"),
        lora=LoraConfig(r=2, lora_dropout=0.0, target_modules=("q_proj", "v_proj")),
        data=DataConfig(
            name=str(data),
            format="chat",
            partitioner="iid",
            test_fraction=0.2,
            local_test_fraction=0.0,
        ),
        train=TrainConfig(batch_size=4, local_steps=1),
        eval=EvalConfig(min_clients=1),
        fed=FedConfig(num_clients=1),
        sampling=SamplingConfig(min_clients=1, min_available=1),
    )


def test_a_client_reports_its_training_sets_cut_counts(
    cache: Path, tmp_path: Path
) -> None:
    # Prepare
    client = LoRAClient(_instruct_cfg(_chat_file(tmp_path / "chat.jsonl")), 0, 1)
    config = {ROUND: 1, LR: 1e-3, LOCAL_STEPS: 1, **Plan(rank=2).to_config()}

    # Execute
    _, n, metrics = client.fit(client.get_parameters({}), config)

    # Assert: the counts stored with the tokenized split, as integers.
    data = client.train_data
    assert data.truncated > 0 and data.dropped > 0
    assert metrics[RESPONSES_TRUNCATED] == data.truncated
    assert metrics[RESPONSES_DROPPED] == data.dropped
    assert type(metrics[RESPONSES_TRUNCATED]) is int
    assert n == len(data) and np.isfinite(float(metrics[TRAIN_LOSS]))
    kept, problems = clean_metrics(metrics)
    assert problems == [] and kept[RESPONSES_DROPPED] == data.dropped
