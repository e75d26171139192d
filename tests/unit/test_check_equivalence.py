"""The comparison functions of scripts/check_equivalence.py (no runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_equivalence.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_equivalence", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ce = _load()


def _history(**changes: Any) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = [
        {"round": 0, "test_loss": 0.69, "eval_seconds": 0.09},
        {
            "round": 1,
            "started_at": 1796653105.01,
            "train_loss": 0.6920276820659637,
            "test_loss": 0.6785746932029724,
            "fit_ok": 2,
            "round_seconds": 15.2,
            "client_seconds_max": 0.33,
            "workers": 2,
            "worker_pid": 123,
            "prof_server_other_calls": 4,
        },
    ]
    records[1].update(changes)
    return records


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("round_seconds", "timing"),
        ("seconds", "timing"),
        ("client_seconds_critical", "timing"),
        ("fit_done_at", "timing"),
        ("wall_clock", "timing"),
        ("prof_client_train_calls", "profile"),
        ("worker_pid", "pid"),
        ("client_fit_calls_max", "worker placement"),
        ("train_loss", None),
        ("format", None),
        ("dp_clipped", None),
        ("tokens", None),
    ],
)
def test_ignore_reason_names_the_class_of_each_field(
    key: str, reason: str | None
) -> None:
    # Execute / Assert
    assert ce.ignore_reason(key) == reason


def test_histories_differing_only_in_timing_fields_are_equal() -> None:
    # Prepare
    base = _history()
    new = _history(
        started_at=1796659999.5,
        round_seconds=99.0,
        client_seconds_max=7.0,
        workers=1,
        worker_pid=456,
        prof_server_other_calls=9,
    )
    new[0]["eval_seconds"] = 3.0

    # Execute
    result = ce.compare_histories(base, new)

    # Assert
    assert result.equal
    assert result.differences == ()
    assert result.ignored == (
        "client_seconds_max",
        "eval_seconds",
        "prof_server_other_calls",
        "round_seconds",
        "started_at",
        "worker_pid",
        "workers",
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"test_loss": 0.6785746932029725},  # the last digit
        {"fit_ok": 2.0},  # the same number, another type
        {"agg_error": 0.5},  # a field only one side has
        {"train_loss": 0.6920277},  # a mean of the replies, beyond the tolerance
    ],
)
def test_a_changed_non_timing_field_makes_histories_differ(
    changes: dict[str, Any],
) -> None:
    # Prepare
    base, new = _history(), _history(**changes)

    # Execute
    result = ce.compare_histories(base, new)

    # Assert
    assert not result.equal
    assert len(result.differences) == 1
    assert f"`{next(iter(changes))}`" in result.differences[0]


def test_means_of_the_replies_may_differ_in_their_last_bits() -> None:
    # Prepare: the same mean summed in another order of the replies.
    forward, backward = sum([0.1, 0.2, 0.3, 0.7]), sum([0.1, 0.7, 0.3, 0.2])
    assert forward != backward

    # Execute
    result = ce.compare_histories(
        _history(train_loss=forward), _history(train_loss=backward)
    )

    # Assert
    assert result.equal
    assert result.reordered == ("train_loss",)


def test_histories_of_different_length_differ() -> None:
    # Execute
    result = ce.compare_histories(_history(), _history()[:1])

    # Assert
    assert not result.equal
    assert result.differences == ("base has 2 records, new has 1",)


def _save(path: Path, tensors: dict[str, torch.Tensor], **meta: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", **meta})
    return path


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.lora_A.weight": torch.randn(4, 8, generator=gen),
        "a.lora_B.weight": torch.zeros(8, 4),
    }


def test_identical_files_are_equal_in_bytes_and_tensors(tmp_path: Path) -> None:
    # Prepare
    a = _save(tmp_path / "a.safetensors", _tensors())
    b = _save(tmp_path / "b.safetensors", _tensors())

    # Execute
    result = ce.compare_safetensors(a, b)

    # Assert
    assert result.bytes_equal and result.tensors_equal


def test_tensors_differing_in_one_bit_differ(tmp_path: Path) -> None:
    # Prepare: flip the lowest mantissa bit of one value.
    flipped = _tensors()
    bits = flipped["a.lora_A.weight"].view(torch.int32)
    bits[2, 3] ^= 1
    a = _save(tmp_path / "a.safetensors", _tensors())
    b = _save(tmp_path / "b.safetensors", flipped)

    # Execute
    result = ce.compare_safetensors(a, b)

    # Assert
    assert not result.bytes_equal
    assert not result.tensors_equal
    assert result.detail.startswith("1 of 2 tensors differ, e.g. a.lora_A.weight")


def test_negative_zero_differs_from_zero(tmp_path: Path) -> None:
    # Prepare: equal as numbers (torch.equal on the values says so), not as bits.
    signed = _tensors()
    signed["a.lora_B.weight"][0, 0] = -0.0
    a = _save(tmp_path / "a.safetensors", _tensors())
    b = _save(tmp_path / "b.safetensors", signed)

    # Execute
    result = ce.compare_safetensors(a, b)

    # Assert
    assert not result.tensors_equal


def test_same_tensors_with_other_metadata_differ_in_bytes_only(tmp_path: Path) -> None:
    # Prepare
    a = _save(tmp_path / "a.safetensors", _tensors())
    b = _save(tmp_path / "b.safetensors", _tensors(), note="x")

    # Execute
    result = ce.compare_safetensors(a, b)

    # Assert
    assert result.tensors_equal and not result.bytes_equal


def test_run_dirs_compare_every_file_both_wrote(tmp_path: Path) -> None:
    # Prepare: a hidden temp file (a write cut by a kill) is not an output.
    for side in ("base", "new"):
        _save(tmp_path / side / "adapter" / "adapter_model.safetensors", _tensors())
        _save(tmp_path / side / "checkpoints" / "round-001" / "m.safetensors", {})
    _save(tmp_path / "new" / "state" / ".x.1234.tmp" / "s.safetensors", _tensors())

    # Execute
    same = ce.compare_tensor_files(tmp_path / "base", tmp_path / "new")
    _save(tmp_path / "new" / "state" / "round-002" / "s.safetensors", _tensors())
    extra = ce.compare_tensor_files(tmp_path / "base", tmp_path / "new")

    # Assert
    assert same == (True, "yes: 2 files, tensors and bytes")
    assert extra == (False, "DIFFER: state/round-002/s.safetensors: only in new")


def test_configs_are_compared_with_output_folders_normalised(tmp_path: Path) -> None:
    # Prepare
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('name = "x"\noutput_dir = "/o/base"\n[fed]\nnum_rounds = 2\n')
    b.write_text('name = "x"\noutput_dir = "/o/new"\n[fed]\nnum_rounds = 3\n')

    # Execute
    diffs = ce.compare_configs([a, b], ["/o/base", "/o/new"])

    # Assert
    assert diffs == ["`fed.num_rounds` base 2 != new 3"]


def test_a_base_that_spells_keys_the_old_way_is_compared_by_key(
    tmp_path: Path,
) -> None:
    # Prepare: the base wrote the flat layout, the new side moved the keys
    (tmp_path / "base").mkdir()
    new_root = tmp_path / "new"
    (new_root / ce.RENAMES).parent.mkdir(parents=True)
    (new_root / ce.RENAMES).write_text('RENAMED = {"fed.secagg": "secagg.enabled"}\n')
    moved = ce.moved_keys(tmp_path / "base", new_root)
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("[fed]\nnum_rounds = 2\nsecagg = true\n")
    b.write_text("[fed]\nnum_rounds = 2\n[secagg]\nenabled = false\n")

    # Execute
    side = ce.Side("base", tmp_path / "base", moved=moved)
    diffs = ce.compare_configs([a, b], ["/o", "/o"], moved)

    # Assert
    assert moved == {"secagg.enabled": "fed.secagg"}
    assert side.spell("secagg.enabled=true") == "fed.secagg=true"
    assert side.spell("fed.num_rounds=2") == "fed.num_rounds=2"
    assert diffs == ["`secagg.enabled` base True != new False"]
    assert ce.moved_keys(new_root, new_root) == {}  # both sides spell them alike


def test_how_an_attempt_treats_its_folder_is_not_a_config_difference(
    tmp_path: Path,
) -> None:
    # Prepare: a resumed base rewrote config.toml; the new side kept the first one
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('on_existing = "resume"\n[fed]\nnum_rounds = 4\n')
    b.write_text('on_existing = "refuse"\n[fed]\nnum_rounds = 4\n')

    # Execute
    diffs = ce.compare_configs([a, b], ["/o", "/o"])

    # Assert
    assert diffs == []


def test_a_field_the_new_side_adds_on_purpose_is_not_a_difference() -> None:
    # Prepare: the new rows carry weight_cap_moved and the evaluation guards'
    # counts; an unknown addition stays a diff.
    base = [{"round": 1, "fit_ok": 2}]
    eval_guards = {
        "eval_dropped": 0,
        "eval_capped": 0,
        "eval_clipped": 0,
        "eval_rejected": 0,
        "eval_loss_bound": 1.2,
    }
    added = [{"round": 1, "fit_ok": 2, "weight_cap_moved": 0.0, **eval_guards}]
    unknown = [{"round": 1, "fit_ok": 2, "surprise": 1}]

    # Execute
    ok = ce.compare_histories(base, added)
    bad = ce.compare_histories(base, unknown)

    # Assert
    assert ok.equal and "weight_cap_moved (added)" in ok.ignored
    assert {f"{key} (added)" for key in eval_guards} <= set(ok.ignored)
    assert not bad.equal
