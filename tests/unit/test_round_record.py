"""RoundRecord: the typed history row (order, presence, extra keys, round trip)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from lora_flwr.server.record import FIELDS, RoundRecord

# The column order: every dataclass field but the two bookkeeping ones.
ORDER = [
    f.name for f in dataclasses.fields(RoundRecord) if f.name not in ("extra", "_set")
]


def test_a_fresh_record_holds_only_its_round() -> None:
    # Prepare / Execute
    row = RoundRecord(round=4).to_dict()
    empty = RoundRecord().to_dict()

    # Assert: unset fields are absent, not null; the round is always written.
    assert row == {"round": 4}
    assert empty == {"round": 0}


def test_fields_given_to_the_constructor_are_written() -> None:
    # Prepare / Execute
    row = RoundRecord(round=2, lr=0.5, fit_ok=3).to_dict()

    # Assert
    assert row == {"round": 2, "lr": 0.5, "fit_ok": 3}


def test_to_dict_follows_the_field_order_whatever_the_order_of_setting() -> None:
    # Prepare: set three fields from last to first.
    rec = RoundRecord(round=1)
    rec.round_seconds = 2.0
    rec.train_loss = 0.25
    rec.started_at = 100.0

    # Execute
    keys = list(rec.to_dict())

    # Assert
    assert keys == ["round", "started_at", "train_loss", "round_seconds"]
    assert keys == [k for k in ORDER if k in keys]


def test_a_field_set_to_none_is_written_as_null() -> None:
    # Prepare: no client reported a train loss.
    rec = RoundRecord(round=1)
    rec.train_loss = None

    # Execute
    row = rec.to_dict()

    # Assert: present, and null in the JSON the history is written as.
    assert row == {"round": 1, "train_loss": None}
    assert json.dumps(row) == '{"round": 1, "train_loss": null}'


def test_unset_takes_a_field_out_of_the_row() -> None:
    # Prepare
    rec = RoundRecord(round=1)
    rec.bytes_up = 10
    rec.bytes_up_max = 7

    # Execute
    rec.unset("bytes_up")

    # Assert: gone from the row and read back as None; the other one stays.
    assert rec.to_dict() == {"round": 1, "bytes_up_max": 7}
    assert rec.bytes_up is None
    assert rec.get("bytes_up") is None


def test_unknown_keys_go_to_extra_and_are_written_after_the_fields() -> None:
    # Prepare: an extra metric arrives before any known field is set.
    rec = RoundRecord(round=3)
    rec.update({"test_f1": 0.7, "prof_server_other": 0.1})
    rec.update({"test_loss": 1.5, "fit_ok": 2})

    # Execute
    row = rec.to_dict()

    # Assert: fields in their order first, then extra in insertion order.
    assert list(row) == ["round", "fit_ok", "test_loss", "test_f1", "prof_server_other"]
    assert row["test_f1"] == 0.7
    assert rec.extra == {"test_f1": 0.7, "prof_server_other": 0.1}
    assert rec.get("test_f1") == 0.7
    assert rec.get("test_loss") == 1.5
    assert rec.get("never_written") is None


def test_update_sets_known_fields_as_attributes() -> None:
    # Prepare
    rec = RoundRecord(round=1)

    # Execute
    rec.update({"aggregated": False, "eval_kind": None})

    # Assert: a field set through update is a field (False and None kept).
    assert rec.aggregated is False
    assert rec.extra == {}
    assert rec.to_dict() == {"round": 1, "aggregated": False, "eval_kind": None}


def test_from_dict_round_trips_values_order_and_nulls() -> None:
    # Prepare: a row as history.json holds it, with a null and extra keys.
    row: dict[str, Any] = {
        "round": 5,
        "started_at": 12.5,
        "lr": 0.01,
        "fit_ok": 3,
        "fit_failed": 0,
        "weight_cap_moved": 0.25,
        "train_loss": None,
        "aggregated": True,
        "test_loss": 0.5,
        "round_seconds": 1.25,
        "test_f1": 0.75,
        "prof_server_aggregation": 0.01,
    }

    # Execute
    rec = RoundRecord.from_dict(row)
    again = rec.to_dict()

    # Assert
    assert again == row
    assert list(again) == list(row)
    assert rec.round == 5
    assert rec.weight_cap_moved == 0.25
    assert rec.extra == {"test_f1": 0.75, "prof_server_aggregation": 0.01}
    assert RoundRecord.from_dict(again).to_dict() == row


def test_from_dict_of_a_row_in_another_order_writes_the_field_order() -> None:
    # Prepare: keys out of column order.
    row = {"aggregated": True, "round": 2, "fit_ok": 1}

    # Execute
    out = RoundRecord.from_dict(row).to_dict()

    # Assert
    assert out == row
    assert list(out) == ["round", "fit_ok", "aggregated"]


def test_fields_are_every_column_and_the_new_guard_share_is_one() -> None:
    # Prepare / Execute / Assert: the public key set is the column set.
    assert set(ORDER) == FIELDS
    assert "weight_cap_moved" in FIELDS
    assert ORDER.index("weight_capped") + 1 == ORDER.index("weight_cap_moved")
    assert "extra" not in FIELDS
